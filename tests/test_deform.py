"""Pure-torch deformable convolution (torchvision semantics) and keyed tables as offsets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.deform import DeformConv2d, deform_conv2d
from models.keyed_layers import KeyedConv2d
from models.keyed_ops import table_to_offsets
from models.tables import random_permutation_torch
from sensor.keys import Key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = Key(bytes(range(32)))


def perm(tag: int, n: int) -> torch.Tensor:
    return random_permutation_torch(KEY.subkey("test/deform", tag), n)


def out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def reference_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask=None):
    """Loop-by-loop port of torchvision's CPU kernel (deformable_im2col + bilinear_interpolate)."""
    b, c, h, w = x.shape
    c_out, cg, kh, kw = weight.shape
    groups, n_off = c // cg, offset.shape[1] // (2 * kh * kw)
    h_out, w_out = offset.shape[2:]
    out = torch.zeros(b, c_out, h_out, w_out, dtype=torch.float64)

    def bilinear(img, yy, xx):
        if yy <= -1 or yy >= h or xx <= -1 or xx >= w:
            return 0.0
        y0, x0 = math.floor(yy), math.floor(xx)
        y1, x1 = y0 + 1, x0 + 1
        ly, lx = yy - y0, xx - x0
        v1 = img[y0][x0] if y0 >= 0 and x0 >= 0 else 0.0
        v2 = img[y0][x1] if y0 >= 0 and x1 <= w - 1 else 0.0
        v3 = img[y1][x0] if y1 <= h - 1 and x0 >= 0 else 0.0
        v4 = img[y1][x1] if y1 <= h - 1 and x1 <= w - 1 else 0.0
        return (1 - ly) * (1 - lx) * v1 + (1 - ly) * lx * v2 + ly * (1 - lx) * v3 + ly * lx * v4

    xd, od = x.double().tolist(), offset.double().tolist()
    md = mask.double().tolist() if mask is not None else None
    cols = [[[[[0.0] * w_out for _ in range(h_out)] for _ in range(kh * kw)] for _ in range(c)]
            for _ in range(b)]
    for n, ci, i, j, oy, ox in itertools.product(range(b), range(c), range(kh), range(kw),
                                                 range(h_out), range(w_out)):
        g, k = ci // (c // n_off), i * kw + j
        dy = od[n][g * 2 * kh * kw + 2 * k][oy][ox]
        dx = od[n][g * 2 * kh * kw + 2 * k + 1][oy][ox]
        yy = oy * stride - padding + i * dilation + dy
        xx = ox * stride - padding + j * dilation + dx
        m = md[n][g * kh * kw + k][oy][ox] if md is not None else 1.0
        cols[n][ci][k][oy][ox] = m * bilinear(xd[n][ci], yy, xx)
    cols_t = torch.tensor(cols, dtype=torch.float64).reshape(b, groups, cg * kh * kw, h_out * w_out)
    wt = weight.double().reshape(groups, c_out // groups, cg * kh * kw)
    out = torch.matmul(wt, cols_t).reshape(b, c_out, h_out, w_out)
    return out if bias is None else out + bias.double().view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# deform_conv2d semantics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups", "offset_groups"),
                         list(itertools.product((1, 2), (0, 1), (1, 2), (1, 2), (1, 2))))
def test_zero_offsets_equal_conv2d(stride, padding, dilation, groups, offset_groups):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8)
    weight, bias = torch.randn(6, 4 // groups, 3, 3), torch.randn(6)
    h_out, w_out = out_size(9, 3, stride, padding, dilation), out_size(8, 3, stride, padding, dilation)
    offset = torch.zeros(2, 2 * offset_groups * 9, h_out, w_out)
    got = deform_conv2d(x, offset, weight, bias, stride, padding, dilation)
    want = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (0, -2), (-1, 3), (2, 2)])
