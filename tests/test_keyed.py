"""Keyed layers and keyed twins of the plain models: exactness, rotation, wrong keys, gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.keyed import KeyedNet, keyed
from models.keyed_layers import KeyedAvgPool2d, KeyedConv2d, KeyedMaxPool2d
from models.keyed_ops import avg_pool_divisor, gather_columns, gather_table, layer_frame_perm, position_table
from models.keyed_rows import RowGather
from models.plain import CompactNet, build_model
from models.tables import random_permutation_torch
from pipeline.bench.model import peak_memory
from sensor.keys import Key
from tests import reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
SECRET = bytes(range(32))
KEY = Key(SECRET)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def perm_table(seed: int, *lead: int, n: int) -> torch.Tensor:
    """(*lead, n) stack of independent keyed permutations.

    Seeds go through the key's HMAC: nearby raw seeds give related tables (seeds differing in
    bit 0 give ``pi ^ 1``), so raw consecutive seeds would not be independent frames.
    """
    count = int(np.prod(lead)) if lead else 1
    rows = [random_permutation_torch(KEY.subkey("test/perm", seed, i), n) for i in range(count)]
    return torch.stack(rows).reshape(*lead, n)


def protect(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Slot-order grid of x (B, C, H, W) under perm: (N,) shared, (C, N) per channel,
    (B, 1, N) per frame or (B, C, N) per frame and channel."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    if perm.dim() == 1:
        return flat[..., perm].reshape(b, c, h, w)
    idx = perm.unsqueeze(0) if perm.dim() == 2 else perm
    return torch.gather(flat, 2, idx.expand(b, c, h * w)).reshape(b, c, h, w)


def randomize_bn(model: nn.Module, shape: tuple[int, int, int], seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = 1.0  # running stats := this batch's statistics
        model.train()
        model(torch.randn(16, *shape, generator=g))
        for bn in bns:
            c = bn.num_features
            bn.momentum = 0.1
            bn.running_mean += 0.3 * torch.randn(c, generator=g) * bn.running_var.sqrt()
            bn.running_var *= torch.empty(c).uniform_(0.5, 2.0, generator=g)
            bn.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
            bn.bias.copy_(0.3 * torch.randn(c, generator=g))
    return model.eval()


MODEL_SPECS = {
    "compact": (1, 28, 28),
    "preresnet20": (3, 32, 32),
    "vgg16_bn": (3, 32, 32),
}


@pytest.fixture(scope="module", params=list(MODEL_SPECS))
def plain_model(request):
    name = request.param
    shape = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = randomize_bn(build_model(name, shape[0], 10), shape, seed=1)
    return name, shape, model


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max abs diff {err:.3g} > {TOL}"
    assert torch.equal(got.argmax(1), want.argmax(1)), f"{what}: argmax differs"


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


def test_position_table_matches_loop_reference():
    in_hw, out_hw, k, s, p, d = (5, 6), (3, 3), (3, 2), (2, 2), (1, 0), (1, 2)
    out_perm = perm_table(7, n=9)
    pos = position_table(in_hw, out_hw, k, s, p, d, out_perm)
    assert pos.shape == (9, 6)
    for t in range(9):
        qy, qx = divmod(int(out_perm[t]), out_hw[1])
        for j in range(6):
            uy = qy * s[0] - p[0] + (j // k[1]) * d[0]
            ux = qx * s[1] - p[1] + (j % k[1]) * d[1]
            inside = 0 <= uy < in_hw[0] and 0 <= ux < in_hw[1]
            assert pos[t, j] == (uy * in_hw[1] + ux if inside else 30)


def test_gather_table_inverts_input_perm_and_keeps_sentinel():
    pos = position_table((4, 4), (4, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    pi = perm_table(3, n=16)
    g = gather_table(pos, pi)
    inside = pos < 16
    assert torch.equal(pi[g[inside]], pos[inside])  # slot G holds position u
    assert torch.equal(g[~inside], pos[~inside])  # sentinel unchanged
    per_frame = gather_table(pos, perm_table(5, 3, 2, n=16))
    assert per_frame.shape == (3, 2, 16, 9)


def test_avg_pool_divisor_matches_torch():
    x = torch.ones(1, 1, 7, 9)
    for count_include_pad, ceil in itertools.product((True, False), (True, False)):
        ref = F.avg_pool2d(x, 3, 2, 1, ceil_mode=ceil, count_include_pad=count_include_pad)
        summed = F.avg_pool2d(x, 3, 2, 1, ceil_mode=ceil, count_include_pad=True, divisor_override=1)
        div = avg_pool_divisor((7, 9), ref.shape[2:], (3, 3), (2, 2), (1, 1), count_include_pad)
        torch.testing.assert_close(summed.flatten() / div, ref.flatten())


# ----------------------------------------------------------------------------------------------
# single layers vs their plain twins
# ----------------------------------------------------------------------------------------------

CONV_CASES = list(itertools.product((1, 2), (0, 1), (1, 2), (1, 2)))  # stride, padding, dilation, groups


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), CONV_CASES)
def test_keyed_conv_equals_conv(stride, padding, dilation, groups):
    torch.manual_seed(stride * 100 + padding * 10 + dilation + groups)
    in_hw = (9, 7)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(3, 4, *in_hw)
    y = conv(x)
    n_in, t = in_hw[0] * in_hw[1], y.shape[2] * y.shape[3]
    pi_out = perm_table(11, n=t)
    for pi_in in (perm_table(10, n=n_in), perm_table(12, 4, n=n_in)):
        layer = KeyedConv2d(conv, in_hw, pi_in, pi_out)
        assert layer.weight is conv.weight and layer.bias is conv.bias
        got = layer(protect(x, pi_in))
        torch.testing.assert_close(got.flatten(2), y.flatten(2)[..., pi_out], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_keyed_conv_rectangular_kernel_same_padding_and_no_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 11)
    for conv in (nn.Conv2d(3, 5, (2, 3), stride=(2, 1), padding=(1, 0), bias=False),
                 nn.Conv2d(3, 5, 4, padding="same"), nn.Conv2d(3, 5, 3, padding="valid")):
        y = conv(x)
        pi_in = perm_table(1, n=88)
        pi_out = perm_table(2, n=y.shape[2] * y.shape[3])
        got = KeyedConv2d(conv, (8, 11), pi_in, pi_out)(protect(x, pi_in))
        assert got.shape == y.shape
        torch.testing.assert_close(got.flatten(2), y.flatten(2)[..., pi_out], atol=1e-5, rtol=1e-5)


POOL_CASES = [
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, padding=1),
    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.MaxPool2d(3, stride=1, padding=1, dilation=2),
    nn.MaxPool2d((2, 3), stride=(1, 2)),
    nn.AvgPool2d(2),
    nn.AvgPool2d(3, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(2, stride=2, ceil_mode=True, divisor_override=3),
]


@pytest.mark.parametrize("pool", POOL_CASES, ids=repr)
def test_keyed_pool_equals_pool(pool):
    torch.manual_seed(0)
    in_hw = (9, 7)  # odd sizes exercise ceil_mode and partial windows
    x = torch.randn(3, 4, *in_hw)
    y = pool(x)
    n_in, t = 63, y.shape[2] * y.shape[3]
    pi_out = perm_table(21, n=t)
    cls = KeyedMaxPool2d if isinstance(pool, nn.MaxPool2d) else KeyedAvgPool2d
    for pi_in in (perm_table(20, n=n_in), perm_table(22, 4, n=n_in)):
        got = cls(pool, in_hw, pi_in, pi_out)(protect(x, pi_in))
        assert got.shape == y.shape
        torch.testing.assert_close(got.flatten(2), y.flatten(2)[..., pi_out], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# channels-last row gathers: every block plan and the autograd path against the plain layers
# ----------------------------------------------------------------------------------------------

# (block_bytes, min_block_rows): the default plan (whole frames per block in these small tests), one
# output slot per block (ranges of slots, padding lists padded with the scratch row), 5-slot blocks
# of the RowGather test (a ragged last block), and blocks capped at half the input activation
BLOCK_PLANS = {"default": None, "one-slot": (1, 1), "five-slots": (400, 1), "half-activation": (1 << 30, 1)}


def set_blocks(module: nn.Module, plan: tuple[int, int] | None) -> None:
    for m in module.modules():
        if plan is not None and hasattr(m, "min_block_rows"):
            m.block_bytes, m.min_block_rows = plan


@pytest.mark.parametrize("table_kind", ["shared", "per-frame"])
@pytest.mark.parametrize("plan", list(BLOCK_PLANS))
def test_row_gather_equals_value_gather(plan, table_kind):
    """RowGather (blocked, and all columns at once) reads what gather_columns reads."""
    torch.manual_seed(0)
    b, c, n_in, t, k = 3, 5, 20, 11, 4
    table = torch.randint(0, n_in + 1, (b, t, k) if table_kind == "per-frame" else (t, k))
    table[..., 0, 1] = n_in  # at least one padding tap
    x = torch.randn(b, c, n_in)
    want = gather_columns(x, table.unsqueeze(1) if table.dim() == 3 else table, -7.0)  # (B, C, K, T)
    want = want.permute(0, 3, 2, 1).reshape(b * t, k * c)  # rows (b, t), columns (tap, channel)
    block_bytes, min_rows = BLOCK_PLANS[plan] or (4 << 20, 256)
    gather = RowGather(table, n_in, c * 4, block_bytes, None, min_rows)
    assert gather.block_rows(b) == {"default": 256, "one-slot": 1, "five-slots": 5, "half-activation": 7}[plan]
    rows = x.transpose(1, 2).contiguous()  # (B, N, C)
    torch.testing.assert_close(gather.columns(rows, -7.0), want, rtol=0, atol=0)
    out = torch.full((b, t, k * c), float("nan"))

    def finish(cols, dst):
        dst.copy_(cols)

    gather.run(rows, -7.0, finish, out)
    torch.testing.assert_close(out.view(b * t, k * c), want, rtol=0, atol=0)


ROW_LAYERS = [
    nn.Conv2d(6, 5, 3, padding=1),
    nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    nn.Conv2d(6, 4, 3, padding=1, groups=2),
    nn.Conv2d(6, 5, 1, stride=2),
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool2d(2, ceil_mode=True),
]


@pytest.mark.parametrize("plan", list(BLOCK_PLANS))
@pytest.mark.parametrize("layer", ROW_LAYERS, ids=repr)
def test_row_paths_equal_plain_layer(layer, plan):
    """Each keyed layer on channels-last rows == its plain twin: static tables (every block plan),
    per-frame tables (entry), inference and autograd paths; outputs stay channels-last."""
    torch.manual_seed(1)
    in_hw = (9, 7)
    x = torch.randn(3, 6, *in_hw)
    want = layer(x)
    t = want.shape[2] * want.shape[3]
    pi_in, pi_out = perm_table(70, n=63), perm_table(71, n=t)
    cls = {nn.Conv2d: KeyedConv2d, nn.MaxPool2d: KeyedMaxPool2d, nn.AvgPool2d: KeyedAvgPool2d}[type(layer)]
    twin = cls(layer, in_hw, pi_in, pi_out, entry=True)
    set_blocks(twin, BLOCK_PLANS[plan])
    frames = perm_table(72, 3, n=63)
    want_slots = want.flatten(2)[..., pi_out]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            x_cl = protect(x, pi_in).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
            got = twin(x_cl)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got.flatten(2), want_slots, atol=1e-5, rtol=1e-5)
            got = twin(protect(x, frames.unsqueeze(1)), frames)  # per-frame tables, NCHW input
            torch.testing.assert_close(got.flatten(2), want_slots, atol=1e-5, rtol=1e-5)
            if grad and isinstance(layer, nn.Conv2d):
                got.square().sum().backward()
                assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
                layer.zero_grad()


def test_row_weight_cache_follows_the_parameter():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    pi = perm_table(1, n=36)
    twin = KeyedConv2d(conv, (6, 6), pi, pi)
    with torch.no_grad():
        twin(protect(x, pi))
        conv.weight.mul_(-2.0)  # an in-place update (an optimizer step) bumps the version
        got = twin(protect(x, pi))
    torch.testing.assert_close(got.flatten(2), conv(x).flatten(2)[..., pi], atol=1e-5, rtol=1e-5)


def test_entry_layer_per_frame_tables():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 6, 6)
    pi_out = perm_table(3, n=36)
    layer = KeyedConv2d(conv, (6, 6), perm_table(1, n=36), pi_out, entry=True)
    want = conv(x).flatten(2)[..., pi_out]
    frames = perm_table(4, 5, n=36)
    got = layer(protect(x, frames.unsqueeze(1)), frames)  # (B, N)
    torch.testing.assert_close(got.flatten(2), want, atol=1e-5, rtol=1e-5)
    frames_c = perm_table(5, 5, 3, n=36)
    got = layer(protect(x, frames_c), frames_c)  # (B, C, N)
    torch.testing.assert_close(got.flatten(2), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-frame table"):
        layer(x, perm_table(6, 4, n=36))  # batch 4 for 5 frames
    inner = KeyedConv2d(conv, (6, 6), None, pi_out)
    with pytest.raises(RuntimeError, match="entry layer"):
        inner(x, frames)


def test_layer_rejects_wrong_input_size():
    layer = KeyedConv2d(nn.Conv2d(3, 4, 3), (6, 6))
    with pytest.raises(ValueError, match=r"\(B, C, 6, 6\) slot grid"):
        layer(torch.randn(1, 3, 6, 7))


# ----------------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fused", "fast"])
def test_keyed_model_equals_plain_model(plain_model, mode):
    name, (c, h, w), model = plain_model
    n = h * w
    shared, per_channel = random_permutation_torch(KEY.subkey("readout"), n), perm_table(31, c, n=n)
    twin_shared = keyed(model, KEY, (c, h, w), shared, mode=mode)
    twin_plane = keyed(model, KEY, (c, h, w), per_channel, mode=mode)
    assert twin_shared.mode == mode and mode in twin_shared.describe()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for batch in (1, 3, 17):
            x = torch.randn(batch, c, h, w, generator=g)
            want = model(x)
            assert want.abs().max() > 0.1  # logits are not degenerate
            assert_same_logits(twin_shared(protect(x, shared)), want, f"{name} {mode} B={batch} (N,)")
            flat = protect(x, shared).flatten(2)  # (B, C, N) input is accepted too
            assert_same_logits(twin_shared(flat), want, f"{name} {mode} B={batch} (B, C, N) input")
            assert_same_logits(twin_plane(protect(x, per_channel)), want, f"{name} {mode} B={batch} (C, N)")
            frames = perm_table(40 + batch, batch, n=n)
            got = twin_shared(protect(x, frames.unsqueeze(1)), input_perm=frames)
            assert_same_logits(got, want, f"{name} {mode} B={batch} rotation (B, N)")
            frames_c = perm_table(50 + batch, batch, c, n=n)
            got = twin_plane(protect(x, frames_c), input_perm=frames_c)
            assert_same_logits(got, want, f"{name} {mode} B={batch} rotation (B, C, N)")


def entry_layer(twin: nn.Module) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in twin.named_modules() if getattr(m, "entry", False))


def test_rotation_rotates_the_entry_order(plain_model):
    """With frame indices, the entry layer writes frame n in the order seeded
    HMAC(key, "layer:<name>/frame" || n) (recomputed here with hmac), every layer that reads or must
    match that order follows it, and the logits stay the plain model's."""
    name, (c, h, w), model = plain_model
    n = h * w
    twin = keyed(model, KEY, (c, h, w), random_permutation_torch(KEY.subkey("readout"), n))
    entry_name, entry = entry_layer(twin)
    assert entry.frame_out == entry_name and twin.frame_orders.sizes == {entry_name: entry.out_perm.numel()}
    seen = {}
    entry.register_forward_hook(lambda mod, args, out: seen.__setitem__("y", out.detach().flatten(2)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, c, h, w, generator=g)
    frames = perm_table(80, 4, n=n)
    index = [5, 6, 2**40 + 3, 6]  # the same counter twice: same order
    first = model[0] if not isinstance(model[0], nn.Sequential) else model[0][0]
    with torch.no_grad():
        want = model(x)
        plain_entry = first(x).flatten(2)
        got = twin(protect(x, frames.unsqueeze(1)), input_perm=frames, frame_index=index)
        assert_same_logits(got, want, f"{name} rotation with frame orders")
        t = plain_entry.shape[-1]
        for i, f in enumerate(index):
            order = random_permutation_torch(reference.subkey(SECRET, f"layer:{entry_name}/frame", f), t)
            assert torch.equal(layer_frame_perm(KEY, entry_name, [f], t)[0], order)
            torch.testing.assert_close(seen["y"][i], plain_entry[i][:, order], atol=1e-5, rtol=1e-5)
        orders = layer_frame_perm(KEY, entry_name, index, t)
        assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[1], orders[3])
        assert not any(torch.equal(o, entry.out_perm) for o in orders)  # never the static order
        # the static orders (pinned in tests/data/kat_v1.json) are used without frame indices
        twin(protect(x, frames.unsqueeze(1)), input_perm=frames)
        torch.testing.assert_close(seen["y"], plain_entry[..., entry.out_perm], atol=1e-5, rtol=1e-5)
        # a static readout with rotating layer orders is exact too
        static = random_permutation_torch(KEY.subkey("readout"), n)
        assert_same_logits(twin(protect(x, static), frame_index=index), want, f"{name} static readout")
    with pytest.raises(ValueError, match="frame_index"):
        twin(protect(x, static), frame_index=[1, 2])


