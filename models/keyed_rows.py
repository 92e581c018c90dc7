"""Keyed conv and pooling on channels-last rows: the fused mode's fast path.

A slot-ordered map (B, C, H, W) stored channels-last is a stack of rows (B, N, C): row ``s`` of
frame ``b`` is the C-vector of slot ``s``. A keyed layer's gather table ``G`` (T, K) is shared by
all channels, so its gather moves whole rows: output slot ``t`` reads rows ``G[t, 0..K-1]`` (the
sentinel ``N`` reads 0, or -inf for max pooling). :class:`RowGather` gathers the taps of a
*block* of output slots into one small buffer that is reused for every block (a channels-last
im2col of R slots, about a megabyte, never of the whole map) and finishes the block at once: one
GEMM with the (K*C, O) weight for a conv, a max or a sum over K for pooling. The output is
written in place as rows (B, T, O), a channels-last map again, so BatchNorm, ReLU and residual
adds run on it unchanged and the next keyed layer reads it without a copy. No activation-sized
copy is made.

Everything runs on the tables' device with index_select / mm / index_fill_ (no host round trip,
no data-dependent shapes): the same code on CPU and CUDA.

Autograd: ``out=`` buffers cannot be reused under autograd, so when gradients are needed
(:func:`needs_grad`) the whole (B*T, K*C) column matrix is gathered at once (training memory is
dominated by the saved activations anyway); inference (``no_grad`` / ``inference_mode``) takes the
blocked path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .tables import invert_torch

__all__ = [
    "BLOCK_BYTES",
    "MIN_BLOCK_ROWS",
    "RowGather",
    "from_rows",
    "needs_grad",
    "row_weight",
    "rows_conv2d",
    "rows_pool2d",
    "to_rows",
]

#: Largest reused column buffer of one block (bytes); a block's buffer is also kept to at most
#: half the input activation (beyond one frame's columns), so it never dominates the peak memory.
BLOCK_BYTES = 4 << 20
#: Fewest output rows per block (a GEMM needs enough rows to reuse the weight).
MIN_BLOCK_ROWS = 256


def to_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C) rows: a view when ``x`` is channels-last, else one copy."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def from_rows(y: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, T, C) contiguous rows -> (B, C, H, W) view in channels-last memory format."""
    b, _, c = y.shape
    return y.view(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd will record an op on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def row_weight(weight: Tensor, groups: int = 1) -> Tensor:
    """Conv weight (O, C / groups, kh, kw) -> (K * C, O) in the row im2col order (tap, channel).

    Grouped weights are expanded to the equivalent block-diagonal dense weight (the zeros add
    exact zeros).
    """
    o, cg, kh, kw = weight.shape
    if groups > 1:
        og = o // groups
        dense = weight.new_zeros(o, cg * groups, kh, kw)
        for g in range(groups):
            dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = weight[g * og:(g + 1) * og]
        weight = dense
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * weight.shape[1], o)


