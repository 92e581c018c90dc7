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
(B, 1, T, K) or per frame and channel (B, C, T, K). Since a table shared by the channels moves
whole C-vectors, the keyed layers keep maps channels-last and gather rows in blocks
(:mod:`models.keyed_rows`): no (B, C*K, T) im2col of the whole map is ever made.

:func:`keyed` turns a supported plain model (:mod:`models.plain`) into a keyed twin:

* ``mode="fused"``: every conv and pool is keyed and writes its own key-derived output order
  (``key.subkey("layer:<module name>")``), so no feature map is ever in natural order. A residual
  add needs both operands in one order: a block's second conv writes the order of its shortcut
  (the block input for an identity shortcut, a fresh order shared with the 1x1 ``downsample``).
  Global average pooling is order-free; a Flatten of a larger map permutes the next Linear's
  columns (exact).
* ``mode="fast"``: only the first layer is keyed; it gathers the protected frame and writes its
  output in natural order (channels-last), after which the plain dense model runs. Faster (dense
  convs), but the feature maps after the first layer are NOT protected.

Rotation (``KeyedNet.forward(x, input_perm, frame_index)``): the entry layer of a fused twin (or
its keyed front end, ``model_hw``) writes frame ``n`` in the order seeded
``key.subkey("layer:<name>/frame", n)``; every layer that reads that order, or must match it across
a residual add, builds per-frame tables for the call (:class:`models.keyed_layers.FrameOrders`).

The twin shares the plain model's Parameter and BatchNorm buffer objects (fine-tuning the twin
trains the plain model) and its ``state_dict`` has exactly the plain model's keys: gather tables
are non-persistent buffers, moved by ``.to(device)`` and never saved.