def test_integer_offsets_equal_shifted_conv(dy, dx):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 9)
    weight = torch.randn(4, 3, 3, 3)
    stride, padding, dilation, margin = 2, 1, 1, 4
    h_out, w_out = out_size(7, 3, stride, padding, dilation), out_size(9, 3, stride, padding, dilation)
    offset = torch.zeros(2, 18, h_out, w_out)
    offset[:, 0::2], offset[:, 1::2] = float(dy), float(dx)
    got = deform_conv2d(x, offset, weight, None, stride, padding, dilation)
    # the same sampling on a zero canvas: tap k of output o reads x at o*s - p + k*d + (dy, dx)
    canvas = F.pad(x, (padding + margin,) * 4)
    shifted = canvas[:, :, margin + dy:, margin + dx:]
    want = F.conv2d(shifted, weight, None, stride, 0, dilation)[:, :, :h_out, :w_out]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fractional_offsets_hand_computed():
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    weight = torch.ones(1, 1, 1, 1)
    offset = torch.zeros(1, 2, 3, 3)

    def at(oy, ox, dy, dx):
        off = offset.clone()
        off[0, 0, oy, ox], off[0, 1, oy, ox] = dy, dx
        return deform_conv2d(x, off, weight)[0, 0, oy, ox].item()

    # interior: 0.5*0.75*0 + 0.5*0.25*1 + 0.5*0.75*3 + 0.5*0.25*4 = 1.75
    assert at(0, 0, 0.5, 0.25) == pytest.approx(1.75)
    # one corner row above the image: only the in-image corners count (0.5 * x[0, 1])
    assert at(0, 1, -0.5, 0.0) == pytest.approx(0.5)
    # right of the last column: 0.5 * x[2, 2]
    assert at(2, 2, 0.0, 0.5) == pytest.approx(4.0)
    # below the last row but above H: 0.25 * x[2, 0]
    assert at(2, 0, 0.75, 0.0) == pytest.approx(1.5)
    # y <= -1 or x >= W reads zero
    assert at(0, 1, -1.0, 0.0) == 0.0
    assert at(1, 1, 0.0, 2.0) == 0.0
    # corners of four different pixels: (1.25, 1.5) -> 0.75*0.5*4 + 0.75*0.5*5 + 0.25*0.5*7 + 0.25*0.5*8
    assert at(1, 1, 0.25, 0.5) == pytest.approx(0.75 * 0.5 * (4 + 5) + 0.25 * 0.5 * (7 + 8))


def test_random_offsets_and_mask_match_torchvision_reference():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    weight, bias = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    stride, padding, dilation, n_off = 2, 1, 2, 2
    h_out, w_out = out_size(6, 3, stride, padding, dilation), out_size(5, 3, stride, padding, dilation)
    offset = 3 * torch.randn(2, 2 * n_off * 9, h_out, w_out, dtype=torch.float64)  # many land outside
    mask = torch.rand(2, n_off * 9, h_out, w_out, dtype=torch.float64)
    for m in (None, mask):
        got = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, m)
        want = reference_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, m)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    ones = torch.ones_like(mask)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, stride, padding, dilation, ones),
                               deform_conv2d(x, offset, weight, bias, stride, padding, dilation))


