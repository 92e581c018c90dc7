"""The front end: from the sensor's resolution to the model's, plain and keyed.

A real sensor has far more pixels than a classifier's input. The front end is an area resample:
OpenCV's ``INTER_AREA`` downscale of every channel (k x k binning when the factors are integers),
applied to the network input (:func:`pipeline.stream.inputs.network_input`: the mosaic, or the
four packed CFA planes, so quad/plane frames are binned per CFA plane).

* Plain side: :func:`area_resize` (two small weight matrices, :func:`area_weights`), the same for
  training, evaluation and inference on plain frames, so a model trained at 32x32 reads the
  front end's output of any sensor size.
* Keyed side: :class:`KeyedResize` takes the *protected* map in its readout order and writes the
  resampled map in a key-derived order (rotating per frame), never putting a value in natural
  order. Each output is a weighted sum of input values, so the layer is a scatter-add from input
  slots to output slots: ``y[dest[s]] += w[s] * x[s]`` (plus a short list of extra contributions
  of the input values that straddle two output cells when the factor is not an integer). The
  destination table is derived from the input order (the readout table) and the output order:
  ``dest[s] = pi_out^-1[cell(pi_in[s])]``; with rotation it is built per frame from the frame's
  readout table at the frame's size. Exact up to float summation order.

Per-frame tables on the CPU (:func:`frame_tables`, numba; :func:`frame_tables_numpy` its reference):
one pass over each frame's readout table computes ``dest`` with the output cell of position ``p`` from
two axis tables (``main_pos[p] = row_cell[p // W] + col_cell[p % W]``, in L1) instead of a random
read of an N-entry table, and the slots of the few positions the sparse list needs (``mark``) instead
of inverting the whole readout table. Bit for bit the tables the torch path builds (the path on other
devices); measured at 1920x1080 pixel readout into 28x28, batches of 8: 0.52 s of torch index_select,
scatter and gather per two batches before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor, nn

from .keyed_ops import IntPair, as_pair, check_frame_perm, check_static_perm
from .tables import invert_torch

__all__ = ["AreaTable", "KeyedResize", "area_contributions", "area_resize", "area_weights", "frame_tables",
           "frame_tables_numpy"]


def _axis_tab(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
    """(output index, input index, weight) of OpenCV's ``computeResizeAreaTab`` (downscale).

    Output ``o`` covers input ``[o * s, (o + 1) * s)``, ``s = n_in / n_out``; partial input cells
    at both ends are weighted by their covered fraction (dropped below 1e-3), every weight is
    divided by the cell width and rounded to float32, as OpenCV does.
    """
    scale = n_in / n_out
    tab = []
    for o in range(n_out):
        f1 = o * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s1, s2 = int(np.ceil(f1)), int(np.floor(f2))
        s2 = min(s2, n_in - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            tab.append((o, s1 - 1, float(np.float32((s1 - f1) / cell))))
        for s in range(s1, s2):
            tab.append((o, s, float(np.float32(1.0 / cell))))
        if f2 - s2 > 1e-3:
            tab.append((o, s2, float(np.float32(min(min(f2 - s2, 1.0), cell) / cell))))
    return tab


def _check_down(in_hw: IntPair, out_hw: IntPair) -> None:
    if any(o < 1 or o > i for i, o in zip(in_hw, out_hw, strict=True)):
        raise ValueError(f"area resize: expected a downscale to 1 <= out <= in, got {tuple(in_hw)} -> "
                         f"{tuple(out_hw)}")


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of one axis of an INTER_AREA downscale (rows sum to ~1)."""
    _check_down((n_in, 1), (n_out, 1))
    m = np.zeros((n_out, n_in))
    for o, i, a in _axis_tab(n_in, n_out):
        m[o, i] += a
    return m