def test_rotation_with_per_channel_tables_and_residual_chain():
    """PreResNet: the identity shortcuts of layer1 carry the entry's rotating order, so their second
    convs write it and layer2's first block reads it; CFA-plane (per-channel) frame tables."""
    torch.manual_seed(0)
    shape = (4, 16, 16)
    model = randomize_bn(build_model("preresnet20", 4, 10), shape, seed=5)
    twin = keyed(model, KEY, shape, perm_table(90, 4, n=256))
    assert twin.layer1[2].conv2.frame_out == "conv1" and twin.layer2[0].downsample[0].frame_in == "conv1"
    assert twin.layer2[0].conv2.frame_out is None
    x = torch.randn(3, *shape)
    frames = perm_table(91, 3, 4, n=256)
    with torch.no_grad():
        got = twin(protect(x, frames), input_perm=frames, frame_index=[0, 1, 2])
        assert_same_logits(got, model(x), "preresnet20 rotation (B, C, N)")


def test_classifier_rotates_the_entry_order_with_the_readout():
    """KeyedClassifier with rotation: frame n is read with its readout table and the entry layer
    writes it in frame n's order; the logits equal the plain model on the unscrambled frames."""
    from pipeline.stream.classifier import KeyedClassifier
    from pipeline.stream.inputs import network_input
    from sensor.frame import FrameFormat
    from sensor.readout import readout_permutation

    torch.manual_seed(0)
    model = randomize_bn(build_model("compact", 1, 10), (1, 12, 16), seed=6)
    fmt = FrameFormat(16, 1023, height=12, width=16, rotation=True)
    clf = KeyedClassifier(model, KEY, fmt, device="cpu")
    entry_name, entry = entry_layer(clf.model)
    seen = {}
    entry.register_forward_hook(lambda mod, args, out: seen.__setitem__("y", out.flatten(2)))
    rng = np.random.default_rng(0)
    plain = rng.integers(16, 1024, (3, 12, 16), dtype=np.uint16)
    index = [3, 4, 40]
    prot = np.stack([readout_permutation(KEY, "pixel", 12, 16, n).forward(f)
                     for f, n in zip(plain, index, strict=True)])
    with torch.inference_mode():
        got = clf.logits_array(prot, index)
        x = network_input(plain, fmt)
        assert_same_logits(got, model(x), "classifier with rotation")
        want = model.features[0](x).flatten(2)
    for i, n in enumerate(index):
        order = layer_frame_perm(KEY, entry_name, [n], 192)[0]
        torch.testing.assert_close(seen["y"][i], want[i][:, order], atol=1e-5, rtol=1e-5)


