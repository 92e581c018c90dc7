"""Keyed layers: nn.Module twins of conv, pooling, Linear and the pre-activation block.

Each holds its gather table as a non-persistent buffer (the tables are the key: never saved)
and shares the plain layer's Parameters; the ops are in :mod:`models.keyed_ops`, the
conventions and the whole-model conversion in :mod:`models.keyed`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensor.keys import Key

from .keyed_ops import (
    IntPair,
    as_pair,
    avg_pool_divisor,
    check_frame_perm,
    conv_output_hw,
    conv_padding,
    gather_columns,
    gather_table,
    keyed_avg_pool2d,
    keyed_conv2d,
    keyed_max_pool2d,
    layer_frame_perm,
    pool_output_hw,
    position_table,
    table_to_offsets,
)
from .keyed_rows import (
    BLOCK_BYTES,
    MIN_BLOCK_ROWS,
    RowGather,
    from_rows,
    needs_grad,
    row_weight,
    rows_conv2d,
    rows_pool2d,
    to_rows,
)
from .plain import PreActBlock
from .tables import invert_torch

__all__ = [
    "FrameOrders",
    "KeyedAvgPool2d",
    "KeyedConv2d",
    "KeyedLinear",
    "KeyedMaxPool2d",
    "KeyedPreActBlock",
    "KeyedSequential",
]


class FrameOrders:
    """The per-frame layer orders of one forward call, shared by a keyed net and its layers.

    With key rotation a layer may write a different slot order for every frame (the entry layer
    of a fused net: ``layer_frame_perm(key, name, frame_indices, T)``); the layers that read or
    must match that order build per-frame tables from it. :class:`models.keyed.KeyedNet` builds
    the orders once per call (:meth:`build`) and makes them visible to its layers for the
    duration of the call (:meth:`active`, per thread).

    Holds the key (the orders, like the tables, are the key); a Key refuses to be pickled, so a
    net holding one cannot be saved whole by accident (save its ``state_dict``).
    """

    def __init__(self, key: Key, sizes: dict[str, int]) -> None:
        self._key = key
        self.sizes = dict(sizes)  # rotating layer name -> slots of its output
        self._local = threading.local()

    def build(self, frame_indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        """{layer name: (B, T) output order of each frame}."""
        return {name: layer_frame_perm(self._key, name, frame_indices, n, device)
                for name, n in self.sizes.items()}

    @contextmanager
    def active(self, orders: dict[str, Tensor]) -> Iterator[None]:
        previous = getattr(self._local, "orders", None)
        self._local.orders = orders
        try:
            yield
        finally:
            self._local.orders = previous

    def current(self) -> dict[str, Tensor] | None:
        return getattr(self._local, "orders", None)


class _KeyedSpatial(nn.Module):
    """Shared part of keyed conv/pool layers: geometry, tables, per-frame tables, channels-last rows.

    Buffers (all ``persistent=False``): ``table`` (T, K) or (C, T, K) gather table of the static
    input order; ``out_perm`` (T,) output slot -> position; ``positions`` (T, K) natural input
    position per tap (layers whose input order may change per frame: the entry, and with rotation
    the readers of a rotating order); ``in_perm`` the static input order and ``positions_natural``
    the position table in natural output order (layers whose output order may change per frame).

    Memory format: a layer whose table is shared by all channels reads its input as channels-last
    rows (:mod:`models.keyed_rows`; a channels-first input is converted once) and returns a
    channels-last map; a per-channel table (an entry layer reading CFA planes under their own
    orders) gathers single values instead. ``channels_last=False`` (the fast mode's entry) returns
    a contiguous (channels-first) map, so the plain layers after it run as they do in the plain
    model.
    """

    table: Tensor
    out_perm: Tensor

    def _setup(self, in_hw: IntPair, out_hw: IntPair, kernel_size: IntPair, stride: IntPair,
               padding: IntPair, dilation: IntPair, in_perm: Tensor | None, out_perm: Tensor | None,
               entry: bool, device: torch.device, frame_in: str | None = None,
               frame_out: str | None = None) -> None:
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
        self.frame_in, self.frame_out = frame_in, frame_out
        self.has_pad = bool((positions >= n_in).any())  # depends on geometry and output positions only
        self.register_buffer("positions", positions if entry or frame_in else None, persistent=False)
        self.register_buffer("in_perm", in_perm if frame_out else None, persistent=False)
        natural = (position_table(in_hw, out_hw, kernel_size, stride, padding, dilation, None, device)
                   if frame_out else None)
        self.register_buffer("positions_natural", natural, persistent=False)
        # padding taps, as flat rows of the (T * K) columns: of the static output order (layers that
        # may read a per-frame input order), and (q * K + j) in natural output order (per-frame outputs)
        keep = (entry or frame_in) and self.has_pad
        self.register_buffer("pad_rows", (positions >= n_in).view(-1).nonzero().view(1, -1) if keep else None,
                             persistent=False)
        self.register_buffer("pad_natural", (natural >= n_in).view(-1).nonzero().view(-1)
                             if frame_out and self.has_pad else None, persistent=False)
        self.channels_last = True
        self.frame_orders: FrameOrders | None = None
        self.block_bytes, self.min_block_rows = BLOCK_BYTES, MIN_BLOCK_ROWS  # see RowGather
        self.net_frame_elems: int | None = None  # largest activation of the net per frame (keyed())
        self._gathers: dict[tuple, RowGather] = {}

    def _check_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != tuple(self.in_hw):
            raise ValueError(f"{type(self).__name__}: expected a (B, C, {self.in_hw[0]}, "
                             f"{self.in_hw[1]}) slot grid, got {tuple(x.shape)}")
        return x

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1)

    def _frame_state(self, x: Tensor, input_perm: Tensor | np.ndarray | None
                     ) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """None when this call uses the static table; else (positions (T, K) or (B, T, K), input
        order of the call (None, (N,), (C, N) or (B', C', N)), per-frame output order (B, T) or None).

        A call has per-frame tables when it has a per-frame input order (``input_perm`` at the
        entry, or the order of a rotating layer upstream) or a per-frame output order.
        """
        orders = self.frame_orders.current() if self.frame_orders is not None else None
        frame_in = orders.get(self.frame_in) if orders and self.frame_in else None
        frame_out = orders.get(self.frame_out) if orders and self.frame_out else None
        n_in = self.in_hw[0] * self.in_hw[1]
        if input_perm is not None:
            if not self.entry:
                raise RuntimeError(f"{type(self).__name__}: only the entry layer takes a per-frame "
                                   f"input_perm")
            frame_in = check_frame_perm(input_perm, x.shape[0], x.shape[1], n_in, self.table.device)
        elif frame_in is not None:
            frame_in = frame_in.unsqueeze(1)  # (B, 1, N): one order per frame for all channels
        if frame_in is None and frame_out is None:
            return None
        if frame_out is None:
            positions = self.positions
        else:  # the rows of the natural-order position table, in each frame's output order
            t, k = self.positions_natural.shape
            positions = self.positions_natural.index_select(0, frame_out.reshape(-1)).view(-1, t, k)
        return positions, (frame_in if frame_in is not None else self.in_perm), frame_out

    def _plan(self, x: Tensor, input_perm: Tensor | np.ndarray | None
              ) -> tuple[RowGather | None, Tensor | None, Tensor | None]:
        """(row gather, or None for a value gather; value-gather table or None; per-frame output
        order (B, T) or None) of this call."""
        n_in = self.in_hw[0] * self.in_hw[1]
        row_bytes = x.shape[1] * x.element_size()
        frame_bytes = None if self.net_frame_elems is None else self.net_frame_elems * x.element_size()
        plan = (self.block_bytes, self.min_block_rows, frame_bytes)
        state = self._frame_state(x, input_perm)
        if state is None:
            table = self.table
            if table.dim() == 3 and table.shape[0] > 1:
                return None, table, None
            key = (row_bytes, plan, table.device, table.data_ptr())
            gather = self._gathers.get(key)
            if gather is None:
                shared = table if table.dim() == 2 else table[0]
                gather = RowGather(shared, n_in, row_bytes, self.block_bytes, self.has_pad,
                                   self.min_block_rows, frame_bytes)
                self._gathers = {key: gather}  # one static plan is kept (the latest input width)
            return gather, None, None
        positions, in_perm, frame_out = state
        if in_perm is not None:  # as (B', C', N)
            in_perm = in_perm.view(1, 1, -1) if in_perm.dim() == 1 else (
                in_perm.unsqueeze(0) if in_perm.dim() == 2 else in_perm)
        if in_perm is None or in_perm.shape[1] == 1:
            if not self.has_pad:
                pad_rows = None
            elif frame_out is None:
                pad_rows = self.pad_rows
            else:  # each frame's slot of every natural padding tap
                k = self.table.shape[-1]
                slot = invert_torch(frame_out).index_select(1, self.pad_natural // k)
                pad_rows = slot * k + self.pad_natural % k
            gather = RowGather.for_frames(positions, None if in_perm is None else in_perm[:, 0], n_in,
                                          x.shape[0], row_bytes, self.block_bytes, self.has_pad,
                                          self.min_block_rows, frame_bytes, pad_rows)
            return gather, None, frame_out
        return None, gather_table(positions, in_perm), frame_out

    def _grid(self, y: Tensor) -> Tensor:
        return y.view(y.shape[0], y.shape[1], *self.out_hw)

    def _out(self, y: Tensor) -> Tensor:
        """(B, T, C) output rows -> output map in this layer's memory format."""
        y = from_rows(y, self.out_hw)
        return y if self.channels_last else y.contiguous()

    def _finish_elements(self, y: Tensor) -> Tensor:
        """(B, C, T) result of a value gather -> output map in this layer's memory format."""
        y = self._grid(y)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def _geometry_repr(self) -> str:
        return (f"in_hw={tuple(self.in_hw)}, out_hw={tuple(self.out_hw)}, kernel_size={self.kernel_size}"
                f", stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
                f"{', entry' if self.entry else ''}"
                f"{f', frame_in={self.frame_in}' if self.frame_in else ''}"
                f"{f', frame_out={self.frame_out}' if self.frame_out else ''}")


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
        frame_in, frame_out: names of rotating orders (see :class:`FrameOrders`) this layer reads
            or writes when its net is called with frame indices; None = always the static order.

    Shape:
        (B, C_in, H_in, W_in) slot grid -> (B, C_out, H_out, W_out) slot grid (channels-last unless
        ``channels_last`` is False).
    """

    def __init__(self, conv: nn.Conv2d, in_hw: Sequence[int], in_perm: Tensor | None = None,
                 out_perm: Tensor | None = None, entry: bool = False,
                 device: torch.device | str | None = None, frame_in: str | None = None,
                 frame_out: str | None = None) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"KeyedConv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"KeyedConv2d: padding_mode {conv.padding_mode!r} is not "
                                      f"supported (only 'zeros')")
        in_hw = as_pair(tuple(in_hw), "in_hw")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = as_pair(conv.kernel_size, "kernel_size")
        self.stride = as_pair(conv.stride, "stride")
        self.dilation = as_pair(conv.dilation, "dilation")
        self.groups = conv.groups
        before, end = conv_padding(conv)
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
                    out_perm, entry, torch.device(device) if device is not None else conv.weight.device,
                    frame_in, frame_out)
        self._weight_cache: tuple[tuple, Tensor] | None = None

    def _weight_rows(self) -> Tensor:
        """The (K * C, O) row weight; cached while the Parameter is unchanged (outside autograd)."""
        w = self.weight
        if needs_grad(w):
            return row_weight(w, self.groups)
        # an inference tensor has no version counter (and cannot change outside inference mode)
        key = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype, w.device)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, row_weight(w.detach(), self.groups).contiguous())
        return self._weight_cache[1]

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        """``input_perm`` (entry layer only): per-frame input order (B, N) or (B, C, N)."""
        x = self._check_input(x)
        gather, table, _ = self._plan(x, input_perm)
        if gather is not None:
            return self._out(rows_conv2d(to_rows(x), gather, self._weight_rows(), self.bias))
        if self.groups == 1:  # per-channel table: value gather, then rows
            b, c = x.shape[:2]
            cols = gather_columns(self._flat(x), table, 0.0)  # (B, C, K, T)
            k, t = cols.shape[2:]
            w = self.weight.reshape(self.out_channels, c * k).t()
            y = torch.bmm(cols.reshape(b, c * k, t).transpose(1, 2), w.expand(b, -1, -1))
            return self._out(y if self.bias is None else y + self.bias)
        return self._finish_elements(keyed_conv2d(self._flat(x), table, self.weight, self.bias,
                                                  self.groups))

    def to_offsets(self, dtype: torch.dtype | None = None) -> Tensor:
        """This layer's static table as deformable-conv offsets (:func:`models.keyed_ops.table_to_offsets`)."""
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
                 device: torch.device | str | None = None, frame_in: str | None = None,
                 frame_out: str | None = None) -> None:
        super().__init__()
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"KeyedMaxPool2d: expected an nn.MaxPool2d, got {type(pool).__name__}")
        if pool.return_indices:
            raise NotImplementedError("KeyedMaxPool2d: return_indices=True is not supported")
        in_hw = as_pair(tuple(in_hw), "in_hw")
        self.kernel_size = as_pair(pool.kernel_size, "kernel_size")
        self.stride = as_pair(pool.stride if pool.stride is not None else pool.kernel_size, "stride")
        self.padding = as_pair(pool.padding, "padding")
        self.dilation = as_pair(pool.dilation, "dilation")
        self.ceil_mode = bool(pool.ceil_mode)
        out_hw = pool_output_hw(in_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        device = torch.device(device) if device is not None else (
            in_perm.device if in_perm is not None else torch.device("cpu"))
        self._setup(in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                    in_perm, out_perm, entry, device, frame_in, frame_out)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        x = self._check_input(x)
        gather, table, _ = self._plan(x, input_perm)
        if gather is not None:
            return self._out(rows_pool2d(to_rows(x), gather, "max"))
        return self._finish_elements(keyed_max_pool2d(self._flat(x), table))

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
                 device: torch.device | str | None = None, frame_in: str | None = None,
                 frame_out: str | None = None) -> None:
        super().__init__()
        if not isinstance(pool, nn.AvgPool2d):
            raise TypeError(f"KeyedAvgPool2d: expected an nn.AvgPool2d, got {type(pool).__name__}")
        in_hw = as_pair(tuple(in_hw), "in_hw")
        self.kernel_size = as_pair(pool.kernel_size, "kernel_size")
        self.stride = as_pair(pool.stride if pool.stride is not None else pool.kernel_size, "stride")
        self.padding = as_pair(pool.padding, "padding")
        self.dilation = (1, 1)
        self.ceil_mode = bool(pool.ceil_mode)
        self.count_include_pad = bool(pool.count_include_pad)
        self.divisor_override = pool.divisor_override
        out_hw = pool_output_hw(in_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        device = torch.device(device) if device is not None else (
            in_perm.device if in_perm is not None else torch.device("cpu"))
        self._setup(in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.dilation,
                    in_perm, out_perm, entry, device, frame_in, frame_out)
        self.register_buffer("divisor", avg_pool_divisor(
            in_hw, out_hw, self.kernel_size, self.stride, self.padding, self.count_include_pad,
            self.out_perm, device), persistent=False)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        x = self._check_input(x)
        gather, table, frame_out = self._plan(x, input_perm)
        if self.divisor_override:
            divisor: Tensor | int = int(self.divisor_override)
        elif frame_out is not None:  # per-frame output order: each frame's divisors in its order
            divisor = avg_pool_divisor(self.in_hw, self.out_hw, self.kernel_size, self.stride,
                                       self.padding, self.count_include_pad, frame_out)
        else:
            divisor = self.divisor
        if gather is not None:
            return self._out(rows_pool2d(to_rows(x), gather, "avg", divisor))
        if isinstance(divisor, Tensor) and divisor.dim() == 2:
            divisor = divisor.unsqueeze(1)  # (B, 1, T) against (B, C, T)
        return self._finish_elements(keyed_avg_pool2d(self._flat(x), table, divisor))

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
