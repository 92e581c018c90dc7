"""Keyed layers: nn.Module twins of conv, pooling, Linear and the pre-activation block.

Each holds its gather table as a non-persistent buffer (the tables are the key: never saved)
and shares the plain layer's Parameters; the ops are in :mod:`models.keyed_ops`, the
conventions and the whole-model conversion in :mod:`models.keyed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .keyed_ops import (
    IntPair,
    as_pair,
    avg_pool_divisor,
    check_frame_perm,
    conv_output_hw,
    conv_padding,
    gather_table,
    keyed_avg_pool2d,
    keyed_conv2d,
    keyed_max_pool2d,
    pool_output_hw,
    position_table,
    table_to_offsets,
)
from .plain import PreActBlock

__all__ = [
    "KeyedAvgPool2d",
    "KeyedConv2d",
    "KeyedLinear",
    "KeyedMaxPool2d",
    "KeyedPreActBlock",
    "KeyedSequential",
]


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
        perm = check_frame_perm(input_perm, x.shape[0], x.shape[1], self.in_hw[0] * self.in_hw[1],
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
                    out_perm, entry, torch.device(device) if device is not None else conv.weight.device)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None) -> Tensor:
        """``input_perm`` (entry layer only): per-frame input order (B, N) or (B, C, N)."""
        table = self._table(x, input_perm)
        return self._grid(keyed_conv2d(self._flat(x), table, self.weight, self.bias, self.groups))

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
                 device: torch.device | str | None = None) -> None:
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