def test_fused_feature_maps_are_channels_last(plain_model):
    name, shape, model = plain_model
    twin = keyed(model, KEY, shape, perm_table(1, n=shape[1] * shape[2]))
    layouts = []
    for m in twin.modules():
        if isinstance(m, (KeyedConv2d, KeyedMaxPool2d, nn.BatchNorm2d)):
            m.register_forward_hook(lambda mod, args, out: layouts.append(
                out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        twin(torch.randn(2, *shape))
    assert layouts and all(layouts), f"{name}: a feature map is not channels-last"


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_fused_peak_memory_is_at_most_twice_plain(name):
    """No activation-sized im2col: the peak of live tensors during a fused forward (torch's profiler
    with profile_memory, allocations and frees in time order) is at most 2x the plain forward's."""
    shape = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = build_model(name, shape[0], 10).eval()
    pi = perm_table(2, n=shape[1] * shape[2])
    twin = keyed(model, KEY, shape, pi)
    x = torch.randn(16, *shape)
    x_prot = protect(x, pi)
    frames = perm_table(3, 16, n=shape[1] * shape[2])
    x_rot = protect(x, frames.unsqueeze(1))
    with torch.inference_mode():
        model(x), twin(x_prot)  # warm: the twin prepares its row weights and gather plans once
        plain = peak_memory(lambda: model(x))
        fused = peak_memory(lambda: twin(x_prot))
        rotating = peak_memory(lambda: twin(x_rot, input_perm=frames, frame_index=range(16)))
    print(f"{name}: peak plain {plain / 2**20:.2f} MiB, fused {fused / 2**20:.2f} MiB, "
          f"fused with rotation {rotating / 2**20:.2f} MiB")
    assert plain > x.numel() * 4  # the measurement sees the activations
    assert fused <= 2 * plain, f"{name}: fused peak {fused} > 2 x plain {plain}"
    assert rotating <= 2 * plain, f"{name}: rotating peak {rotating} > 2 x plain {plain}"


def test_fused_mode_never_uses_natural_order(plain_model):
    name, shape, model = plain_model
    twin = keyed(model, KEY, shape, perm_table(1, n=shape[1] * shape[2]))
    layers = [m for m in twin.modules() if isinstance(m, (KeyedConv2d, KeyedMaxPool2d, KeyedAvgPool2d))]
    assert len(layers) == twin.n_keyed_conv + twin.n_keyed_pool
    assert twin.n_keyed_conv == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert twin.n_keyed_pool == sum(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules())
    plain_types = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    assert not any(isinstance(m, plain_types) for m in twin.modules()), "a plain spatial layer is left"
    orders = set()
    for layer in layers:
        t = layer.out_perm.numel()
        if t > 1:
            assert not torch.equal(layer.out_perm, torch.arange(t)), f"{name}: natural order output"
        orders.add(tuple(layer.out_perm.tolist()))
    assert len(orders) > len(layers) // 3  # fresh orders (residual pairs and 1x1 maps share)


def test_fast_mode_keys_only_the_first_layer(plain_model):
    name, shape, model = plain_model
    twin = keyed(model, KEY, shape, perm_table(1, n=shape[1] * shape[2]), mode="fast")
    keyed_layers = [m for m in twin.modules() if isinstance(m, (KeyedConv2d, KeyedMaxPool2d))]
    assert len(keyed_layers) == 1 and keyed_layers[0].entry
    assert torch.equal(keyed_layers[0].out_perm, torch.arange(keyed_layers[0].out_perm.numel()))
    assert "NATURAL" in twin.describe() and twin.mode == "fast"


def test_state_dict_and_parameters_are_the_plain_models(plain_model):
    name, shape, model = plain_model
    for mode in ("fused", "fast"):
        twin = keyed(model, KEY, shape, perm_table(3, shape[0], n=shape[1] * shape[2]), mode=mode)
        sd_twin, sd_plain = twin.state_dict(), model.state_dict()
        assert list(sd_twin.keys()) == list(sd_plain.keys())
        for k, v in sd_twin.items():
            assert v.data_ptr() == sd_plain[k].data_ptr(), f"{name}: {k} is a copy"
        twin_params = dict(twin.named_parameters())
        plain_params = dict(model.named_parameters())
        assert twin_params.keys() == plain_params.keys()
        assert all(twin_params[k] is plain_params[k] for k in plain_params)
        # the tables are buffers, but not persistent ones
        assert any(n.endswith("table") for n, _ in twin.named_buffers())
        assert not any("table" in k or "perm" in k for k in sd_twin)


def test_gradients_flow_to_plain_parameters():
    torch.manual_seed(0)
    shape = (3, 16, 16)
    model = randomize_bn(build_model("preresnet20", 3, 5), shape, seed=3)
    pi = perm_table(8, 3, n=256)
    twin = keyed(model, KEY, shape, pi)
    x, target = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), target).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(twin(protect(x, pi)), target).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert model.conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].downsample[0].weight.grad.abs().sum() > 0


