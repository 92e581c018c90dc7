"""Deformable convolution in pure torch, and keyed gather tables expressed as deformable offsets.

:func:`deform_conv2d` has the signature and semantics of ``torchvision.ops.deform_conv2d``
(DCNv1, and DCNv2 with ``mask``):

* ``offset`` (B, 2 * offset_groups * kh * kw, H_out, W_out) holds a (dy, dx) pair per tap, taps
  in row-major order, offset groups outermost: channel ``g * 2 * K + 2 * k`` is dy and
  ``g * 2 * K + 2 * k + 1`` is dx of tap ``k`` of offset group ``g`` (``K = kh * kw``); input
  channel ``c`` uses offset group ``c // (C_in / offset_groups)``.
* tap ``k = i * kw + j`` of output (oy, ox) samples at
  ``y = oy * stride_h - pad_h + i * dilation_h + dy``, ``x = ox * stride_w - pad_w + j * dilation_w + dx``
  by bilinear interpolation; a sample with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0,
  otherwise each of the four corners contributes only if it lies inside the image.
* ``mask`` (B, offset_groups * kh * kw, H_out, W_out) multiplies each sample (modulated deform
  conv); ``groups = C_in / weight.shape[1]``.

:func:`table_to_offsets` (defined in :mod:`models.keyed_ops`, beside the gather tables it
reads, and re-exported here) turns a keyed layer's gather table into offsets, so a keyed
convolution can run on any deformable-convolution kernel (see its docstring for the exact
statement).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .keyed_ops import as_pair, table_to_offsets

__all__ = ["DeformConv2d", "deform_conv2d", "table_to_offsets"]


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
                  dilation: int | tuple[int, int] = (1, 1), mask: Tensor | None = None) -> Tensor:
    """Deformable 2-d convolution (torchvision.ops.deform_conv2d semantics, pure torch).

    Args:
        input: (B, C_in, H, W).
        offset: (B, 2 * offset_groups * kh * kw, H_out, W_out), (dy, dx) per tap.
        weight: (C_out, C_in / groups, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (h, w).
        mask: (B, offset_groups * kh * kw, H_out, W_out) or None (all ones).

    Returns:
        (B, C_out, H_out, W_out) with ``H_out = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1``.

    Differentiable in ``input``, ``offset``, ``mask``, ``weight`` and ``bias`` (autograd).
    """
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    dh, dw = as_pair(dilation, "dilation")
    if input.dim() != 4:
        raise ValueError(f"deform_conv2d: input: expected (B, C_in, H, W), got {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"deform_conv2d: weight: expected (C_out, C_in / groups, kh, kw), "
                         f"got {tuple(weight.shape)}")
    b, c, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    k = kh * kw
    if c_per_group < 1 or c % c_per_group:
        raise ValueError(f"deform_conv2d: input has {c} channels, not a multiple of weight.shape[1] "
                         f"= {c_per_group}")
    groups = c // c_per_group
    if c_out % groups:
        raise ValueError(f"deform_conv2d: weight.shape[0] = {c_out} is not a multiple of groups = {groups}")
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"deform_conv2d: input {h}x{w} is too small for kernel {kh}x{kw}, "
                         f"padding {(ph, pw)}, dilation {(dh, dw)}")
    if offset.dim() != 4 or offset.shape[1] % (2 * k) or offset.shape[1] == 0:
        raise ValueError(f"deform_conv2d: offset: expected (B, 2 * offset_groups * {k}, {h_out}, "
                         f"{w_out}), got {tuple(offset.shape)}")
    n_off = offset.shape[1] // (2 * k)
    if offset.shape[0] != b or tuple(offset.shape[2:]) != (h_out, w_out):
        raise ValueError(f"deform_conv2d: offset: expected (B={b}, {2 * n_off * k}, {h_out}, {w_out}), "
                         f"got {tuple(offset.shape)}")
    if c % n_off:
        raise ValueError(f"deform_conv2d: input channels {c} are not a multiple of offset_groups {n_off}")
    if mask is not None and tuple(mask.shape) != (b, n_off * k, h_out, w_out):
        raise ValueError(f"deform_conv2d: mask: expected ({b}, {n_off * k}, {h_out}, {w_out}), "
                         f"got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"deform_conv2d: bias: expected ({c_out},), got {tuple(bias.shape)}")

    dev, dtype = input.device, input.dtype
    lsz = h_out * w_out
    off = offset.to(dtype).reshape(b, n_off, k, 2, lsz)
    base_y = (torch.arange(h_out, device=dev) * sh - ph).repeat_interleave(w_out)  # (L,)
    base_x = (torch.arange(w_out, device=dev) * sw - pw).repeat(h_out)
    tap_y = torch.arange(kh, device=dev).repeat_interleave(kw) * dh  # (K,)
    tap_x = torch.arange(kw, device=dev).repeat(kh) * dw
    y = (tap_y[:, None] + base_y[None, :]).to(dtype) + off[:, :, :, 0]  # (B, G, K, L)
    x = (tap_x[:, None] + base_x[None, :]).to(dtype) + off[:, :, :, 1]
    # torchvision's early exit; with the full per-corner bounds below it changes no value
    inside = (y > -1) & (y < h) & (x > -1) & (x < w)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    scale = mask.to(dtype).reshape(b, n_off, k, lsz) if mask is not None else None
    src = input.reshape(b, n_off, c // n_off, h * w)
    cols = input.new_zeros(b, n_off, c // n_off, k * lsz)
    for cy, cx, wy, wx in ((y0, x0, 1 - ly, 1 - lx), (y0, x0 + 1, 1 - ly, lx),
                           (y0 + 1, x0, ly, 1 - lx), (y0 + 1, x0 + 1, ly, lx)):
        valid = inside & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
        idx = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).reshape(b, n_off, 1, k * lsz)
        vals = torch.gather(src, 3, idx.expand(b, n_off, c // n_off, k * lsz))
        wgt = wy * wx if scale is None else wy * wx * scale
        wgt = wgt.reshape(b, n_off, 1, k * lsz)
        cols = cols + torch.where(valid.reshape(b, n_off, 1, k * lsz), vals * wgt, 0.0)
    cols = cols.reshape(b, groups, c_per_group * k, lsz)  # channel-major, then tap: matches weight
    out = torch.matmul(weight.reshape(groups, c_out // groups, c_per_group * k), cols)
    out = out.reshape(b, c_out, h_out, w_out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class DeformConv2d(nn.Module):
    """Module twin of :func:`deform_conv2d` (torchvision.ops.DeformConv2d interface and init).

    Shape:
        input (B, C_in, H, W), offset (B, 2 * offset_groups * kh * kw, H_out, W_out),
        mask (B, offset_groups * kh * kw, H_out, W_out) or None -> (B, C_out, H_out, W_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"DeformConv2d: in_channels {in_channels} not divisible by groups {groups}")
        if out_channels % groups:
            raise ValueError(f"DeformConv2d: out_channels {out_channels} not divisible by groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")
