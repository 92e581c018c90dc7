"""Keyed layers: convolution and pooling on spatially permuted feature maps (Perez et al. 2024).

Conventions (see :mod:`sensor.permutation`): a map with ``N = H * W`` positions is stored in
*slot order* under a table ``pi`` of shape (N,): slot ``s`` holds position ``pi[s]``, i.e.
``x_prot[:, :, s] = x.flatten(2)[:, :, pi[s]]``. Inside a network a protected map travels as a
4-d tensor (B, C, H, W) that is the slot vector viewed as an image grid in slot order (slot ``s``
at row ``s // W``, column ``s % W``), so element-wise layers (BatchNorm2d, ReLU, Dropout) run
unchanged on it.

A keyed conv/pool layer is described by one integer *gather table* ``G`` of shape (T, K)
(``T`` output slots, ``K = kh * kw`` taps): for output slot ``t`` at position ``q = pi_out[t]`` =
(qy, qx) and tap ``j`` at displacement ``(dy, dx)``, the input position is
``u = q * stride - padding + (dy, dx) * dilation``; ``G[t, j] = pi_in^-1(u)`` when ``u`` lies in the
input and ``N_in`` (a sentinel pointing at an appended padding column) otherwise. Then

    conv:  y_prot[:, :, t] = sum_j W_j @ x_prot[:, :, G[t, j]] + b      (im2col + GEMM)
    pool:  y_prot[:, :, t] = reduce_j x_prot[:, :, G[t, j]]             (max: pad -inf, avg: 0)

which equals the plain layer up to float reassociation. Tables may also be per input channel
(C, T, K) (each channel its own input permutation, the "plane" readout), per frame
(B, 1, T, K) or per frame and channel (B, C, T, K).

:func:`keyed` turns a supported plain model (:mod:`models.plain`) into a keyed twin:

* ``mode="fused"``: every conv and pool is keyed and writes its own key-derived output order
  (``key.seed("layer:<module name>")``), so no feature map is ever in natural order. A residual
  add needs both operands in one order: a block's second conv writes the order of its shortcut
  (the block input for an identity shortcut, a fresh order shared with the 1x1 ``downsample``).
  Global average pooling is order-free; a Flatten of a larger map permutes the next Linear's
  columns (exact).
* ``mode="fast"``: only the first layer is keyed; it gathers the protected frame and writes its
  output in natural order, after which the plain dense model runs. Faster (dense convs), but the
  feature maps after the first layer are NOT protected.

The twin shares the plain model's Parameter and BatchNorm buffer objects (fine-tuning the twin
trains the plain model) and its ``state_dict`` has exactly the plain model's keys: gather tables
are non-persistent buffers, moved by ``.to(device)`` and never saved.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensor.keys import Key

from .plain import PreActBlock
from .tables import invert_torch, random_permutation_torch

__all__ = [
    "KeyedAvgPool2d",
    "KeyedConv2d",
    "KeyedLinear",
    "KeyedMaxPool2d",
    "KeyedNet",
    "KeyedPreActBlock",
    "KeyedSequential",
    "MODES",
    "avg_pool_divisor",
    "conv_output_hw",
    "gather_columns",
    "gather_table",
    "keyed",
    "keyed_avg_pool2d",
    "keyed_conv2d",
    "keyed_max_pool2d",
    "layer_perm",
    "pool_output_hw",
    "position_table",
]

MODES: tuple[str, ...] = ("fused", "fast")

IntPair = tuple[int, int]


def _pair(value: int | Sequence[int], name: str) -> IntPair:
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


def _conv_padding(conv: nn.Conv2d) -> tuple[IntPair, IntPair]:
    """(padding before, padding after) of a Conv2d, resolving "valid" and "same"."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), (0, 0)
        # "same" (stride 1): PyTorch puts the odd extra padding at the end
        total = [d * (k - 1) for d, k in zip(_pair(conv.dilation, "dilation"),
                                             _pair(conv.kernel_size, "kernel_size"), strict=True)]
        before = (total[0] // 2, total[1] // 2)
        return before, (total[0] - before[0], total[1] - before[1])
    pad = _pair(conv.padding, "padding")
    return pad, pad


def _spatial_out_hw(module: nn.Module, in_hw: IntPair) -> IntPair:
    """Output (H, W) of a Conv2d, MaxPool2d or AvgPool2d on an ``in_hw`` input."""
    if isinstance(module, nn.Conv2d):
        before, end = _conv_padding(module)
        return conv_output_hw(in_hw, _pair(module.kernel_size, "kernel_size"),
                              _pair(module.stride, "stride"), before,
                              _pair(module.dilation, "dilation"), end)
    stride = module.stride if module.stride is not None else module.kernel_size
    dilation = module.dilation if isinstance(module, nn.MaxPool2d) else 1
    return pool_output_hw(in_hw, _pair(module.kernel_size, "kernel_size"), _pair(stride, "stride"),
                          _pair(module.padding, "padding"), _pair(dilation, "dilation"),
                          bool(module.ceil_mode))


def _out_positions(out_hw: IntPair, out_perm: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(qy, qx) of each output slot, each (T,) int64."""
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
        out_perm: (T,) output slot -> output position table; None for natural order.
        device: where to build (default: ``out_perm``'s device, else CPU).

    Returns:
        (T, K) int64 with ``K = kh * kw`` taps in row-major order, values in [0, N_in].
    """
    if device is None:
        device = out_perm.device if out_perm is not None else torch.device("cpu")
    (h, w), (kh, kw) = in_hw, kernel_size
    qy, qx = _out_positions(out_hw, out_perm, torch.device(device))
    ky = torch.arange(kh, device=qy.device).repeat_interleave(kw) * dilation[0]
    kx = torch.arange(kw, device=qy.device).repeat(kh) * dilation[1]
    uy = qy[:, None] * stride[0] - padding[0] + ky[None, :]
    ux = qx[:, None] * stride[1] - padding[1] + kx[None, :]
    inside = (uy >= 0) & (uy < h) & (ux >= 0) & (ux < w)
    return torch.where(inside, uy * w + ux, torch.full_like(uy, h * w))


def gather_table(positions: Tensor, in_perm: Tensor | None = None) -> Tensor:
    """Slot gather table ``G = pi_in^-1[positions]``, the sentinel ``N_in`` kept.

    Args:
        positions: (T, K) from :func:`position_table`.
        in_perm: None (natural input), or (..., N_in) slot -> position tables, e.g. (N,),
            (C, N), (B, 1, N) or (B, C, N).

    Returns:
        (..., T, K) int64.
    """
    if in_perm is None:
        return positions
    n = in_perm.shape[-1]
    inv = invert_torch(in_perm.to(positions.device))
    inv = torch.cat([inv, inv.new_full((*inv.shape[:-1], 1), n)], dim=-1)
    return inv[..., positions]


def avg_pool_divisor(in_hw: IntPair, out_hw: IntPair, kernel_size: IntPair, stride: IntPair,
                     padding: IntPair, count_include_pad: bool, out_perm: Tensor | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """(T,) int64 divisor of each output slot, exactly as ``F.avg_pool2d`` computes it.

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
    """Output permutation (n,) of the layer called ``name``: seeded ``key.seed("layer:<name>")``."""
    return random_permutation_torch(key.seed(f"layer:{name}"), n, device)


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


def _check_static_perm(perm: Tensor | np.ndarray, channels: int, n: int, device: torch.device,
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


def _frame_perm(perm: Tensor | np.ndarray, batch: int, channels: int, n: int,
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
# Layers
# ----------------------------------------------------------------------------------------------


class _KeyedSpatial(nn.Module):
    """Shared part of keyed conv/pool layers: geometry, tables and per-frame rotation.

    Buffers (all ``persistent=False``): ``table`` (T, K) or (C, T, K) gather table of the static
    input order; ``out_perm`` (T,) output slot -> position; ``positions`` (T, K) natural input
    position per tap (entry layer only: per-frame tables are built from it at call time).
    """

    table: Tensor
    out_perm: Tensor

    def _setup(self, in_hw: IntPair, out_hw: IntPair, kernel_size: IntPair, stride: IntPair,
               padding: IntPair, dilation: IntPair, in_perm: Tensor | None, out_perm: Tensor | None,
               entry: bool, device: torch.device) -> None:
        self.in_hw, self.out_hw = in_hw, out_hw
        n_in, t = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
        if in_perm is not None and (in_perm.dim() not in (1, 2) or in_perm.shape[-1] != n_in):
            raise ValueError(f"{type(self).__name__}: in_perm: expected ({n_in},) or (C, {n_in}), "
                             f"got {tuple(in_perm.shape)}")
        if out_perm is not None and tuple(out_perm.shape) != (t,):
            raise ValueError(f"{type(self).__name__}: out_perm: expected ({t},), got "
                             f"{tuple(out_perm.shape)}")
        in_perm = None if in_perm is None else in_perm.to(device=device, dtype=torch.int64)
        out_perm = None if out_perm is None else out_perm.to(device=device, dtype=torch.int64)
        positions = position_table(in_hw, out_hw, kernel_size, stride, padding, dilation, out_perm,
                                   device)
        self.register_buffer("table", gather_table(positions, in_perm), persistent=False)
        self.register_buffer("out_perm", torch.arange(t, device=device) if out_perm is None
                             else out_perm, persistent=False)
        self.entry = entry
        self.takes_input_perm = entry
        self.register_buffer("positions", positions if entry else None, persistent=False)

    def _flat(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != tuple(self.in_hw):
            raise ValueError(f"{type(self).__name__}: expected a (B, C, {self.in_hw[0]}, "
                             f"{self.in_hw[1]}) slot grid, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], x.shape[1], -1)

    def _table(self, x: Tensor, input_perm: Tensor | np.ndarray | None) -> Tensor:
        if input_perm is None:
            return self.table
        if self.positions is None:
            raise RuntimeError(f"{type(self).__name__}: only the entry layer takes a per-frame "
                               f"input_perm")
        perm = _frame_perm(input_perm, x.shape[0], x.shape[1], self.in_hw[0] * self.in_hw[1],
                           self.positions.device)
        return gather_table(self.positions, perm)  # (B', C', T, K)

    def _grid(self, y: Tensor) -> Tensor:
        return y.view(y.shape[0], y.shape[1], *self.out_hw)

    def _geometry_repr(self) -> str:
        return (f"in_hw={tuple(self.in_hw)}, out_hw={tuple(self.out_hw)}, kernel_size={self.kernel_size}"
                f", stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
                f"{', entry' if self.entry else ''}")


class KeyedConv2d(_KeyedSpatial):
    """Keyed twin of an :class:`nn.Conv2d`, sharing its ``weight`` and ``bias`` Parameters.

    Args:
        conv: the plain layer (``padding_mode="zeros"``; int, pair, "valid" or "same" padding).
        in_hw: input (H, W).
        in_perm: input order, (N_in,) or per input channel (C_in, N_in); None = natural.
        out_perm: output order (T,); None = natural.
        entry: first layer of a keyed net: keeps the position table so that ``forward`` can take a
            per-frame ``input_perm``.
        device: where the tables live (default: the weight's device).

    Shape:
        (B, C_in, H_in, W_in) slot grid -> (B, C_out, H_out, W_out) slot grid.
    """

    def __init__(self, conv: nn.Conv2d, in_hw: Sequence[int], in_perm: Tensor | None = None,
                 out_perm: Tensor | None = None, entry: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"KeyedConv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"KeyedConv2d: padding_mode {conv.padding_mode!r} is not "
                                      f"supported (only 'zeros')")
        in_hw = _pair(tuple(in_hw), "in_hw")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size, "kernel_size")
        self.stride = _pair(conv.stride, "stride")
        self.dilation = _pair(conv.dilation, "dilation")
        self.groups = conv.groups
        before, end = _conv_padding(conv)
        self.padding, self.padding_end = before, end
        out_hw = conv_output_hw(in_hw, self.kernel_size, self.stride, before, self.dilation, end)
        self.weight = conv.weight
        if conv.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = conv.bias
        if in_perm is not None and in_perm.dim() == 2 and in_perm.shape[0] != self.in_channels:
            raise ValueError(f"KeyedConv2d: per-channel in_perm has {in_perm.shape[0]} rows, the conv "
                             f"has {self.in_channels} input channels")
        self._setup(in_hw, out_hw, self.kernel_size, self.stride, before, self.dilation, in_perm,
                    out_perm, entry, torch.device(device) if device is not None else conv.weight.device)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        """``input_perm`` (entry layer only): per-frame input order (B, N) or (B, C, N)."""
        table = self._table(x, input_perm)
        return self._grid(keyed_conv2d(self._flat(x), table, self.weight, self.bias, self.groups))

    def to_offsets(self, dtype: torch.dtype | None = None) -> Tensor:
        """This layer's static table as deformable-conv offsets (:func:`models.deform.table_to_offsets`)."""
        from .deform import table_to_offsets

        if self.padding != self.padding_end:
            raise NotImplementedError("to_offsets: asymmetric ('same' with an even kernel) padding "
                                      "cannot be expressed by deform_conv2d")
        return table_to_offsets(self.table, None, self.out_perm, self.in_hw, self.out_hw,
                                self.kernel_size, self.stride, self.padding, self.dilation, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
                f"bias={self.bias is not None}, {self._geometry_repr()}")


class KeyedMaxPool2d(_KeyedSpatial):
    """Keyed twin of an :class:`nn.MaxPool2d` (padding reads -inf, ceil_mode and dilation honoured).

    Shape:
        (B, C, H_in, W_in) slot grid -> (B, C, H_out, W_out) slot grid.
    """

    def __init__(self, pool: nn.MaxPool2d, in_hw: Sequence[int], in_perm: Tensor | None = None,
                 out_perm: Tensor | None = None, entry: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"KeyedMaxPool2d: expected an nn.MaxPool2d, got {type(pool).__name__}")
        if pool.return_indices:
            raise NotImplementedError("KeyedMaxPool2d: return_indices=True is not supported")
        in_hw = _pair(tuple(in_hw), "in_hw")
        self.kernel_size = _pair(pool.kernel_size, "kernel_size")
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size, "stride")
        self.padding = _pair(pool.padding, "padding")
        self.dilation = _pair(pool.dilation, "dilation")
        self.ceil_mode = bool(pool.ceil_mode)
        out_hw = pool_output_hw(in_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        device = torch.device(device) if device is not None else (
            in_perm.device if in_perm is not None else torch.device("cpu"))
        self._setup(in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                    in_perm, out_perm, entry, device)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        return self._grid(keyed_max_pool2d(self._flat(x), self._table(x, input_perm)))

    def extra_repr(self) -> str:
        return f"ceil_mode={self.ceil_mode}, {self._geometry_repr()}"


class KeyedAvgPool2d(_KeyedSpatial):
    """Keyed twin of an :class:`nn.AvgPool2d` (count_include_pad, ceil_mode, divisor_override).

    Extra buffer ``divisor`` (T,) int64 in output slot order (non-persistent).

    Shape:
        (B, C, H_in, W_in) slot grid -> (B, C, H_out, W_out) slot grid.
    """

    divisor: Tensor

    def __init__(self, pool: nn.AvgPool2d, in_hw: Sequence[int], in_perm: Tensor | None = None,
                 out_perm: Tensor | None = None, entry: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(pool, nn.AvgPool2d):
            raise TypeError(f"KeyedAvgPool2d: expected an nn.AvgPool2d, got {type(pool).__name__}")
        in_hw = _pair(tuple(in_hw), "in_hw")
        self.kernel_size = _pair(pool.kernel_size, "kernel_size")
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size, "stride")
        self.padding = _pair(pool.padding, "padding")
        self.dilation = (1, 1)
        self.ceil_mode = bool(pool.ceil_mode)
        self.count_include_pad = bool(pool.count_include_pad)
        self.divisor_override = pool.divisor_override
        out_hw = pool_output_hw(in_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        device = torch.device(device) if device is not None else (
            in_perm.device if in_perm is not None else torch.device("cpu"))
        self._setup(in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                    in_perm, out_perm, entry, device)
        self.register_buffer("divisor", avg_pool_divisor(
            in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.count_include_pad,
            self.out_perm, device), persistent=False)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        divisor = self.divisor if not self.divisor_override else int(self.divisor_override)
        return self._grid(keyed_avg_pool2d(self._flat(x), self._table(x, input_perm), divisor))

    def extra_repr(self) -> str:
        return (f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}, "
                f"divisor_override={self.divisor_override}, {self._geometry_repr()}")


class KeyedLinear(nn.Module):
    """A Linear after a Flatten of a permuted map: same Parameters, columns read through a table.

    ``columns`` (in_features,) int64, non-persistent: ``y = x @ W[:, columns].T + b``. After
    flattening a (C, N) map in slot order ``pi``, ``columns[c * N + s] = c * N + pi[s]``.
    """

    columns: Tensor

    def __init__(self, linear: nn.Linear, columns: Tensor) -> None:
        super().__init__()
        if tuple(columns.shape) != (linear.in_features,):
            raise ValueError(f"KeyedLinear: columns: expected ({linear.in_features},), got "
                             f"{tuple(columns.shape)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = linear.bias
        self.register_buffer("columns", columns.to(device=linear.weight.device, dtype=torch.int64),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.index_select(1, self.columns), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, permuted columns"


class KeyedSequential(nn.Sequential):
    """Sequential container whose ``forward`` routes a per-frame ``input_perm`` to its entry child."""

    takes_input_perm: bool = False

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        for module in self:
            if input_perm is not None and getattr(module, "takes_input_perm", False):
                x = module(x, input_perm)
            else:
                x = module(x)
        return x


class KeyedPreActBlock(nn.Module):
    """Keyed twin of :class:`models.plain.PreActBlock` (same child names, same op order).

    ``conv2`` writes the slot order of the shortcut: the block input's for an identity
    shortcut, or the order shared with the keyed 1x1 ``downsample``.
    """

    def __init__(self, block: PreActBlock, conv1: nn.Module, conv2: nn.Module,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        # same registration order as PreActBlock, so state_dict keys come in the same order
        self.bn1, self.relu, self.conv1 = block.bn1, block.relu, conv1
        self.bn2, self.conv2, self.downsample = block.bn2, conv2, downsample
        self.stride = block.stride

    forward = PreActBlock.forward  # the same computation; the keyed convs keep both branches in one order


# ----------------------------------------------------------------------------------------------
# Whole-model conversion
# ----------------------------------------------------------------------------------------------

# Layers that act on each element (or each channel as a whole): any slot order passes through.
_ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Identity)
# Of those, the ones that stay exact on a flattened vector whose columns are permuted.
_ELEMENTWISE_FLAT = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                     nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Identity)


@dataclass
class _Flow:
    """Order state of the activation between two layers during conversion."""

    hw: IntPair
    channels: int
    perm: Tensor | None  # (N,) or (C, N) slot table; None = natural order
    columns: Tensor | None = None  # after a Flatten of a permuted map: column table


@dataclass
class _Ctx:
    key: Key
    mode: str
    device: torch.device
    entry_done: bool = False
    n_conv: int = 0
    n_pool: int = 0


def _unsupported(name: str, module: nn.Module, why: str = "") -> NotImplementedError:
    return NotImplementedError(f"keyed: layer {name or '<root>'} ({type(module).__name__}) is not "
                               f"supported{': ' + why if why else ''}")


def _keyed_spatial(module: nn.Module, name: str, flow: _Flow, ctx: _Ctx,
                   out_perm: Tensor | None | str = "fresh") -> tuple[nn.Module, _Flow]:
    """Key one conv or pool. ``out_perm="fresh"`` derives a new order from the key (fused mode)."""
    entry = not ctx.entry_done
    if isinstance(flow.perm, Tensor) and flow.perm.dim() == 2 and not entry:
        raise _unsupported(name, module, "per-channel orders are only supported at the entry layer")
    if isinstance(module, nn.Conv2d):
        out_channels = module.out_channels
        if module.in_channels != flow.channels:
            raise _unsupported(name, module, f"expects {module.in_channels} channels, gets {flow.channels}")
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        out_channels = flow.channels
    else:
        raise _unsupported(name, module)
    out_hw = _spatial_out_hw(module, flow.hw)
    if isinstance(out_perm, str):
        out_perm = None if ctx.mode == "fast" else layer_perm(ctx.key, name, out_hw[0] * out_hw[1],
                                                              ctx.device)
    if isinstance(module, nn.Conv2d):
        new: nn.Module = KeyedConv2d(module, flow.hw, flow.perm, out_perm, entry, device=ctx.device)
        ctx.n_conv += 1
    else:
        cls = KeyedMaxPool2d if isinstance(module, nn.MaxPool2d) else KeyedAvgPool2d
        new = cls(module, flow.hw, flow.perm, out_perm, entry, device=ctx.device)
        ctx.n_pool += 1
    ctx.entry_done = True
    return new, _Flow(out_hw, out_channels, out_perm)


def _convert(module: nn.Module, name: str, flow: _Flow, ctx: _Ctx) -> tuple[nn.Module, _Flow]:
    """Keyed twin of ``module`` (or ``module`` itself when order does not matter to it)."""
    if ctx.mode == "fast" and ctx.entry_done:
        return module, flow  # after the entry layer, fast mode runs the plain model as is
    if flow.columns is not None:  # a permuted vector after Flatten
        if isinstance(module, nn.Linear):
            return KeyedLinear(module, flow.columns), _Flow((1, 1), module.out_features, None)
        if isinstance(module, _ELEMENTWISE_FLAT):
            return module, flow
        raise _unsupported(name, module, "after a Flatten of a permuted map only element-wise "
                                         "layers and a Linear are supported")
    if isinstance(module, nn.Sequential):
        out = KeyedSequential()
        for child_name, child in module.named_children():
            new, flow = _convert(child, f"{name}.{child_name}" if name else child_name, flow, ctx)
            out.add_module(child_name, new)
            out.takes_input_perm |= bool(getattr(new, "takes_input_perm", False))
        return out, flow
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _keyed_spatial(module, name, flow, ctx)
    if isinstance(module, PreActBlock):
        return _convert_preact(module, name, flow, ctx)
    if isinstance(module, _ELEMENTWISE):
        return module, flow
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size
        size = (size, size) if isinstance(size, int) or size is None else tuple(size)
        size = tuple(flow.hw[i] if s is None else s for i, s in enumerate(size))
        if size == (1, 1):  # global pooling reads every position once: order-free
            return module, _Flow((1, 1), flow.channels, None)
        if size == tuple(flow.hw):  # identity
            return module, flow
        raise _unsupported(name, module, f"adaptive pooling to {size} of a {flow.hw} map")
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise _unsupported(name, module, "only Flatten(1, -1)")
        n = flow.hw[0] * flow.hw[1]
        if flow.perm is None or n == 1:
            return module, _Flow((1, 1), flow.channels * n, None)
        if flow.perm.dim() != 1:
            raise _unsupported(name, module, "flatten of a per-channel order")
        base = torch.arange(flow.channels, device=ctx.device)[:, None] * n
        return module, _Flow((1, 1), flow.channels * n, None, (base + flow.perm[None, :]).reshape(-1))
    if isinstance(module, nn.Linear):
        if flow.perm is not None and flow.hw != (1, 1):
            raise _unsupported(name, module, "a Linear on an unflattened permuted map")
        return module, _Flow((1, 1), module.out_features, None)
    raise _unsupported(name, module)


def _convert_preact(block: PreActBlock, name: str, flow: _Flow, ctx: _Ctx) -> tuple[nn.Module, _Flow]:
    if not ctx.entry_done:
        raise _unsupported(name, block, "a residual block cannot be the first spatial layer")
    if flow.perm is not None and flow.perm.dim() != 1:
        raise _unsupported(name, block, "per-channel order at a residual block")
    conv1, mid = _keyed_spatial(block.conv1, f"{name}.conv1", flow, ctx)
    if block.downsample is None:
        if block.conv2.out_channels != flow.channels or block.stride != 1:
            raise _unsupported(name, block, "identity shortcut with a shape change")
        conv2, out = _keyed_spatial(block.conv2, f"{name}.conv2", mid, ctx, out_perm=flow.perm)
        downsample = None
    else:
        conv2, out = _keyed_spatial(block.conv2, f"{name}.conv2", mid, ctx)
        ds = block.downsample
        if isinstance(ds, nn.Conv2d):
            downsample, ds_flow = _keyed_spatial(ds, f"{name}.downsample", flow, ctx, out.perm)
        elif isinstance(ds, nn.Sequential) and len(ds) >= 1 and isinstance(ds[0], nn.Conv2d) and all(
                isinstance(m, nn.BatchNorm2d) for m in list(ds)[1:]):
            first, ds_flow = _keyed_spatial(ds[0], f"{name}.downsample.0", flow, ctx, out.perm)
            downsample = KeyedSequential(OrderedDict(
                [("0", first)] + [(n, m) for n, m in list(ds.named_children())[1:]]))
        else:
            raise _unsupported(name, block, "downsample must be a Conv2d (optionally + BatchNorm2d)")
        if ds_flow.hw != out.hw:
            raise _unsupported(name, block, f"shortcut map {ds_flow.hw} != main branch {out.hw}")
    return KeyedPreActBlock(block, conv1, conv2, downsample), out


class KeyedNet(KeyedSequential):
    """Keyed twin of a sequential plain model (build it with :func:`keyed`).

    ``forward(x_prot, input_perm=None)``: ``x_prot`` is (B, C, H, W) (the slot grid: slot ``s``
    at row ``s // W``) or (B, C, N) in the slot order of the input permutation. ``input_perm``
    overrides the static input order for this call (rotation): (B, N) one table per frame, or
    (B, C, N) one per frame and channel ((N,) applies one table to the whole batch); the entry
    layer then builds each frame's gather table on the model's device, vectorised. A 2-d
    call-time table is always per frame. The output of the supported classifiers is logits,
    which are order-free; ``output_perm`` is the slot order of the output (None = natural).

    Attributes:
        mode: "fused" or "fast" (:meth:`describe` says what that means).
        input_shape: (C, H, W).
        input_perm_kind: "shared (N,)" or "per-channel (C, N)" for the static input table.
        key_fingerprint: public fingerprint of the key (never the key).
    """

    def __init__(self, children: OrderedDict, mode: str, input_shape: tuple[int, int, int],
                 input_perm_kind: str, key_fingerprint: str, n_conv: int, n_pool: int,
                 output_perm: Tensor | None) -> None:
        super().__init__(children)
        self.mode, self.input_shape = mode, input_shape
        self.input_perm_kind, self.key_fingerprint = input_perm_kind, key_fingerprint
        self.n_keyed_conv, self.n_keyed_pool = n_conv, n_pool
        self.register_buffer("output_perm", output_perm, persistent=False)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        c, h, w = self.input_shape
        if x.dim() == 3 and tuple(x.shape[1:]) == (c, h * w):
            x = x.reshape(x.shape[0], c, h, w)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"KeyedNet: expected a protected input (B, {c}, {h}, {w}) or "
                             f"(B, {c}, {h * w}), got {tuple(x.shape)}")
        return super().forward(x, input_perm)

    def describe(self) -> str:
        """One paragraph: which mode is active and what it protects."""
        c, h, w = self.input_shape
        head = (f"keyed net, mode={self.mode!r}, input {c}x{h}x{w} with a {self.input_perm_kind} "
                f"input permutation, key fingerprint {self.key_fingerprint}: ")
        if self.mode == "fused":
            return head + (f"fused: all {self.n_keyed_conv} convs and {self.n_keyed_pool} pools are "
                           f"keyed, each writing a key-derived slot order; no feature map is ever in "
                           f"natural order; the logits equal the plain model's.")
        return head + ("fast: only the first layer is keyed; it reads the protected frame and writes "
                       "its output in NATURAL order, then the plain dense model runs. Feature maps "
                       "after the first layer are not protected; the logits equal the plain model's.")


def keyed(model: nn.Module, key: Key, input_shape: Sequence[int], input_perm: Tensor | np.ndarray,
          mode: str = "fused", device: torch.device | str | None = None) -> KeyedNet:
    """Keyed twin of a plain model (VGG16-BN, PreResNet, CompactNet, or any nn.Sequential of
    Conv2d / MaxPool2d / AvgPool2d / PreActBlock / element-wise / global pooling / Flatten / Linear).

    Args:
        model: the plain model; the twin shares its Parameter and buffer objects.
        key: the secret key; layer ``name`` writes the order ``layer_perm(key, name, N_out)``.
        input_shape: (C, H, W) of the frames.
        input_perm: static input order: (N,) shared by all channels or (C, N) per channel
            (the "plane" readout). Checked to be permutations.
        mode: "fused" (every layer keyed) or "fast" (first layer keyed, then plain dense model).
        device: where the tables live (default: the model's parameters' device). The twin is
            moved there, which moves the shared parameters of ``model`` too.

    Returns:
        :class:`KeyedNet` with ``state_dict().keys() == model.state_dict().keys()``.

    The logits are exact whenever ``input_perm`` is the frames' true readout order; the layer key
    only decides the internal orders (a twin built with another key is just as exact on the same
    input), so what it protects is the intermediate feature maps: maps written under one key are
    garbage to layers built with another. Input validation: the static table is checked to be a
    permutation; call-time per-frame tables are only shape-checked (no device sync).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(key, Key):
        raise TypeError(f"key: expected a sensor.keys.Key, got {type(key).__name__}")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected a sequential plain model (models.plain), got "
                        f"{type(model).__name__}")
    if len(input_shape) != 3 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in input_shape):
        raise ValueError(f"input_shape: expected (C, H, W) positive ints, got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    perm = _check_static_perm(input_perm, c, h * w, device, "input_perm")
    ctx = _Ctx(key, mode, device)
    flow = _Flow((h, w), c, perm)
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for child_name, child in model.named_children():
        children[child_name], flow = _convert(child, child_name, flow, ctx)
    if not ctx.entry_done:
        raise ValueError("keyed: the model has no Conv2d or pooling layer to read the protected input")
    if flow.columns is not None:
        raise ValueError("keyed: the model ends with a flattened permuted map (no Linear to absorb it)")
    kind = "shared (N,)" if perm.dim() == 1 else "per-channel (C, N)"
    net = KeyedNet(children, mode, (c, h, w), kind, key.fingerprint, ctx.n_conv, ctx.n_pool,
                   flow.perm if flow.perm is not None and math.prod(flow.hw) > 1 else None)
    net.takes_input_perm = True
    return net.to(device)