def area_resize(x: Tensor, out_hw: Sequence[int]) -> Tensor:
    """INTER_AREA downscale of every channel (k x k binning for integer factors), the plain front end.

    Args:
        x: (B, C, H, W) float.
        out_hw: (h, w) with h <= H, w <= W.

    Returns:
        (B, C, h, w), equal to ``cv2.resize(x[b, c], (w, h), interpolation=cv2.INTER_AREA)`` up to
        float rounding.
    """
    if x.dim() != 4:
        raise ValueError(f"area_resize: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    h, w = as_pair(tuple(out_hw), "out_hw")
    ih, iw = x.shape[-2:]
    _check_down((ih, iw), (h, w))
    if (ih, iw) == (h, w):
        return x
    if ih % h == 0 and iw % w == 0:  # integer factors: binning
        return torch.nn.functional.avg_pool2d(x, (ih // h, iw // w))
    ry = torch.from_numpy(area_weights(ih, h)).to(x.device, x.dtype)
    rx = torch.from_numpy(area_weights(iw, w)).to(x.device, x.dtype)
    return torch.matmul(torch.matmul(ry, x), rx.t())


class AreaTable:
    """The contributions of each natural input position to the output cells, by position.

    Every input position ``p`` has a *main* contribution (output position ``main_pos[p]``, weight
    ``main_w[p]``); positions on a cell border of a non-integer factor also contribute to one to
    three more cells: ``extra_p[e]`` -> ``extra_pos[e]`` with ``extra_w[e]``. For the keyed layer
    the weights are split into one common weight ``uniform`` (the most frequent main weight) times
    the plain sum of the main contributions, plus a short *sparse* list (``sparse_p`` ->
    ``sparse_pos``, ``sparse_w``): the extras and, for positions whose main weight differs,
    ``main_w - uniform``. Integer binning has an empty sparse list.
    """

    def __init__(self, in_hw: IntPair, out_hw: IntPair) -> None:
        _check_down(in_hw, out_hw)
        self.in_hw, self.out_hw = in_hw, out_hw
        axes = []
        for n_in, n_out in zip(in_hw, out_hw, strict=True):
            first_o = np.full(n_in, -1, np.int64)
            first_a = np.zeros(n_in, np.float64)
            second_o = np.full(n_in, -1, np.int64)
            second_a = np.zeros(n_in, np.float64)
            for o, i, a in _axis_tab(n_in, n_out):
                if first_o[i] < 0:
                    first_o[i], first_a[i] = o, a
                elif first_o[i] == o:
                    first_a[i] += a
                else:
                    second_o[i], second_a[i] = o, a
            uncovered = first_o < 0  # an input cell OpenCV drops: contributes 0 to cell 0
            first_o[uncovered] = 0
            axes.append((first_o, first_a, second_o, second_a))
        (y0, ay0, y1, ay1), (x0, ax0, x1, ax1) = axes
        w = out_hw[1]
        self.row_cell, self.col_cell = y0 * w, x0.copy()  # main_pos[y * W + x] = row_cell[y] + col_cell[x]
        self.main_pos = (self.row_cell[:, None] + self.col_cell[None, :]).reshape(-1)
        self.main_w = (ay0[:, None] * ax0[None, :]).reshape(-1)
        extras_p, extras_pos, extras_w = [], [], []
        grid_p = np.arange(in_hw[0] * in_hw[1]).reshape(in_hw)
        for iy, (oy, ay) in enumerate([(y0, ay0), (y1, ay1)]):
            for ix, (ox, ax) in enumerate([(x0, ax0), (x1, ax1)]):
                if iy == 0 and ix == 0:
                    continue
                wgt = ay[:, None] * ax[None, :]
                ok = (oy[:, None] >= 0) & (ox[None, :] >= 0) & (wgt > 0)
                extras_p.append(grid_p[ok])
                extras_pos.append((oy[:, None] * w + ox[None, :])[ok])
                extras_w.append(wgt[ok])
        self.extra_p = np.concatenate(extras_p).astype(np.int64)
        self.extra_pos = np.concatenate(extras_pos).astype(np.int64)
        self.extra_w = np.concatenate(extras_w)
        values, counts = np.unique(self.main_w, return_counts=True)
        self.uniform = float(values[np.argmax(counts)])
        odd = np.flatnonzero(self.main_w != self.uniform)
        self.sparse_p = np.concatenate([self.extra_p, odd]).astype(np.int64)
        self.sparse_pos = np.concatenate([self.extra_pos, self.main_pos[odd]]).astype(np.int64)
        self.sparse_w = np.concatenate([self.extra_w, self.main_w[odd] - self.uniform])
        # the distinct sparse positions: mark[p] = their index u (-1 elsewhere), sparse_p = marked_p[sparse_u]
        self.marked_p, self.sparse_u = np.unique(self.sparse_p, return_inverse=True)
        self.mark = np.full(in_hw[0] * in_hw[1], -1, np.int32 if self.marked_p.size < 1 << 31 else np.int64)
        self.mark[self.marked_p] = np.arange(self.marked_p.size)


def frame_tables_numpy(perm: np.ndarray, main_pos: np.ndarray, inv_out: np.ndarray, marked_p: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`frame_tables`: per-frame slot tables of a keyed resize.

    Args:
        perm: (B', C', N) int64 input orders (slot -> natural position).
        main_pos: (N,) output cell of each position; inv_out: (B'', T) int64 output slot of each cell.
        marked_p: (U,) positions whose slots are wanted.

    Returns:
        dest (B, C', N) int64 = ``inv_out[b, main_pos[perm[b, c, s]]]`` (B = max(B', B'')), and
        slots (B', C', U) int64 with ``perm[b, c, slots[b, c, u]] == marked_p[u]``.
    """
    b = max(perm.shape[0], inv_out.shape[0])
    cells = main_pos[perm]  # (B', C', N)
    rows = np.arange(b)[:, None, None] if inv_out.shape[0] > 1 else 0
    dest = np.broadcast_to(inv_out[rows, np.broadcast_to(cells, (b, *cells.shape[1:]))], (b, *perm.shape[1:]))
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[2]), perm.shape), axis=2)
    return np.ascontiguousarray(dest, np.int64), np.ascontiguousarray(inv[:, :, marked_p], np.int64)


@numba.njit(nogil=True, cache=True, parallel=True)
def _frame_tables_nb(perm, row_cell, col_cell, inv_out, mark, n_marked, batch):  # pragma: no cover - numba
    b_in, c, n = perm.shape
    width = col_cell.size
    dest = np.empty((batch, c, n), np.int64)
    slots = np.full((b_in, c, n_marked), -1, np.int64)
    for job in numba.prange(batch * c):
        b, ch = job // c, job % c
        bi = b if b_in > 1 else 0
        bo = b if inv_out.shape[0] > 1 else 0
        own = b_in > 1 or b == 0  # this job also fills slots[bi, ch]
        for s in range(n):
            p = perm[bi, ch, s]
            r = np.uint32(p) // np.uint32(width)  # 32-bit division: N < 2**32 (sensor.readout_tables)
            dest[b, ch, s] = inv_out[bo, row_cell[r] + col_cell[np.int64(p) - np.int64(r) * width]]
            if own:
                u = mark[p]
                if u >= 0:
                    slots[bi, ch, u] = s
    return dest, slots


def frame_tables(perm: np.ndarray, row_cell: np.ndarray, col_cell: np.ndarray, inv_out: np.ndarray,
                 mark: np.ndarray, n_marked: int) -> tuple[np.ndarray, np.ndarray]:
    """Numba twin of :func:`frame_tables_numpy` (``main_pos[y * W + x] = row_cell[y] + col_cell[x]``,
    ``mark[marked_p[u]] = u``, -1 elsewhere): one pass over each frame's input order.

    Returns:
        dest (B, C', N) int64 and slots (B', C', U) int64.
    """
    perm = np.ascontiguousarray(perm, np.int64)
    inv_out = np.ascontiguousarray(inv_out, np.int64)
    if perm.ndim != 3 or inv_out.ndim != 2 or perm.shape[2] != row_cell.size * col_cell.size:
        raise ValueError(f"frame_tables: expected perm (B, C, {row_cell.size * col_cell.size}) and inv_out (B, T), "
                         f"got {perm.shape} and {inv_out.shape}")
    batch = max(perm.shape[0], inv_out.shape[0])
    if 1 not in (perm.shape[0], inv_out.shape[0]) and perm.shape[0] != inv_out.shape[0]:
        raise ValueError(f"frame_tables: batch sizes {perm.shape[0]} and {inv_out.shape[0]} differ")
    return _frame_tables_nb(perm, np.ascontiguousarray(row_cell, np.int64), np.ascontiguousarray(col_cell, np.int64),
                            inv_out, mark, int(n_marked), batch)


def area_contributions(in_hw: Sequence[int], out_hw: Sequence[int]) -> AreaTable:
    """:class:`AreaTable` of an (H, W) -> (h, w) INTER_AREA downscale."""
    return AreaTable(as_pair(tuple(in_hw), "in_hw"), as_pair(tuple(out_hw), "out_hw"))


class KeyedResize(nn.Module):
    """Keyed INTER_AREA downscale (integer factors: k x k binning) of a protected map.

    Args:
        in_hw: (H, W) of the protected map (the network input at the sensor's resolution).
        out_hw: (h, w) of the model input.
        in_perm: static input order (N,) or per channel (C, N) (the readout's plane tables).
        out_perm: output order (T,) (slot -> natural output position), key-derived.
        frame_out: name of this layer's rotating order (see :class:`models.keyed_layers.FrameOrders`);
            None = always ``out_perm``.
        device: where the tables live.

    ``y[dest[s]] += x[s]`` over all input slots, times the common weight, plus the sparse
    contributions ``y[sparse_dest[e]] += sparse_w[e] * x[sparse_src[e]]`` (:class:`AreaTable`).
    Buffers (non-persistent, the tables are the key): ``dest`` (C', N), ``sparse_src`` (C', E),
    ``sparse_dest`` (E,), and the position-space tables the per-frame builds start from.

    Shape:
        (B, C, H, W) slot grid or (B, C, N) -> (B, C, h, w) slot grid in the output order.
        ``forward(x, input_perm)`` takes per-frame input orders (B, N) or (B, C, N) (rotation).
    """

    takes_input_perm = True
    entry = True

    def __init__(self, in_hw: Sequence[int], out_hw: Sequence[int], in_perm: Tensor | np.ndarray,
                 out_perm: Tensor, frame_out: str | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_hw = as_pair(tuple(in_hw), "in_hw")
        self.out_hw = as_pair(tuple(out_hw), "out_hw")
        n, t = self.in_hw[0] * self.in_hw[1], self.out_hw[0] * self.out_hw[1]
        device = torch.device(device) if device is not None else torch.device("cpu")
        area = AreaTable(self.in_hw, self.out_hw)
        self.weight = area.uniform
        self.binning = area.sparse_p.size == 0
        self.frame_out = frame_out
        self.frame_orders = None
        in_perm = torch.as_tensor(in_perm)
        channels = in_perm.shape[0] if in_perm.dim() == 2 else 1
        in_perm = check_static_perm(in_perm, channels, n, device, "KeyedResize: in_perm")
        out_perm = out_perm.to(device=device, dtype=torch.int64)
        if tuple(out_perm.shape) != (t,):
            raise ValueError(f"KeyedResize: out_perm: expected ({t},), got {tuple(out_perm.shape)}")

        def buf(name: str, value: np.ndarray | Tensor, dtype: torch.dtype = torch.int64) -> None:
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            self.register_buffer(name, value.to(device, dtype), persistent=False)

        buf("out_perm", out_perm)
        buf("main_pos", area.main_pos)
        buf("sparse_p", area.sparse_p)
        buf("sparse_pos", area.sparse_pos)
        buf("sparse_w", area.sparse_w, torch.get_default_dtype())
        buf("in_perm", in_perm)
        # geometry only (no key): what the CPU path (frame_tables) reads, not the whole AreaTable
        self._row_cell, self._col_cell = area.row_cell, area.col_cell
        self._mark, self._n_marked, self._sparse_u = area.mark, area.marked_p.size, area.sparse_u
        dest, sparse_src, sparse_dest = self._tables(in_perm.view(1, -1, n), out_perm.view(1, t))
        buf("dest", dest[0])
        buf("sparse_src", sparse_src[0])
        buf("sparse_dest", sparse_dest[0])

    def _tables(self, in_perm: Tensor, out_perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slot tables for input orders (B', C', N) and output orders (B'', T): dest (B, C', N),
        sparse_src (B, C', E), sparse_dest (B, E) (B = max(B', B'')). On the CPU built by
        :func:`frame_tables` (one pass per frame), elsewhere by torch ops (:meth:`_tables_torch`); the
        same tables."""
        if in_perm.device.type != "cpu":
            return self._tables_torch(in_perm, out_perm)
        b = max(in_perm.shape[0], out_perm.shape[0])
        c = in_perm.shape[1]
        inv_out = invert_torch(out_perm)  # (B'', T)
        dest, slots = frame_tables(in_perm.numpy(), self._row_cell, self._col_cell, inv_out.numpy(), self._mark,
                                   self._n_marked)
        if self.sparse_p.numel():
            sparse_src = torch.from_numpy(slots[:, :, self._sparse_u]).expand(b, c, -1)
            sparse_dest = inv_out.index_select(1, self.sparse_pos).expand(b, -1)
        else:
            sparse_src = in_perm.new_zeros(b, c, 0)
            sparse_dest = in_perm.new_zeros(b, 0)
        return torch.from_numpy(dest), sparse_src, sparse_dest

    def _tables_torch(self, in_perm: Tensor, out_perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_tables` with torch ops, on any device (the reference of the CPU path)."""
        b = max(in_perm.shape[0], out_perm.shape[0])
        c, n = in_perm.shape[1:]
        inv_out = invert_torch(out_perm)  # (B'', T)
        cell = self.main_pos.index_select(0, in_perm.reshape(-1)).view(in_perm.shape)
        if inv_out.shape[0] == 1:
            dest = inv_out[0].index_select(0, cell.reshape(-1)).view(cell.shape).expand(b, c, n)
        else:
            dest = torch.gather(inv_out.unsqueeze(1).expand(b, c, -1), 2, cell.expand(b, c, n))
        if self.sparse_p.numel():
            inv_in = invert_torch(in_perm)  # (B', C', N): slot of each position
            sparse_src = inv_in.index_select(2, self.sparse_p).expand(b, c, -1)
            sparse_dest = inv_out.index_select(1, self.sparse_pos).expand(b, -1)
        else:
            sparse_src = in_perm.new_zeros(b, c, 0)
            sparse_dest = in_perm.new_zeros(b, 0)
        return dest, sparse_src, sparse_dest

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        h, w = self.in_hw
        n, t = h * w, self.out_hw[0] * self.out_hw[1]
        if x.dim() == 4 and tuple(x.shape[2:]) == (h, w):
            x = x.reshape(x.shape[0], x.shape[1], n)
        if x.dim() != 3 or x.shape[2] != n:
            raise ValueError(f"KeyedResize: expected a (B, C, {h}, {w}) slot grid or (B, C, {n}), "
                             f"got {tuple(x.shape)}")
        b, c = x.shape[:2]
        orders = self.frame_orders.current() if self.frame_orders is not None else None
        frame_out = orders.get(self.frame_out) if orders and self.frame_out else None
        if input_perm is None and frame_out is None:
            tables = self.dest.unsqueeze(0), self.sparse_src.unsqueeze(0), self.sparse_dest.unsqueeze(0)
        else:
            perm = (check_frame_perm(input_perm, b, c, n, self.dest.device) if input_perm is not None
                    else self.in_perm.view(1, -1, n))
            tables = self._tables(perm, frame_out if frame_out is not None else self.out_perm.view(1, t))
        return self._grid(self._scatter(x, *tables))

    def _scatter(self, x: Tensor, dest: Tensor, sparse_src: Tensor, sparse_dest: Tensor) -> Tensor:
        """Scatter-add (B, C, N) -> (B, C, T) with slot tables of leading dims (B' or 1, C' or 1)."""
        b, c, n = x.shape
        y = x.new_zeros(b, c, self.out_hw[0] * self.out_hw[1])
        y.scatter_add_(2, dest.expand(b, c, n), x)
        y.mul_(self.weight)
        e = sparse_dest.shape[-1]
        if e:
            src = torch.gather(x, 2, sparse_src.expand(b, c, e)) * self.sparse_w.to(x.dtype)
            y.scatter_add_(2, sparse_dest.unsqueeze(1).expand(b, c, e), src)
        return y

    def _grid(self, y: Tensor) -> Tensor:
        return y.view(y.shape[0], y.shape[1], *self.out_hw)

    def extra_repr(self) -> str:
        return (f"in_hw={self.in_hw}, out_hw={self.out_hw}, {'binning' if self.binning else 'area'}"
                f"{f', frame_out={self.frame_out}' if self.frame_out else ''}")