def test_fine_tuning_the_twin_updates_the_plain_model():
    torch.manual_seed(0)
    model = build_model("compact", 1, 3)
    pi = perm_table(9, n=256)
    twin = keyed(model, KEY, (1, 16, 16), pi).train()
    before = model.features[0].weight.detach().clone()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    x = torch.randn(8, 1, 16, 16)
    F.cross_entropy(twin(protect(x, pi)), torch.arange(8) % 3).backward()
    opt.step()
    assert not torch.equal(model.features[0].weight, before)
    with torch.no_grad():  # train-mode BatchNorm (batch statistics) is order-free too
        model.train()
        assert_same_logits(twin(protect(x, pi)), model(x), "train mode")


def test_flatten_of_a_larger_map_permutes_linear_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 16, 5)).eval()
    pi = perm_table(4, n=64)
    twin = keyed(model, KEY, (2, 8, 8), pi)
    assert twin[5].weight is model[5].weight
    x = torch.randn(6, 2, 8, 8)
    with torch.no_grad():
        assert_same_logits(twin(protect(x, pi)), model(x), "flatten + linear")
    assert list(twin.state_dict()) == list(model.state_dict())


def test_to_moves_tables_with_the_model():
    model = build_model("compact", 1, 3)
    twin = keyed(model, KEY, (1, 16, 16), perm_table(1, n=256))
    twin.to("meta")
    assert all(b.device.type == "meta" for b in twin.buffers())
    assert all(p.device.type == "meta" for p in twin.parameters())