class RowGather:
    """A gather table prepared for row gathers: safe indices, padding taps and a block plan.

    Args:
        table: (T, K) shared by the batch, or (B, T, K) one per frame; values in [0, n_in],
            ``n_in`` = padding.
        n_in: input slots per frame.
        row_bytes: bytes of one input row (C * element size): decides the block size.
        block_bytes: largest column buffer.
        has_pad: whether any tap is padding (it depends only on the geometry and the output
            positions, so a layer knows it from its static table); None: find out (a device sync).
        min_rows: fewest output rows per block (unless that buffer would exceed ``FLOOR_BYTES``).
        frame_bytes: bytes per frame of the largest activation of the network the layer is in
            (default: this layer's input), which bounds the buffer.

    Block size: R output rows with R * K * row_bytes <= ``block_bytes`` and <= half of
    ``frames * frame_bytes`` (so the buffer never dominates the peak memory of a forward), at least
    ``min_rows`` unless that exceeds ``FLOOR_BYTES``.
    A shared table is gathered frame by frame: several whole frames per block when a frame's
    R >= T, else ranges of R output slots; padding taps are gathered from slot 0 and overwritten
    with ``index_fill_`` at precomputed rows. A per-frame table is flattened over the batch
    (slot + b * n_in) and gathered in blocks of R output rows; its padding taps are overwritten by
    a broadcast multiply / add.
    """

    FLOOR_BYTES = 32 << 10

    def __init__(self, table: Tensor, n_in: int, row_bytes: int, block_bytes: int = BLOCK_BYTES,
                 has_pad: bool | None = None, min_rows: int = MIN_BLOCK_ROWS,
                 frame_bytes: int | None = None) -> None:
        if table.dim() not in (2, 3):
            raise ValueError(f"RowGather: expected a table (T, K) or (B, T, K), got {tuple(table.shape)}")
        self._setup(int(n_in), *(int(v) for v in table.shape[-2:]), row_bytes, block_bytes, min_rows,
                    frame_bytes)
        self.per_frame = table.dim() == 3
        self.frames = int(table.shape[0]) if self.per_frame else 0
        pad = table >= self.n_in
        safe = table.masked_fill(pad, 0)
        self.has_pad = bool(pad.any()) if has_pad is None else bool(has_pad)
        if self.per_frame:
            offsets = torch.arange(self.frames, device=table.device).view(-1, 1, 1) * self.n_in
            self.index = (safe + offsets).reshape(-1)  # (B * T * K,) rows of the (B * N, C) input
            self.pad_mask = pad.reshape(-1, 1) if self.has_pad else None
            self.frames_per_block, self.frame_pad_rows = 0, None
            return
        self.index = safe.reshape(-1).contiguous()  # (T * K,)
        # padding taps as flat positions in (T * K): one sync, when a shared table is prepared
        self.pads = pad.reshape(-1).nonzero().view(-1) if self.has_pad else None
        self._block_pads: dict[tuple[str, int], Tensor] = {}

    def _setup(self, n_in: int, t: int, k: int, row_bytes: int, block_bytes: int, min_rows: int,
               frame_bytes: int | None) -> None:
        self.n_in, self.t, self.k = n_in, t, k
        self.per_row = max(1, k * row_bytes)
        self.frame_bytes = n_in * row_bytes if frame_bytes is None else int(frame_bytes)
        self.budget_rows = max(1, block_bytes // self.per_row)
        self.floor_rows = max(1, min(min_rows, self.FLOOR_BYTES // self.per_row))

    def block_rows(self, frames: int) -> int:
        """Output rows per block for a call on ``frames`` frames."""
        half = frames * self.frame_bytes // (2 * self.per_row)
        return max(1, min(self.budget_rows, max(self.floor_rows, half)))

    @classmethod
    def for_frames(cls, positions: Tensor, in_perm: Tensor | None, n_in: int, frames: int, row_bytes: int,
                   block_bytes: int = BLOCK_BYTES, has_pad: bool = True, min_rows: int = MIN_BLOCK_ROWS,
                   frame_bytes: int | None = None, pad_rows: Tensor | None = None) -> RowGather:
        """A per-frame row gather built straight from positions and input orders (rotation).

        Equivalent to ``RowGather(gather_table(positions, in_perm), ...)`` with the tables flattened
        over the batch, in one gather: the inverse input orders, shifted to the frame's rows and
        extended with a safe slot for padding, are read at the positions.

        Args:
            positions: natural input position per (output slot, tap), (T, K) or per frame (B, T, K);
                ``n_in`` marks padding.
            in_perm: input order (slot -> position) (N,) or per frame (B', N), B' in {1, B}; None
                = natural.
            frames: B.
            pad_rows: the padding taps of each frame as flat rows of its (T * K) columns, (B', P)
                with B' in {1, B} (every frame has the same number). With it, whole frames are
                gathered per block and padding is set with ``index_fill_`` (as for shared tables);
                without it, blocks of rows over the flattened batch and a broadcast multiply.
        """
        device = positions.device
        t, k = (int(v) for v in positions.shape[-2:])
        self = cls.__new__(cls)
        self._setup(int(n_in), t, k, row_bytes, block_bytes, min_rows, frame_bytes)
        self.per_frame, self.frames = True, frames
        self.has_pad = bool(has_pad)
        rows = self.block_rows(frames)
        aligned = t <= rows and (pad_rows is not None or not self.has_pad)
        self.frames_per_block = min(frames, rows // t) if aligned else 0
        if in_perm is None:
            inv = torch.arange(n_in, device=device).view(1, -1)
        else:
            inv = invert_torch(in_perm.to(device).view(-1, n_in))
        frame = torch.arange(frames, device=device).view(-1, 1)
        if aligned:  # rows of each frame within its block of frames
            frame = frame % self.frames_per_block
        inv = torch.cat([inv, inv.new_zeros(inv.shape[0], 1)], dim=1) + frame * n_in  # (B, N + 1)
        pos = positions.reshape(-1, t * k).expand(frames, t * k)
        self.index = torch.gather(inv, 1, pos).reshape(-1)
        self.pad_mask = None
        self.frame_pad_rows = None
        if aligned and self.has_pad:
            self.frame_pad_rows = (pad_rows.expand(frames, -1) + frame * (t * k)).contiguous()
        elif self.has_pad:
            self.pad_mask = (pos >= n_in).reshape(-1, 1)
        return self

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.n_in:
            raise ValueError(f"RowGather: expected rows (B, {self.n_in}, C), got {tuple(x.shape)}")
        if self.per_frame and self.frames != x.shape[0]:
            raise ValueError(f"RowGather: table for {self.frames} frames, input has {x.shape[0]}")

    def columns(self, x: Tensor, fill: float) -> Tensor:
        """All columns at once, differentiable: (B, N, C) -> (B * T, K * C)."""
        self._check(x)
        b, _, c = x.shape
        if self.per_frame:
            if self.frames_per_block:  # block-local rows: shift each frame to its own rows
                fb, tk = self.frames_per_block, self.t * self.k
                frame = torch.arange(b, device=x.device).view(-1, 1)
                index = (self.index.view(b, tk) + (frame - frame % fb) * self.n_in).reshape(-1)
            else:
                index = self.index
            cols = x.reshape(b * self.n_in, c).index_select(0, index)
            if self.pad_mask is not None:
                cols = cols.masked_fill(self.pad_mask, fill)
            if self.frame_pad_rows is not None:
                frame = torch.arange(b, device=x.device).view(-1, 1)
                rows = self.frame_pad_rows + (frame - frame % self.frames_per_block) * self.t * self.k
                cols = cols.index_fill(0, rows.reshape(-1), fill)
            return cols.view(b * self.t, self.k * c)
        cols = x.index_select(1, self.index)  # (B, T * K, C)
        if self.pads is not None:
            cols = cols.index_fill(1, self.pads, fill)
        return cols.reshape(b * self.t, self.k * c)

    def _frame_pads(self, frames: int) -> Tensor:
        """Padding rows of a block of ``frames`` whole frames, flat in (frames * T * K), frame-major."""
        key = ("frames", frames)
        if key not in self._block_pads:
            offsets = torch.arange(frames, device=self.pads.device).view(-1, 1) * (self.t * self.k)
            self._block_pads[key] = (self.pads.view(1, -1) + offsets).reshape(-1)
        return self._block_pads[key]

    def _slot_pads(self, rows: int) -> Tensor:
        """(blocks, P) padding rows of each block of ``rows`` output slots, local to the block,
        padded to one length with a scratch row (``rows * K``) that the block's finish never reads."""
        key = ("slots", rows)
        if key not in self._block_pads:
            k = self.k
            flat = self.pads.cpu().numpy()
            block = flat // (rows * k)
            n_blocks = -(-self.t // rows)
            counts = np.bincount(block, minlength=n_blocks)
            local = np.full((n_blocks, max(1, int(counts.max(initial=0)))), rows * k, np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            for i in range(n_blocks):
                local[i, :counts[i]] = flat[starts[i]:starts[i] + counts[i]] - i * rows * k
            self._block_pads[key] = torch.from_numpy(local).to(self.pads.device)
        return self._block_pads[key]

    def _pad_fix(self, fill: float, dtype: torch.dtype) -> Callable[[Tensor, slice], None]:
        """Sets the padding rows of a block of a per-frame gather to ``fill``. A broadcast multiply
        by 0/1 (fill 0) or add of 0/-inf (fill -inf) is an order of magnitude faster than a
        broadcast masked_fill_; gathered values are finite activations."""
        mask = self.pad_mask
        if fill == 0.0:
            keep = (~mask).to(dtype)
            return lambda cols, rows: cols.mul_(keep[rows])
        if fill == float("-inf"):
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, fill)
            return lambda cols, rows: cols.add_(bias[rows])
        return lambda cols, rows: cols.masked_fill_(mask[rows], fill)

    def run(self, x: Tensor, fill: float, finish: Callable[[Tensor, Tensor], None], out: Tensor) -> None:
        """Blocked gather (no autograd): for each block, ``finish(cols (r, K * C), out_rows (r, X))``.

        Args:
            x: (B, N, C) contiguous rows.
            fill: value of padding taps.
            finish: writes the block's result into ``out_rows`` (a contiguous view of ``out``).
            out: (B, T, X) contiguous output rows.
        """
        self._check(x)
        b, _, c = x.shape
        k, t = self.k, self.t
        width = out.shape[-1]
        rows = self.block_rows(b)
        if self.per_frame and self.frames_per_block:  # whole frames per block, block-local rows
            fb, tk = self.frames_per_block, t * k
            buf = x.new_empty(fb * tk, c)
            outs = out.view(b * t, width).split(fb * t)
            for i, (src, dst) in enumerate(zip(x.split(fb), outs, strict=True)):
                nb = src.shape[0]
                b0 = i * fb
                cols = buf if nb == fb else buf[:nb * tk]
                torch.index_select(src.reshape(nb * self.n_in, c), 0, self.index[b0 * tk:(b0 + nb) * tk],
                                   out=cols)
                if self.frame_pad_rows is not None:
                    cols.index_fill_(0, self.frame_pad_rows[b0:b0 + nb].view(-1), fill)
                finish(cols.view(nb * t, k * c), dst)
            return
        if self.per_frame:
            src = x.reshape(b * self.n_in, c)
            total = b * t
            rows = min(rows, total)
            buf = x.new_empty(rows * k, c)
            out2 = out.view(total, width)
            fix = None if self.pad_mask is None else self._pad_fix(fill, x.dtype)
            for r0 in range(0, total, rows):
                n = min(rows, total - r0)
                cols = buf[:n * k]
                torch.index_select(src, 0, self.index[r0 * k:(r0 + n) * k], out=cols)
                if fix is not None:
                    fix(cols, slice(r0 * k, (r0 + n) * k))
                finish(cols.view(n, k * c), out2[r0:r0 + n])
            return
        if t <= rows:  # whole frames per block
            fb = min(b, rows // t)
            buf = x.new_empty(fb * t * k, c)
            pads = self._frame_pads(fb) if self.pads is not None else None
            outs = out.view(b * t, width).split(fb * t)
            for src, dst in zip(x.split(fb), outs, strict=True):
                nb = src.shape[0]
                cols = buf if nb == fb else buf[:nb * t * k]
                torch.index_select(src, 1, self.index, out=cols.view(nb, t * k, c))
                if pads is not None:
                    cols.index_fill_(0, pads if nb == fb else pads[:nb * self.pads.shape[0]], fill)
                finish(cols.view(nb * t, k * c), dst)
            return
        buf = x.new_empty(rows * k + 1, c)  # + a scratch row for the padded pad lists
        pads = self._slot_pads(rows) if self.pads is not None else None
        for f in range(b):
            src = x[f]
            for i, t0 in enumerate(range(0, t, rows)):
                n = min(rows, t - t0)
                cols = buf[:n * k]
                torch.index_select(src, 0, self.index[t0 * k:(t0 + n) * k], out=cols)
                if pads is not None:
                    buf.index_fill_(0, pads[i], fill)
                finish(cols.view(n, k * c), out[f, t0:t0 + n])


def rows_conv2d(x: Tensor, gather: RowGather, weight_rows: Tensor, bias: Tensor | None = None) -> Tensor:
    """Keyed convolution on rows.

    Args:
        x: (B, N_in, C) slot rows (see :func:`to_rows`).
        gather: the layer's :class:`RowGather` (K taps).
        weight_rows: (K * C, O) from :func:`row_weight`; bias: (O,) or None.

    Returns:
        (B, T, O) output rows.
    """
    b = x.shape[0]
    o = weight_rows.shape[1]
    if needs_grad(x, weight_rows, bias):
        cols = gather.columns(x, 0.0)
        y = cols @ weight_rows if bias is None else torch.addmm(bias, cols, weight_rows)
        return y.view(b, gather.t, o)
    out = x.new_empty(b, gather.t, o)
    if bias is None:
        def finish(cols: Tensor, dst: Tensor) -> None:
            torch.mm(cols, weight_rows, out=dst)
    else:
        def finish(cols: Tensor, dst: Tensor) -> None:
            torch.addmm(bias, cols, weight_rows, out=dst)
    gather.run(x.contiguous(), 0.0, finish, out)
    return out


def rows_pool2d(x: Tensor, gather: RowGather, mode: str, divisor: Tensor | int | None = None) -> Tensor:
    """Keyed max or average pooling on rows: (B, N_in, C) -> (B, T, C).

    ``mode`` "max" (padding reads -inf) or "avg" (padding reads 0, then the sum is divided by
    ``divisor``, (T,) per output slot or an int).
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"rows_pool2d: mode: expected 'max' or 'avg', got {mode!r}")
    b, _, c = x.shape
    k, t = gather.k, gather.t
    fill = float("-inf") if mode == "max" else 0.0
    if needs_grad(x):
        cols = gather.columns(x, fill).view(b, t, k, c)
        y = cols.amax(2) if mode == "max" else cols.sum(2)
    else:
        y = x.new_empty(b, t, c)
        if mode == "max":
            def finish(cols: Tensor, dst: Tensor) -> None:
                torch.amax(cols.view(-1, k, c), dim=1, out=dst)
        else:
            def finish(cols: Tensor, dst: Tensor) -> None:
                torch.sum(cols.view(-1, k, c), dim=1, out=dst)
        gather.run(x.contiguous(), fill, finish, y)
    if mode == "avg":
        if isinstance(divisor, Tensor):  # (T,), or (B, T) for per-frame output orders
            div = divisor.to(y.dtype).view(-1, t, 1)
        else:
            div = divisor
        y = y / div if needs_grad(y) else y.div_(div)
    return y