Layout: the functional ops and tables are in :mod:`models.keyed_ops`, the layers in
:mod:`models.keyed_layers`; this module converts whole models and re-exports both (``__all__``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from sensor.keys import Key

from .frontend import KeyedResize
from .keyed_layers import (
    FrameOrders,
    KeyedAvgPool2d,
    KeyedConv2d,
    KeyedLinear,
    KeyedMaxPool2d,
    KeyedPreActBlock,
    KeyedSequential,
)
from .keyed_ops import (
    IntPair,
    as_pair,
    avg_pool_divisor,
    check_static_perm,
    conv_output_hw,
    conv_padding,
    gather_columns,
    gather_table,
    keyed_avg_pool2d,
    keyed_conv2d,
    keyed_max_pool2d,
    layer_perm,
    pool_output_hw,
    position_table,
)
from .plain import PreActBlock

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

Mode = Literal["fused", "fast"]
MODES: tuple[Mode, ...] = get_args(Mode)


# ----------------------------------------------------------------------------------------------
# Whole-model conversion
# ----------------------------------------------------------------------------------------------


def _spatial_out_hw(module: nn.Module, in_hw: IntPair) -> IntPair:
    """Output (H, W) of a Conv2d, MaxPool2d or AvgPool2d on an ``in_hw`` input."""
    if isinstance(module, nn.Conv2d):
        before, end = conv_padding(module)
        return conv_output_hw(in_hw, as_pair(module.kernel_size, "kernel_size"),
                              as_pair(module.stride, "stride"), before,
                              as_pair(module.dilation, "dilation"), end)
    stride = module.stride if module.stride is not None else module.kernel_size
    dilation = module.dilation if isinstance(module, nn.MaxPool2d) else 1
    return pool_output_hw(in_hw, as_pair(module.kernel_size, "kernel_size"), as_pair(stride, "stride"),
                          as_pair(module.padding, "padding"), as_pair(dilation, "dilation"),
                          bool(module.ceil_mode))


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
    frame: str | None = None  # with rotation the order is instead this rotating layer's per-frame order


@dataclass
class _Ctx:
    key: Key
    mode: str
    device: torch.device
    entry_done: bool = False
    n_conv: int = 0
    n_pool: int = 0
    rotating: dict[str, int] = field(default_factory=dict)  # layer name -> slots of its per-frame order
    spatial: list[nn.Module] = field(default_factory=list)
    frontend: bool = False  # a keyed front end reads the frames (the model's first layer does not)
    max_elems: int = 0  # largest feature map (C * H * W) read or written by a keyed layer


def _unsupported(name: str, module: nn.Module, why: str = "") -> NotImplementedError:
    return NotImplementedError(f"keyed: layer {name or '<root>'} ({type(module).__name__}) is not "
                               f"supported{': ' + why if why else ''}")


def _keyed_spatial(module: nn.Module, name: str, flow: _Flow, ctx: _Ctx,
                   out_perm: Tensor | None | str = "fresh", frame_out: str | None = None
                   ) -> tuple[nn.Module, _Flow]:
    """Key one conv or pool. ``out_perm="fresh"`` derives a new order from the key (fused mode);
    the fused entry layer also gets a per-frame order for rotation. ``frame_out``: the rotating
    order this layer must write instead of ``out_perm`` when called with frame indices."""
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
        if entry and ctx.mode == "fused" and not ctx.frontend:  # rotation: per-frame entry order
            frame_out = name
            ctx.rotating[name] = out_hw[0] * out_hw[1]
    if isinstance(module, nn.Conv2d):
        new: nn.Module = KeyedConv2d(module, flow.hw, flow.perm, out_perm, entry, device=ctx.device,
                                     frame_in=flow.frame, frame_out=frame_out)
        ctx.n_conv += 1
    else:
        cls = KeyedMaxPool2d if isinstance(module, nn.MaxPool2d) else KeyedAvgPool2d
        new = cls(module, flow.hw, flow.perm, out_perm, entry, device=ctx.device, frame_in=flow.frame,
                  frame_out=frame_out)
        ctx.n_pool += 1
    # channels-last output in both modes: in fast mode the plain layers after the entry then run on
    # a channels-last map (same values; oneDNN's channels-last kernels, as fast or faster on CPU)
    new.channels_last = True
    if entry and ctx.frontend:
        new.takes_input_perm = False  # the front end takes the frames' orders
    ctx.spatial.append(new)
    ctx.max_elems = max(ctx.max_elems, flow.channels * flow.hw[0] * flow.hw[1],
                        out_channels * out_hw[0] * out_hw[1])
    ctx.entry_done = True
    return new, _Flow(out_hw, out_channels, out_perm, frame=frame_out)


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
        if flow.frame is not None and n > 1:
            raise _unsupported(name, module, "a Flatten of the rotating entry layer's map (its order "
                                             "changes per frame); put a keyed layer or a global pool first")
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
        conv2, out = _keyed_spatial(block.conv2, f"{name}.conv2", mid, ctx, out_perm=flow.perm,
                                    frame_out=flow.frame)
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

    ``frame_index`` (B,) (rotation, fused mode): the frame counters of the batch. The entry layer
    then writes frame ``n`` in the order ``layer_frame_perm(key, name, [n], T)`` instead of its
    static order, and every layer that reads or must match that order builds per-frame tables
    for the call (:class:`models.keyed_layers.FrameOrders`). Without it the static orders are
    used (still exact; but the entry's output order is then the same for every frame).
    ``orders``: ``frame_orders.build(frame_index, device)`` built ahead by the caller (a pipeline
    builds the next batch's while this one runs); None builds them here.

    Memory format: in fused mode every feature map is channels-last (slot rows of C values), the
    layout the keyed layers gather from without copies (:mod:`models.keyed_rows`).

    Attributes:
        mode: "fused" or "fast" (:meth:`describe` says what that means).
        input_shape: (C, H, W).
        input_perm_kind: "shared (N,)" or "per-channel (C, N)" for the static input table.
        key_fingerprint: public fingerprint of the key (never the key).
        frame_orders: the rotating orders (None in fast mode); it holds the key, so the net
            cannot be pickled whole (save the plain model's ``state_dict``).
    """

    def __init__(self, children: OrderedDict, mode: str, input_shape: tuple[int, int, int],
                 input_perm_kind: str, key_fingerprint: str, n_conv: int, n_pool: int,
                 output_perm: Tensor | None, frame_orders: FrameOrders | None = None,
                 model_hw: tuple[int, int] | None = None) -> None:
        super().__init__(children)
        self.mode, self.input_shape = mode, input_shape
        self.model_hw = model_hw or input_shape[1:]
        self.input_perm_kind, self.key_fingerprint = input_perm_kind, key_fingerprint
        self.n_keyed_conv, self.n_keyed_pool = n_conv, n_pool
        self.frame_orders = frame_orders
        self.register_buffer("output_perm", output_perm, persistent=False)

    def forward(self, x: Tensor, input_perm: Tensor | np.ndarray | None = None,
                frame_index: Sequence[int] | np.ndarray | Tensor | None = None,
                orders: dict[str, Tensor] | None = None) -> Tensor:
        c, h, w = self.input_shape
        if x.dim() == 3 and tuple(x.shape[1:]) == (c, h * w):
            x = x.reshape(x.shape[0], c, h, w)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"KeyedNet: expected a protected input (B, {c}, {h}, {w}) or "
                             f"(B, {c}, {h * w}), got {tuple(x.shape)}")
        if frame_index is None or self.frame_orders is None:
            return super().forward(x, input_perm)
        idx = [int(v) for v in (frame_index.tolist() if hasattr(frame_index, "tolist") else frame_index)]
        if len(idx) != x.shape[0]:
            raise ValueError(f"frame_index: expected {x.shape[0]} frame counters (one per frame), "
                             f"got {len(idx)}")
        device = self.output_perm.device if self.output_perm is not None else next(
            b.device for b in self.buffers())
        if orders is None:  # else built ahead by the caller: frame_orders.build(frame_index) (double buffering)
            orders = self.frame_orders.build(idx, device)
        with self.frame_orders.active(orders):
            return super().forward(x, input_perm)

    def describe(self) -> str:
        """One paragraph: which mode is active and what it protects."""
        c, h, w = self.input_shape
        head = (f"keyed net, mode={self.mode!r}, input {c}x{h}x{w} with a {self.input_perm_kind} "
                f"input permutation, key fingerprint {self.key_fingerprint}: ")
        if tuple(self.model_hw) != (h, w):
            head += (f"a keyed front end resamples the protected frames to {self.model_hw[0]}x"
                     f"{self.model_hw[1]} (INTER_AREA) in a key-derived order; ")
        if self.mode == "fused":
            return head + (f"fused: all {self.n_keyed_conv} convs and {self.n_keyed_pool} pools are "
                           f"keyed, each writing a key-derived slot order; no feature map is ever in "
                           f"natural order; the logits equal the plain model's.")
        return head + ("fast: only the first layer is keyed; it reads the protected frame and writes "
                       "its output in NATURAL order, then the plain dense model runs. Feature maps "
                       "after the first layer are not protected; the logits equal the plain model's.")


def keyed(model: nn.Module, key: Key, input_shape: Sequence[int], input_perm: Tensor | np.ndarray,
          mode: str = "fused", device: torch.device | str | None = None,
          model_hw: Sequence[int] | None = None) -> KeyedNet:
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
        model_hw: the model's input (h, w) when the frames are larger: a keyed front end
            (:class:`models.frontend.KeyedResize`, INTER_AREA / binning, child ``frontend``) reads
            the protected frames and writes the model input in a key-derived order (rotating
            per frame with ``frame_index``), never in natural order; the plain twin is
            :func:`models.frontend.area_resize` on the plain frames.

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
    perm = check_static_perm(input_perm, c, h * w, device, "input_perm")
    ctx = _Ctx(key, mode, device)
    flow = _Flow((h, w), c, perm)
    children: OrderedDict[str, nn.Module] = OrderedDict()
    model_hw = (h, w) if model_hw is None else as_pair(tuple(model_hw), "model_hw")
    if model_hw != (h, w):
        if "frontend" in dict(model.named_children()):
            raise ValueError("keyed: the model has a child called 'frontend', the front end's name")
        t = model_hw[0] * model_hw[1]
        out_perm = layer_perm(key, "frontend", t, device)
        front = KeyedResize((h, w), model_hw, perm, out_perm, frame_out="frontend", device=device)
        children["frontend"] = front
        ctx.frontend, ctx.rotating["frontend"] = True, t
        ctx.spatial.append(front)
        flow = _Flow(model_hw, c, out_perm, frame="frontend")
    for child_name, child in model.named_children():
        children[child_name], flow = _convert(child, child_name, flow, ctx)
    if not ctx.entry_done:
        raise ValueError("keyed: the model has no Conv2d or pooling layer to read the protected input")
    if flow.columns is not None:
        raise ValueError("keyed: the model ends with a flattened permuted map (no Linear to absorb it)")
    kind = "shared (N,)" if perm.dim() == 1 else "per-channel (C, N)"
    orders = FrameOrders(key, ctx.rotating) if ctx.rotating else None
    for layer in ctx.spatial:
        layer.frame_orders = orders
        layer.net_frame_elems = ctx.max_elems  # row blocks stay below half the largest activation
    net = KeyedNet(children, mode, (c, h, w), kind, key.fingerprint, ctx.n_conv, ctx.n_pool,
                   flow.perm if flow.perm is not None and math.prod(flow.hw) > 1 else None, orders,
                   model_hw)
    net.takes_input_perm = True
    return net.to(device)