def test_dtype_conversion_keeps_parameters_shared():
    torch.manual_seed(0)
    model = randomize_bn(build_model("compact", 1, 3), (1, 16, 16), seed=4)
    pi = perm_table(1, n=256)
    twin = keyed(model, KEY, (1, 16, 16), pi).double()
    assert model.features[0].weight.dtype == torch.float64  # same Parameter objects
    assert all(b.dtype == torch.int64 for n, b in twin.named_buffers() if n.endswith("table"))
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(protect(x, pi)), model(x), atol=1e-12, rtol=1e-12)


@pytest.fixture
def exact_cuda():
    """CUDA with full-precision float32 convolutions and matmuls (TF32 off), restored afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("mode", ["fused", "fast"])
def test_cuda_models_equal_plain(plain_model, mode, exact_cuda):
    """The same row gathers on CUDA (tables on the device): static, per-channel and rotating tables,
    batch 1/3/17; fused peak memory at most 2x plain (torch.cuda.max_memory_allocated)."""
    name, (c, h, w), model = plain_model
    n = h * w
    model = model.to(exact_cuda)
    try:
        shared = random_permutation_torch(KEY.subkey("readout"), n).to(exact_cuda)
        twin = keyed(model, KEY, (c, h, w), shared, mode=mode)
        assert all(b.device.type == "cuda" for b in twin.buffers())
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for batch in (1, 3, 17):
                x = torch.randn(batch, c, h, w, generator=g).to(exact_cuda)
                want = model(x)
                assert_same_logits(twin(protect(x, shared)), want, f"cuda {name} {mode} B={batch}")
                frames = perm_table(40 + batch, batch, n=n).to(exact_cuda)
                got = twin(protect(x, frames.unsqueeze(1)), input_perm=frames, frame_index=range(batch))
                assert_same_logits(got, want, f"cuda {name} {mode} B={batch} rotation")
            x = torch.randn(16, c, h, w, generator=g).to(exact_cuda)
            x_prot = protect(x, shared)
            model(x), twin(x_prot)
            plain, keyed_peak = peak_memory(lambda: model(x), exact_cuda), peak_memory(lambda: twin(x_prot), exact_cuda)
            assert keyed_peak <= 2 * plain, f"cuda {name} {mode}: peak {keyed_peak} > 2 x {plain}"
    finally:
        model.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rotation_matches_plain():
    torch.manual_seed(0)
    model = randomize_bn(build_model("compact", 1, 10), (1, 16, 16), seed=0).cuda()
    twin = keyed(model, KEY, (1, 16, 16), perm_table(1, n=256))
    x = torch.randn(4, 1, 16, 16)
    frames = perm_table(2, 4, n=256)
    with torch.no_grad():
        got = twin(protect(x, frames.unsqueeze(1)).cuda(), frames.cuda())
        assert_same_logits(got.cpu(), model(x.cuda()).cpu(), "cuda")


def test_keyed_accepts_numpy_tables_and_rejects_bad_input():
    model = build_model("compact", 1, 3)
    pi = perm_table(1, n=256)
    twin = keyed(model, KEY, (1, 16, 16), pi.numpy())
    assert isinstance(twin, KeyedNet)
    with pytest.raises(ValueError, match="mode"):
        keyed(model, KEY, (1, 16, 16), pi, mode="turbo")
    with pytest.raises(ValueError, match="not a permutation"):
        keyed(model, KEY, (1, 16, 16), torch.zeros(256, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(256,\) or \(1, 256\)"):
        keyed(model, KEY, (1, 16, 16), perm_table(1, n=255))
    with pytest.raises(TypeError, match="integer"):
        keyed(model, KEY, (1, 16, 16), pi.float())
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        twin(torch.randn(2, 1, 16, 15))
    with pytest.raises(NotImplementedError, match="Upsample"):
        keyed(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2)), KEY, (1, 8, 8),
              perm_table(1, n=64))


# ----------------------------------------------------------------------------------------------
# wrong keys
# ----------------------------------------------------------------------------------------------


def quadrant_data(n: int, g: torch.Generator, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = quadrant of a bright 4x4 square; every class has the same pixel histogram
    distribution, so only the spatial arrangement carries the label."""
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, hw, hw, generator=g)
    half = hw // 2
    oy = torch.randint(0, half - 3, (n,), generator=g) + (y // 2) * half
    ox = torch.randint(0, half - 3, (n,), generator=g) + (y % 2) * half
    rows = oy[:, None, None] + torch.arange(4)[None, :, None]
    cols = ox[:, None, None] + torch.arange(4)[None, None, :]
    x[torch.arange(n)[:, None, None], 0, rows, cols] += 2.0
    return x, y


@pytest.fixture(scope="module")
def trained_compact():
    """A small compact net trained (a fraction of a second) on the quadrant task."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = CompactNet(1, 4, widths=(8, 16, 32))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(60):
        x, y = quadrant_data(32, g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_wrong_key_gives_unrelated_logits(trained_compact):
    """A twin fed under the wrong key is no better than chance on a task where only the spatial
    arrangement carries the label (plain accuracy ~1, chance 0.25)."""
    model = trained_compact
    g = torch.Generator().manual_seed(1)
    x, y = quadrant_data(400, g)
    n = 256
    right_pi = random_permutation_torch(KEY.subkey("readout/pixel"), n)
    twin = keyed(model, KEY, (1, 16, 16), right_pi)
    with torch.no_grad():
        plain = model(x)
        assert_same_logits(twin(protect(x, right_pi)), plain, "right key")
    accuracy = (plain.argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
    results: dict[str, list[tuple[float, float]]] = {"wrong input perm": [], "wrong layer key": [],
                                       "wrong rotation tables": []}
    for i in range(8):
        other_key = Key(bytes([i + 1] * 32))
        with torch.no_grad():
            # (a) wrong input permutation: the frame was read out under another key
            wrong_pi = random_permutation_torch(other_key.subkey("readout/pixel"), n)
            wrong = {"wrong input perm": twin(protect(x, wrong_pi))}
            # (b) wrong layer key: the first layer writes other_key's order, KEY's layers read it
            hybrid = keyed(model, KEY, (1, 16, 16), right_pi)
            hybrid.features[0] = keyed(model, other_key, (1, 16, 16), right_pi).features[0]
            wrong["wrong layer key"] = hybrid(protect(x, right_pi))
            # (c) per-frame rotation: each frame read with another frame's table
            frames = perm_table(60 + i, 400, n=n)
            wrong["wrong rotation tables"] = twin(protect(x, frames.unsqueeze(1)),
                                                  input_perm=frames.roll(1, dims=0))
        for what, logits in wrong.items():
            assert (logits - plain).abs().max() > 1000 * TOL, what
            results[what].append(((logits.argmax(1) == y).float().mean().item(),
                                  (logits.argmax(1) == plain.argmax(1)).float().mean().item()))
    for what, runs in results.items():
        acc, agree = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
        print(f"{what}: mean accuracy {acc:.3f}, agreement {agree:.3f}")
        # chance is 0.25 and the plain model is ~1.0: a mean over 8 keys below 0.4 is no classifier
        assert acc < 0.4, f"{what}: mean accuracy {acc:.2f} over {len(runs)} wrong keys"
        assert agree < 0.4, f"{what}: mean argmax agreement with the plain model {agree:.2f}"