def test_gradients_match_finite_differences():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    # fractional offsets kept away from integers (bilinear sampling is only piecewise smooth)
    base = torch.randint(-1, 2, (1, 8, 3, 3)).double()
    offset = (base + 0.2 + 0.6 * torch.rand(1, 8, 3, 3, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d(a[0], a[1], a[2], a[3], 1, 0, 1, a[4]),
        (x, offset, weight, bias, mask))


def test_module_and_shape_checks():
    layer = DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2)
    assert layer.weight.shape == (6, 2, 3, 3) and layer.bias.shape == (6,)
    x = torch.randn(2, 4, 5, 5)
    offset = torch.zeros(2, 18, 5, 5)
    torch.testing.assert_close(layer(x, offset), F.conv2d(x, layer.weight, layer.bias, 1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"offset: expected \(B, 2 \* offset_groups \* 9"):
        layer(x, torch.zeros(2, 17, 5, 5))
    with pytest.raises(ValueError, match="offset: expected"):
        layer(x, torch.zeros(2, 18, 4, 5))
    with pytest.raises(ValueError, match="offset: expected"):
        layer(x, torch.zeros(1, 18, 5, 5))
    with pytest.raises(ValueError, match=r"mask: expected \(2, 9, 5, 5\)"):
        layer(x, offset, torch.ones(2, 8, 5, 5))
    with pytest.raises(ValueError, match="offset_groups"):
        layer(x, torch.zeros(2, 18 * 3, 5, 5))
    with pytest.raises(ValueError, match="not a multiple of weight.shape"):
        deform_conv2d(torch.randn(1, 3, 5, 5), torch.zeros(1, 18, 3, 3), torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        DeformConv2d(3, 4, 3, groups=2)


# ----------------------------------------------------------------------------------------------
# keyed gather tables as offsets
# ----------------------------------------------------------------------------------------------


def protect(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    idx = pi.view(1, 1, -1) if pi.dim() == 1 else (pi.unsqueeze(0) if pi.dim() == 2 else pi)
    return torch.gather(flat, 2, idx.expand(b, c, h * w)).reshape(b, c, h, w)


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"),
                         list(itertools.product((1, 2), (0, 1), (1, 2), (1, 2))))
def test_exported_offsets_reproduce_keyed_conv(stride, padding, dilation, groups):
    torch.manual_seed(4)
    in_hw = (8, 7)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(3, 4, *in_hw)
    plain = conv(x)
    t = plain.shape[2] * plain.shape[3]
    pi_out = perm(1, t)
    for pi_in in (perm(2, 56), torch.stack([perm(10 + c, 56) for c in range(4)])):
        layer = KeyedConv2d(conv, in_hw, pi_in, pi_out)
        x_prot = protect(x, pi_in)
        offsets = layer.to_offsets()
        n_groups = 1 if pi_in.dim() == 1 else 4
        assert offsets.shape == (1, 2 * n_groups * 9, *plain.shape[2:])
        assert torch.equal(offsets, offsets.round())  # every tap lands exactly on one cell
        got = deform_conv2d(x_prot, offsets.expand(3, -1, -1, -1), conv.weight, conv.bias, stride,
                            padding, dilation)
        # deform conv on the slot grid == plain conv on the plain input (natural output order)
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        # ... == the keyed conv after putting its output slots in natural order
        torch.testing.assert_close(got.flatten(2)[..., pi_out], layer(x_prot).flatten(2),
                                   atol=1e-5, rtol=1e-5)


def test_offsets_from_perms_and_per_frame_tables():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    x = torch.randn(4, 2, 5, 6)
    plain = conv(x)
    pi_out = perm(3, 30)
    frames = torch.stack([torch.stack([perm(100 + 10 * b + c, 30) for c in range(2)]) for b in range(4)])
    layer = KeyedConv2d(conv, (5, 6), frames[0], pi_out, entry=True)
    from models.keyed_ops import gather_table, position_table

    table = gather_table(position_table((5, 6), (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), pi_out), frames)
    offsets = table_to_offsets(table, None, pi_out, (5, 6), (5, 6), 3, 1, 1, 1)
    assert offsets.shape == (4, 2 * 2 * 9, 5, 6)
    got = deform_conv2d(protect(x, frames), offsets, conv.weight, None, 1, 1, 1)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.flatten(2)[..., pi_out],
                               layer(protect(x, frames), frames).flatten(2), atol=1e-5, rtol=1e-5)
    # G=None: built from pi_in and pi_out
    pi_in = perm(4, 30)
    offsets = table_to_offsets(None, pi_in, pi_out, (5, 6), (5, 6), 3, 1, 1, 1)
    got = deform_conv2d(protect(x, pi_in), offsets.expand(4, -1, -1, -1), conv.weight, None, 1, 1, 1)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="give G or pi_in"):
        table_to_offsets(None, None, pi_out, (5, 6), (5, 6), 3, 1, 1, 1)
    with pytest.raises(ValueError, match=r"G: expected \(\.\.\., 30, 9\)"):
        table_to_offsets(table[..., :4], None, pi_out, (5, 6), (5, 6), 3, 1, 1, 1)


def test_padding_taps_land_outside_the_image():
    layer = KeyedConv2d(nn.Conv2d(1, 1, 3, padding=1), (4, 4), perm(5, 16), perm(6, 16))
    off = layer.to_offsets().view(9, 2, 4, 4)  # (tap, (dy, dx), H_out, W_out) in natural order
    ky = torch.arange(3).repeat_interleave(3).view(9, 1, 1)
    kx = torch.arange(3).repeat(3).view(9, 1, 1)
    qy, qx = torch.arange(4).view(1, 4, 1), torch.arange(4).view(1, 1, 4)
    uy, ux = qy - 1 + ky, qx - 1 + kx
    padding_tap = (uy < 0) | (uy > 3) | (ux < 0) | (ux > 3)
    y = (uy + off[:, 0])[padding_tap]
    x = (ux + off[:, 1])[padding_tap]
    assert padding_tap.any() and bool(((y <= -1) | (x <= -1)).all())
