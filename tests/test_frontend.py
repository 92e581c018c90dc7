"""The front end: plain INTER_AREA / binning against OpenCV, the keyed front end against the plain one,
whole keyed models and the classifier on frames larger than the model input, with rotation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.frontend import (
    KeyedResize,
    area_contributions,
    area_resize,
    area_weights,
    frame_tables,
    frame_tables_numpy,
)
from models.keyed import keyed
from models.keyed_ops import layer_frame_perm
from models.plain import build_model
from models.tables import random_permutation_torch
from sensor.keys import Key
from tests.test_keyed import assert_same_logits, perm_table, protect, randomize_bn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = Key(bytes(range(32)))
SIZES = [((64, 96), (32, 32)),  # integer factors 2 x 3: binning
         ((108, 192), (32, 32)),  # 3.375 x 6
         ((100, 100), (7, 9)),
         ((33, 47), (32, 11)),  # barely downscaled rows
         ((40, 40), (40, 40))]  # identity


def cv2_area(x: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return np.stack([np.stack([cv2.resize(x[b, c].numpy(), (w, h), interpolation=cv2.INTER_AREA)
                               for c in range(x.shape[1])]) for b in range(x.shape[0])])


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_area_resize_equals_opencv_inter_area(in_hw, out_hw):
    x = torch.rand(2, 3, *in_hw, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(area_resize(x, out_hw).numpy(), cv2_area(x, out_hw), rtol=0, atol=1e-6)


def test_binning_is_the_average_of_each_block():
    x = torch.rand(1, 4, 12, 18, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(area_resize(x, (4, 6)), F.avg_pool2d(x, 3))
    assert area_contributions((12, 18), (4, 6)).uniform == pytest.approx(1 / 9)
    assert area_contributions((12, 18), (4, 6)).sparse_p.size == 0
    with pytest.raises(ValueError, match="downscale"):
        area_resize(x, (13, 6))


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_area_table_is_the_separable_weight_matrix(in_hw, out_hw):
    """Main plus extra contributions, scattered into a dense (T, N) matrix, give kron(Ry, Rx)."""
    table = area_contributions(in_hw, out_hw)
    t, n = out_hw[0] * out_hw[1], in_hw[0] * in_hw[1]
    dense = np.zeros((t, n))
    np.add.at(dense, (table.main_pos, np.arange(n)), table.main_w)
    np.add.at(dense, (table.extra_pos, table.extra_p), table.extra_w)
    want = np.kron(area_weights(in_hw[0], out_hw[0]), area_weights(in_hw[1], out_hw[1]))
    np.testing.assert_allclose(dense, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_keyed_resize_equals_plain_resize(in_hw, out_hw):
    """Static shared and per-channel orders, per-frame orders (B, N) and (B, C, N): the keyed front end's
    output is the plain front end's output in the key-derived output order."""
    torch.manual_seed(2)
    n, t = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    x = torch.rand(3, 4, *in_hw)
    want = area_resize(x, out_hw).flatten(2)
    pi_out = perm_table(5, n=t)
    for pi_in in (perm_table(6, n=n), perm_table(7, 4, n=n)):
        layer = KeyedResize(in_hw, out_hw, pi_in, pi_out)
        got = layer(protect(x, pi_in))
        assert got.shape == (3, 4, *out_hw)
        torch.testing.assert_close(got.flatten(2), want[..., pi_out], atol=1e-6, rtol=1e-5)
        assert not any(k in layer.state_dict() for k in ("dest", "in_perm"))  # tables never saved
    frames = perm_table(8, 3, n=n)
    got = layer(protect(x, frames.unsqueeze(1)), frames)
    torch.testing.assert_close(got.flatten(2), want[..., pi_out], atol=1e-6, rtol=1e-5)
    frames = perm_table(9, 3, 4, n=n)
    got = layer(protect(x, frames), frames)
    torch.testing.assert_close(got.flatten(2), want[..., pi_out], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_frame_tables_kernel_equals_its_reference_and_the_torch_tables(in_hw, out_hw):
    """The per-frame slot tables of the CPU path (numba, one pass per frame) equal the numpy reference
    and the torch path's (other devices) bit for bit, for every batch layout of input and output orders."""
    n, t = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    layer = KeyedResize(in_hw, out_hw, perm_table(20, n=n), perm_table(21, n=t))
    area = area_contributions(in_hw, out_hw)  # the geometry the layer was built from
    assert np.array_equal(area.main_pos, (area.row_cell[:, None] + area.col_cell[None, :]).reshape(-1))
    assert np.array_equal(area.marked_p[area.sparse_u], area.sparse_p)
    for k, (b_in, channels, b_out) in enumerate([(3, 1, 3), (3, 4, 1), (1, 4, 3), (1, 1, 1), (2, 4, 2)]):
        in_perm = perm_table(30 + k, b_in, channels, n=n)
        out_perm = perm_table(40 + k, b_out, n=t)
        inv_out = np.argsort(out_perm.numpy(), axis=1)
        dest, slots = frame_tables(in_perm.numpy(), area.row_cell, area.col_cell, inv_out, area.mark,
                                   area.marked_p.size)
        want_dest, want_slots = frame_tables_numpy(in_perm.numpy(), area.main_pos, inv_out, area.marked_p)
        assert dest.shape == (max(b_in, b_out), channels, n) and slots.shape == (b_in, channels, area.marked_p.size)
        assert np.array_equal(dest, want_dest) and np.array_equal(slots, want_slots)
        assert np.array_equal(np.take_along_axis(in_perm.numpy(), slots, 2),
                              np.broadcast_to(area.marked_p, slots.shape))
        for got, want in zip(layer._tables(in_perm, out_perm), layer._tables_torch(in_perm, out_perm), strict=True):
            assert got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(ValueError, match="frame_tables"):
        frame_tables(np.zeros((1, 1, n + 1), np.int64), area.row_cell, area.col_cell, inv_out, area.mark, 0)


def test_keyed_resize_at_1080p():
    torch.manual_seed(3)
    in_hw, out_hw = (1080, 1920), (32, 32)
    x = torch.rand(1, 1, *in_hw)
    pi_in, pi_out = perm_table(10, n=1080 * 1920), perm_table(11, n=1024)
    got = KeyedResize(in_hw, out_hw, pi_in, pi_out)(protect(x, pi_in))
    want = torch.from_numpy(cv2_area(x, out_hw)).flatten(2)[..., pi_out]
    torch.testing.assert_close(got.flatten(2), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fused", "fast"])
@pytest.mark.parametrize(("name", "channels"), [("compact", 1), ("preresnet20", 4)])
def test_keyed_model_with_front_end_equals_plain_model_on_resampled_frames(name, channels, mode):
    """A model trained at 32x32 classifies protected 96x120 frames exactly: keyed front end + keyed twin
    == plain model on the plain front end's output; with rotation, the front end's output order is
    frame n's ``layer:frontend/frame`` order."""
    torch.manual_seed(4)
    frame_hw, model_hw = (96, 120), (32, 32)
    n = frame_hw[0] * frame_hw[1]
    model = randomize_bn(build_model(name, channels, 10), (channels, *model_hw), seed=7)
    static = perm_table(12, channels, n=n) if channels > 1 else perm_table(12, n=n)
    twin = keyed(model, KEY, (channels, *frame_hw), static, mode=mode, model_hw=model_hw)
    assert list(twin.state_dict()) == list(model.state_dict())
    assert "front end" in twin.describe() and twin.model_hw == model_hw
    front = twin.frontend
    assert not torch.equal(front.out_perm, torch.arange(1024))
    seen = {}
    front.register_forward_hook(lambda mod, args, out: seen.__setitem__("y", out.flatten(2)))
    x = torch.rand(3, channels, *frame_hw)
    index = [0, 7, 7]
    with torch.no_grad():
        small = area_resize(x, model_hw)
        want = model(small)
        assert_same_logits(twin(protect(x, static if static.dim() == 1 else static)), want, f"{name} static")
        frames = perm_table(13, 3, channels, n=n)
        got = twin(protect(x, frames), input_perm=frames, frame_index=index)
        assert_same_logits(got, want, f"{name} {mode} rotation")
    orders = layer_frame_perm(KEY, "frontend", index, 1024)
    for i in range(3):
        torch.testing.assert_close(seen["y"][i], small.flatten(2)[i][:, orders[i]], atol=1e-6, rtol=1e-5)


def test_classifier_reads_sensor_sized_frames_through_the_front_end():
    """Quad readout of 64x96 RGGB frames (4 CFA planes of 32x48, binned per plane to 16x16... here
    area-resampled to 16x24), with rotation: logits equal the plain model on network_input(size=...)."""
    from pipeline.stream.classifier import KeyedClassifier
    from pipeline.stream.inputs import network_input
    from sensor.frame import FrameFormat
    from sensor.readout import readout_permutation

    torch.manual_seed(5)
    model_hw = (16, 24)
    model = randomize_bn(build_model("compact", 4, 10), (4, *model_hw), seed=8)
    for rotation in (False, True):
        fmt = FrameFormat(64, 1023, "RGGB", scheme="quad", rotation=rotation, height=64, width=96)
        clf = KeyedClassifier(model, KEY, fmt, device="cpu", model_hw=model_hw)
        plain = np.random.default_rng(1).integers(64, 1024, (3, 64, 96), dtype=np.uint16)
        index = [11, 12, 13]
        prot = np.stack([readout_permutation(KEY, "quad", 64, 96, n if rotation else None).forward(f)
                         for f, n in zip(plain, index, strict=True)])
        with torch.inference_mode():
            got = clf.logits_array(prot, index)
            want = model(network_input(plain, fmt, size=model_hw))
        assert_same_logits(got, want, f"classifier with front end, rotation={rotation}")


def test_front_end_order_is_independent_of_other_layer_names():
    pi = random_permutation_torch(KEY.subkey("test/readout"), 64 * 64)
    twin = keyed(build_model("compact", 1, 3), KEY, (1, 64, 64), pi, model_hw=(32, 32))
    assert twin.frame_orders.sizes == {"frontend": 1024}
    first = twin.features[0]
    assert first.frame_in == "frontend" and first.frame_out is None and not first.takes_input_perm


def test_cuda_front_end_and_classifier_equal_plain():
    """The keyed front end and the keyed classifier on CUDA (tables and per-frame builds on the device)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pipeline.stream.classifier import KeyedClassifier
    from pipeline.stream.inputs import network_input
    from sensor.frame import FrameFormat
    from sensor.readout import readout_permutation

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda = torch.device("cuda")
        in_hw, out_hw = (108, 192), (32, 32)
        x = torch.rand(2, 4, *in_hw).to(cuda)
        pi_in, pi_out = perm_table(20, 4, n=108 * 192).to(cuda), perm_table(21, n=1024).to(cuda)
        layer = KeyedResize(in_hw, out_hw, pi_in, pi_out, device=cuda)
        got = layer(protect(x, pi_in))
        torch.testing.assert_close(got.flatten(2), area_resize(x, out_hw).flatten(2)[..., pi_out],
                                   atol=1e-6, rtol=1e-5)
        model = randomize_bn(build_model("compact", 1, 10), (1, 32, 32), seed=9)
        fmt = FrameFormat(64, 1023, height=96, width=128, rotation=True)
        clf = KeyedClassifier(model, KEY, fmt, device=cuda, model_hw=(32, 32))
        plain = np.random.default_rng(2).integers(64, 1024, (3, 96, 128), dtype=np.uint16)
        index = [4, 5, 6]
        prot = np.stack([readout_permutation(KEY, "pixel", 96, 128, n).forward(f)
                         for f, n in zip(plain, index, strict=True)])
        with torch.inference_mode():
            got = clf.logits_array(prot, index).cpu()
            want = model.cpu()(network_input(plain, fmt, size=(32, 32)))
        assert_same_logits(got, want, "cuda classifier with front end and rotation")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
