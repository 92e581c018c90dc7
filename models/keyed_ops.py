"""Keyed conv/pool as functions: geometry, gather tables, the gathered ops, table checks.

Conventions (slot order, gather tables ``G`` with a padding sentinel) are in :mod:`models.keyed`.
Everything here is a pure function of tensors and ints; the layers that hold the tables are in
:mod:`models.keyed_layers` and the whole-model conversion in :mod:`models.keyed`. The torch
permutation tables come from :mod:`models.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensor.keys import Key
from sensor.permutation import random_permutation
from sensor.readout_tables import check_frame_index

from .tables import invert_torch, random_permutation_torch, to_device

__all__ = [
    "IntPair",
    "as_pair",
    "avg_pool_divisor",
    "check_frame_perm",
    "check_static_perm",
    "conv_output_hw",
    "conv_padding",
    "gather_columns",
    "gather_table",
    "keyed_avg_pool2d",
    "keyed_conv2d",
    "keyed_max_pool2d",
    "layer_frame_perm",
    "layer_perm",
    "pool_output_hw",
    "position_table",
    "table_to_offsets",
]

IntPair = tuple[int, int]

_OUTSIDE = -2.0  # a sample position that reads 0 in deform_conv2d (anything <= -1 does)


def as_pair(value: int | Sequence[int], name: str) -> IntPair:
    """``value`` as an (h, w) pair of ints (an int is used for both); ValueError naming ``name``
    otherwise. Normalises kernel sizes, strides, paddings and dilations as torch layers accept them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Geometry and tables (pure functions)
# ----------------------------------------------------------------------------------------------


def conv_output_hw(in_hw: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                   dilation: IntPair, padding_end: IntPair | None = None) -> IntPair:
    """Output (H, W) of a conv with ``padding`` before and ``padding_end`` (default: same) after."""
    end = padding if padding_end is None else padding_end
    dims = zip(in_hw, kernel_size, stride, padding, end, dilation, strict=True)
    out = tuple((n + p0 + p1 - d * (k - 1) - 1) // s + 1 for n, k, s, p0, p1, d in dims)
    if min(out) < 1:
        raise ValueError(f"conv geometry: input {tuple(in_hw)} is too small for kernel {kernel_size}, "
                         f"dilation {dilation}, padding {padding} (output {out})")
    return out  # type: ignore[return-value]


def pool_output_hw(in_hw: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                   dilation: IntPair, ceil_mode: bool) -> IntPair:
    """Output (H, W) of max/avg pooling, with PyTorch's ceil_mode rule."""
    out = []
    for n, k, s, p, d in zip(in_hw, kernel_size, stride, padding, dilation, strict=True):
        o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
    if min(out) < 1:
        raise ValueError(f"pool geometry: input {tuple(in_hw)} is too small for kernel {kernel_size}"
                         f" (output {tuple(out)})")
    return (out[0], out[1])


def conv_padding(conv: nn.Conv2d) -> tuple[IntPair, IntPair]:
    """(padding before, padding after) of a Conv2d, resolving "valid" and "same"."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), (0, 0)
        # "same" (stride 1): PyTorch puts the odd extra padding at the end
        total = [d * (k - 1) for d, k in zip(as_pair(conv.dilation, "dilation"),
                                             as_pair(conv.kernel_size, "kernel_size"), strict=True)]
        before = (total[0] // 2, total[1] // 2)
        return before, (total[0] - before[0], total[1] - before[1])
    pad = as_pair(conv.padding, "padding")
    return pad, pad


def _out_positions(out_hw: IntPair, out_perm: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(qy, qx) of each output slot, each (T,) int64 (or (B, T) for per-frame orders (B, T))."""
    t = out_hw[0] * out_hw[1]
    q = torch.arange(t, device=device) if out_perm is None else out_perm.to(device)
    return q // out_hw[1], q % out_hw[1]


def position_table(in_hw: IntPair, out_hw: IntPair, kernel_size: IntPair, stride: IntPair,
                   padding: IntPair, dilation: IntPair, out_perm: Tensor | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Natural input position read by each (output slot, tap), ``N_in`` where it is padding.

    Args:
        in_hw, out_hw: input and output (H, W).
        kernel_size, stride, dilation: pairs; ``padding``: padding *before* each dimension.
        out_perm: (T,) output slot -> output position table, or (B, T) one per frame; None for
            natural order.
        device: where to build (default: ``out_perm``'s device, else CPU).

    Returns:
        (T, K) int64 with ``K = kh * kw`` taps in row-major order, values in [0, N_in]; (B, T, K)
        for per-frame output orders.
    """
    if device is None:
        device = out_perm.device if out_perm is not None else torch.device("cpu")
    (h, w), (kh, kw) = in_hw, kernel_size
    qy, qx = _out_positions(out_hw, out_perm, torch.device(device))
    ky = torch.arange(kh, device=qy.device).repeat_interleave(kw) * dilation[0]
    kx = torch.arange(kw, device=qy.device).repeat(kh) * dilation[1]
    uy = qy[..., None] * stride[0] - padding[0] + ky
    ux = qx[..., None] * stride[1] - padding[1] + kx
    inside = (uy >= 0) & (uy < h) & (ux >= 0) & (ux < w)
    return torch.where(inside, uy * w + ux, torch.full_like(uy, h * w))


def gather_table(positions: Tensor, in_perm: Tensor | None = None) -> Tensor:
    """Slot gather table ``G = pi_in^-1[positions]``, the sentinel ``N_in`` kept.

    Args:
        positions: (T, K) from :func:`position_table`, or (B, T, K) for per-frame output orders.
        in_perm: None (natural input), or (..., N_in) slot -> position tables, e.g. (N,),
            (C, N), (B, 1, N) or (B, C, N).

    Returns:
        (..., T, K) int64 for (T, K) positions. For (B, T, K) positions always per frame,
        (B, C', T, K): C' = 1 for no or an (N,) input order, else from a (C', N) or (B', C', N)
        order (B' in {1, B}).
    """
    per_frame = positions.dim() == 3
    if in_perm is None:
        return positions.unsqueeze(1) if per_frame else positions
    n = in_perm.shape[-1]
    inv = invert_torch(in_perm.to(positions.device))
    inv = torch.cat([inv, inv.new_full((*inv.shape[:-1], 1), n)], dim=-1)
    if not per_frame:
        return inv[..., positions]
    if inv.dim() == 1:
        return inv[positions].unsqueeze(1)
    b, t, k = positions.shape
    inv = inv.unsqueeze(0) if inv.dim() == 2 else inv
    if inv.dim() != 3 or inv.shape[0] not in (1, b):
        raise ValueError(f"gather_table: input order {tuple(in_perm.shape)} does not fit per-frame "
                         f"positions {tuple(positions.shape)}")
    c = inv.shape[1]
    idx = positions.reshape(b, 1, t * k).expand(b, c, t * k)
    return torch.gather(inv.expand(b, c, n + 1), 2, idx).view(b, c, t, k)


def avg_pool_divisor(in_hw: IntPair, out_hw: IntPair, kernel_size: IntPair, stride: IntPair,
                     padding: IntPair, count_include_pad: bool, out_perm: Tensor | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """(T,) int64 divisor of each output slot, exactly as ``F.avg_pool2d`` computes it ((B, T) for
    per-frame output orders (B, T)).

    The window is clipped to the padded input; ``count_include_pad`` counts padding inside it,
    otherwise only input positions count.
    """
    if device is None:
        device = out_perm.device if out_perm is not None else torch.device("cpu")
    qy, qx = _out_positions(out_hw, out_perm, torch.device(device))
    sizes = []
    for q, n, k, s, p in ((qy, in_hw[0], kernel_size[0], stride[0], padding[0]),
                          (qx, in_hw[1], kernel_size[1], stride[1], padding[1])):
        start = q * s - p
        end = torch.clamp(start + k, max=n + p)
        if count_include_pad:
            sizes.append(end - start)
        else:
            sizes.append(torch.clamp(end, max=n) - torch.clamp(start, min=0))
    return sizes[0] * sizes[1]


def gather_columns(x: Tensor, table: Tensor, pad_value: float = 0.0) -> Tensor:
    """Gather the taps of every output slot (keyed im2col).

    Args:
        x: (B, C, N) slot-ordered input.
        table: gather table with values in [0, N] (N = the padding sentinel), one of
            (T, K) shared; (C', T, K) per channel; (B', C', T, K) per frame (and channel),
            with C' in {1, C} and B' in {1, B}.
        pad_value: value read at the sentinel (0 for conv and avg pool, -inf for max pool).

    Returns:
        (B, C, K, T).
    """
    if x.dim() != 3:
        raise ValueError(f"gather_columns: expected x of shape (B, C, N), got {tuple(x.shape)}")
    b, c, _ = x.shape
    if table.dim() not in (2, 3, 4):
        raise ValueError(f"gather_columns: expected a table (T, K), (C, T, K) or (B, C, T, K), "
                         f"got {tuple(table.shape)}")
    t, k = table.shape[-2:]
    xp = F.pad(x, (0, 1), value=pad_value)
    idx = table.transpose(-1, -2)  # (..., K, T): columns come out in (K, T) order
    if table.dim() == 2:
        return xp.index_select(2, idx.reshape(-1)).view(b, c, k, t)
    lead = (1, *table.shape[:-2]) if table.dim() == 3 else tuple(table.shape[:-2])
    if lead[0] not in (1, b) or lead[1] not in (1, c):
        raise ValueError(f"gather_columns: table of shape {tuple(table.shape)} does not fit "
                         f"an input of batch {b} and {c} channels")
    idx = idx.reshape(*lead, k * t).expand(b, c, k * t)
    return torch.gather(xp, 2, idx).view(b, c, k, t)


def keyed_conv2d(x: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None = None,
                 groups: int = 1) -> Tensor:
    """Keyed convolution: gathered im2col then a (grouped) GEMM.

    Args:
        x: (B, C, N_in) slot-ordered input.
        table: gather table, see :func:`gather_columns`; K must be ``kh * kw``.
        weight: (O, C / groups, kh, kw); bias: (O,) or None.

    Returns:
        (B, O, T) slot-ordered output.
    """
    o, cg, kh, kw = weight.shape
    b, c, _ = x.shape
    if c != cg * groups:
        raise ValueError(f"keyed_conv2d: input has {c} channels, weight expects {cg} x {groups} groups")
    if table.shape[-1] != kh * kw:
        raise ValueError(f"keyed_conv2d: table has {table.shape[-1]} taps, kernel has {kh * kw}")
    cols = gather_columns(x, table, 0.0)  # (B, C, K, T)
    t = cols.shape[-1]
    cols = cols.view(b, groups, cg * kh * kw, t)
    y = torch.matmul(weight.reshape(groups, o // groups, cg * kh * kw), cols).reshape(b, o, t)
    return y if bias is None else y + bias[:, None]


def keyed_max_pool2d(x: Tensor, table: Tensor) -> Tensor:
    """Keyed max pooling: (B, C, N_in) -> (B, C, T); padding reads -inf."""
    return gather_columns(x, table, float("-inf")).amax(dim=2)


def keyed_avg_pool2d(x: Tensor, table: Tensor, divisor: Tensor | int) -> Tensor:
    """Keyed average pooling: (B, C, N_in) -> (B, C, T); padding reads 0, then / divisor (T,)."""
    s = gather_columns(x, table, 0.0).sum(dim=2)
    return s / (divisor.to(s.dtype) if isinstance(divisor, Tensor) else divisor)


def layer_perm(key: Key, name: str, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Output permutation (n,) of the layer called ``name``: seeded ``key.subkey("layer:<name>")``."""
    return random_permutation_torch(key.subkey(f"layer:{name}"), n, device)


def layer_frame_perm(key: Key, name: str, frame_indices: Sequence[int], n: int,
                     device: torch.device | str = "cpu") -> Tensor:
    """Per-frame output permutations (B, n) of the layer called ``name`` (key rotation).

    Frame ``i`` gets the permutation of ``key.subkey("layer:<name>/frame", frame_indices[i])``,
    the same frame counter the rotated readout uses; independent of :func:`layer_perm`'s static
    order (another HMAC label).
    """
    device = torch.device(device)
    subkeys = [key.subkey(f"layer:{name}/frame", check_frame_index(int(f))) for f in frame_indices]
    if not subkeys:
        return torch.empty((0, n), dtype=torch.int64, device=device)
    return to_device(np.stack([random_permutation(k, n) for k in subkeys]), device)


# ----------------------------------------------------------------------------------------------
# Permutation-table checks
# ----------------------------------------------------------------------------------------------


def _as_perm(perm: Tensor | np.ndarray, device: torch.device) -> Tensor:
    if isinstance(perm, np.ndarray):
        perm = torch.from_numpy(np.ascontiguousarray(perm))
    if not isinstance(perm, Tensor):
        raise TypeError(f"permutation table: expected a torch.Tensor or numpy array, "
                        f"got {type(perm).__name__}")
    if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise TypeError(f"permutation table: expected an integer dtype, got {perm.dtype}")
    return perm.to(device=device, dtype=torch.int64)


def check_static_perm(perm: Tensor | np.ndarray, channels: int, n: int, device: torch.device,
                       where: str) -> Tensor:
    """A build-time table (N,) or (C, N), fully checked to be permutations."""
    perm = _as_perm(perm, device)
    if perm.dim() == 1:
        ok = perm.shape[0] == n
    elif perm.dim() == 2:
        ok = perm.shape == (channels, n)
    else:
        ok = False
    if not ok:
        raise ValueError(f"{where}: expected a table of shape ({n},) or ({channels}, {n}), "
                         f"got {tuple(perm.shape)}")
    ref = torch.arange(n, device=device).expand_as(perm)
    if not torch.equal(torch.sort(perm, dim=-1).values, ref):
        raise ValueError(f"{where}: not a permutation of 0..{n - 1} (each row must hold every "
                         f"position exactly once)")
    return perm


def check_frame_perm(perm: Tensor | np.ndarray, batch: int, channels: int, n: int,
                device: torch.device) -> Tensor:
    """A call-time table (N,), (B, N) or (B, C, N) -> (B', C', N); only shapes are checked."""
    perm = _as_perm(perm, device)
    if perm.dim() == 1:
        perm = perm.view(1, 1, -1)
    elif perm.dim() == 2:
        perm = perm.unsqueeze(1)
    if perm.dim() != 3 or perm.shape[0] not in (1, batch) or perm.shape[1] not in (1, channels) \
            or perm.shape[2] != n:
        raise ValueError(f"input_perm: expected a per-frame table of shape ({batch}, {n}) or "
                         f"({batch}, {channels}, {n}) (or ({n},) for the whole batch), "
                         f"got {tuple(perm.shape)}")
    return perm


# ----------------------------------------------------------------------------------------------
# Tables as deformable-convolution offsets
# ----------------------------------------------------------------------------------------------


def table_to_offsets(G: Tensor | None, pi_in: Tensor | None, pi_out: Tensor | None,
                     in_hw: Sequence[int], out_hw: Sequence[int], kernel: int | tuple[int, int],
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     dilation: int | tuple[int, int] = 1, dtype: torch.dtype | None = None) -> Tensor:
    """Deformable-conv offsets that perform a keyed layer's gather (for :mod:`models.deform`).

    Statement. Let ``x`` (B, C, H_in, W_in) be a plain input, ``pi_in`` its input order and
    ``X = x.flatten(2)[..., pi_in].view(B, C, H_in, W_in)`` the protected input viewed as an
    image grid in slot order (slot ``s`` at row ``s // W_in``, column ``s % W_in``). Let ``G`` be
    the gather table of a keyed conv with input order ``pi_in`` and output order ``pi_out``
    (``KeyedConv2d.table``; ``G[t, j]`` = input slot of tap ``j`` of output slot ``t``, ``N_in`` for
    padding). With ``O = table_to_offsets(G, pi_in, pi_out, ...)`` expanded to batch B::

        deform_conv2d(X, O, w, b, stride, padding, dilation)  ==  F.conv2d(x, w, b, stride, padding, dilation)

    up to float reassociation: the offsets are indexed by *natural* output position, so the
    deformable conv undoes the input permutation while convolving and its output is in natural
    order. Consequently the keyed output (slot order) is
    ``keyed_conv(X) == deform_conv2d(X, O, ...).flatten(2)[..., pi_out]``. Every offset moves a
    tap from its regular position to the exact (integer) grid cell of its slot, so bilinear
    sampling reads that one value; a padding tap is sent to (-2, -2), outside the image, and
    reads 0. Per-channel input orders give one offset group per input channel.

    Args:
        G: (T, K) shared, (C, T, K) per input channel, or (B, C', T, K) per frame (C' in {1, C});
            None to build it from ``pi_in`` and ``pi_out``.
        pi_in: (N_in,) or (C, N_in) (or (B, C', N_in)) input order; only used when G is None.
        pi_out: (T,) output order (slot -> natural output position); None = natural.
        in_hw, out_hw: input and output (H, W).
        kernel, stride, padding, dilation: the layer's (symmetric padding).
        dtype: offset dtype (default: torch's default float dtype).

    Returns:
        (B', 2 * C' * K, H_out, W_out) with ``B' = 1`` unless G is per frame; ``C' = 1`` (one offset
        group) for a shared table, else one offset group per input channel. Expand the batch
        dimension to the input's before calling :func:`models.deform.deform_conv2d`.
    """
    kh, kw = as_pair(kernel, "kernel")
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    dh, dw = as_pair(dilation, "dilation")
    h_in, w_in = as_pair(tuple(in_hw), "in_hw")
    h_out, w_out = as_pair(tuple(out_hw), "out_hw")
    n_in, t, k = h_in * w_in, h_out * w_out, kh * kw
    if G is None:
        if pi_in is None:
            raise ValueError("table_to_offsets: give G or pi_in")
        positions = position_table((h_in, w_in), (h_out, w_out), (kh, kw), (sh, sw), (ph, pw),
                                   (dh, dw), pi_out, device=pi_in.device)
        G = gather_table(positions, pi_in)
    if G.dim() not in (2, 3, 4) or tuple(G.shape[-2:]) != (t, k):
        raise ValueError(f"table_to_offsets: G: expected (..., {t}, {k}) with 0-2 leading dims, "
                         f"got {tuple(G.shape)}")
    g4 = G.reshape(1, 1, t, k) if G.dim() == 2 else (G.unsqueeze(0) if G.dim() == 3 else G)
    dev = G.device
    if pi_out is not None:
        if tuple(pi_out.shape) != (t,):
            raise ValueError(f"table_to_offsets: pi_out: expected ({t},), got {tuple(pi_out.shape)}")
        inv_out = torch.empty_like(pi_out, device=dev)
        inv_out[pi_out.to(dev)] = torch.arange(t, device=dev)
        g4 = g4[:, :, inv_out, :]  # rows by natural output position
    dtype = dtype or torch.get_default_dtype()
    q = torch.arange(t, device=dev)
    base_y = (q // w_out * sh - ph)[:, None] + torch.arange(kh, device=dev).repeat_interleave(kw) * dh
    base_x = (q % w_out * sw - pw)[:, None] + torch.arange(kw, device=dev).repeat(kh) * dw
    pad = g4 >= n_in
    ty = torch.where(pad, _OUTSIDE, (g4 // w_in).to(dtype))
    tx = torch.where(pad, _OUTSIDE, (g4 % w_in).to(dtype))
    off = torch.stack([ty - base_y.to(dtype), tx - base_x.to(dtype)], dim=-1)  # (B', C', T, K, 2)
    b, c = off.shape[:2]
    return off.permute(0, 1, 3, 4, 2).reshape(b, c * k * 2, h_out, w_out).contiguous()
