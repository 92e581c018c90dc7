"""Protection stages: invertible or not as documented, keyed as documented, authorised paths exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.plain import CompactNet
from pipeline.lab import protection as pr
from pipeline.lab.protection import (
    ELE,
    MONO10,
    EtC,
    I2PTraining,
    ImageToPerturbation,
    ReadoutProtection,
    UNet,
    block_layout,
    build_protection,
    train_image_to_perturbation,
)
from pipeline.stream.inputs import network_input
from sensor.frame import FrameFormat
from tests import reference

SECRET = bytes(range(32))
KEY = pr.Key(SECRET)
OTHER = pr.Key(bytes(range(1, 33)))
RGGB12 = FrameFormat(64, 4095, "RGGB")
KEYED = [m for m in pr.METHOD_NAMES if m != "i2p"]


pytestmark = pytest.mark.usefixtures("one_thread")


def frames(spec: FrameFormat, n: int = 3, h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.max_dn + 1, (n, h, w)).astype(np.uint16)


def tiny_i2p(spec: FrameFormat = MONO10) -> ImageToPerturbation:
    torch.manual_seed(0)
    return ImageToPerturbation(UNet(1, 1, width=4, levels=2), spec)


def every_stage(spec: FrameFormat) -> list[pr.Protection]:
    scheme = "pixel" if spec.cfa == "mono" else "quad"
    return [build_protection(m, KEY, spec, scheme) for m in KEYED] + [tiny_i2p(spec)]


@pytest.mark.parametrize("spec", [MONO10, RGGB12], ids=["mono", "rggb"])
def test_each_stage_is_invertible_or_not_as_documented(spec):
    x = frames(spec)
    idx = np.array([3, 4, 99])
    for stage in every_stage(spec):
        y = stage.protect(x, idx)
        assert y.shape == x.shape and y.dtype == np.uint16 and int(y.max()) <= spec.max_dn, stage.name
        assert (y != x).mean() > 0.9, stage.name
        if stage.invertible:
            assert stage.keyed
            assert np.array_equal(stage.restore(y, idx), x), stage.name
            assert not np.array_equal(stage.with_key(OTHER).restore(y, idx), x), stage.name
        else:
            with pytest.raises(NotImplementedError, match="not invertible"):
                stage.restore(y, idx)


@pytest.mark.parametrize("method", KEYED)
def test_static_keys_ignore_the_frame_index_and_rotating_keys_do_not(method):
    stage = build_protection(method, KEY, MONO10)
    x = np.repeat(frames(MONO10, 1), 2, axis=0)
    y = stage.protect(x, [5, 6])
    assert np.array_equal(y[0], y[1]) == method.endswith("static")
    assert np.array_equal(build_protection(method, KEY, MONO10).protect(x, [5, 6]), y)  # deterministic
    assert not np.array_equal(build_protection(method, OTHER, MONO10).protect(x, [5, 6]), y)


@pytest.mark.parametrize("method", KEYED)
@pytest.mark.parametrize("spec", [MONO10, RGGB12], ids=["mono", "rggb"])
def test_position_tables_and_relation_describe_protect(method, spec):
    stage = build_protection(method, KEY, spec, "pixel" if spec.cfa == "mono" else "quad")
    x = frames(spec)
    idx = [0, 7, 8]
    y = stage.protect(x, idx).reshape(3, -1)
    tables = stage.position_tables(16, 24, idx)
    assert tables.shape == (3, 16 * 24)
    assert all(np.array_equal(np.sort(t), np.arange(16 * 24)) for t in tables)
    src = np.take_along_axis(x.reshape(3, -1), tables, axis=1)
    if stage.relation == "equal":
        assert np.array_equal(y, src)
    elif stage.relation == "negate":
        assert np.all((y == src) | (y == spec.max_dn - src))
    else:  # xor: one secret constant per slot, the same in every frame of a static key
        const = y ^ src
        assert method.endswith("rotating") or np.all(const == const[0])


@pytest.mark.parametrize("scheme", ["pixel", "quad", "plane"])
def test_readout_stage_is_the_documented_keyed_readout(scheme):
    """Against tests/reference.py: seeds recomputed with hmac from the key bytes, tables built by
    applying the three documented passes to an index grid, protection as ``frame.flat[pi]``."""
    x = frames(MONO10)
    idx = [0, 11, 12]
    for rotation in (False, True):
        stage = ReadoutProtection(KEY, scheme, rotation)
        tables = np.stack([reference.readout_table(SECRET, scheme, 16, 24, n if rotation else None) for n in idx])
        expected = np.stack([x[i].flat[tables[i]].reshape(16, 24) for i in range(len(idx))])
        assert np.array_equal(stage.protect(x, idx), expected)
        assert np.array_equal(stage.restore(expected, idx), x)
        assert np.array_equal(stage.position_tables(16, 24, idx), tables)


def test_etc_moves_whole_blocks_with_one_negative_positive_flag():
    spec = MONO10
    x = frames(spec, 1, 16, 16)
    stage = EtC(KEY, block=4, spec=spec)
    table = stage.position_tables(16, 16, [0])[0]
    y = stage.protect(x, [0])[0]
    out_blocks = block_layout(16, 16, 4).reshape(16, -1)
    for slots in out_blocks:
        src_blocks = {tuple(b) for b in block_layout(16, 16, 4).reshape(16, -1)
                      if set(table[slots]) <= set(b)}
        assert len(src_blocks) == 1  # the output block is one input block, rotated or flipped
        negated = y.reshape(-1)[slots] != x.reshape(-1)[table[slots]]
        assert negated.all() or not negated.any()


def test_ele_uses_a_different_key_per_block():
    stage = ELE(KEY, block=4)
    _, mask = stage.tables(16, 16, [0])
    blocks = mask[0][block_layout(16, 16, 4).reshape(16, -1)]
    assert len({tuple(b) for b in blocks}) == 16  # every block has its own mask
    assert len(np.unique(blocks[0])) > 4  # and the mask varies inside a block (not LE's shared key)


def test_colour_etc_keeps_cfa_planes_in_packed_blocks():
    stage = EtC(KEY, block=2, spec=RGGB12)
    layout = block_layout(8, 8, 2, "RGGB")
    assert layout.shape == (4, 4, 2, 2)  # 4 blocks of 4 planes x 2 x 2 on the 4x4 plane grid
    table = stage.position_tables(8, 8, [0])[0]
    for block in layout.reshape(4, -1):  # an output block's samples come from one input block
        assert any(set(table[block]) == set(b) for b in layout.reshape(4, -1))


def test_block_sizes_and_levels_are_checked():
    with pytest.raises(ValueError, match="multiple of block"):
        EtC(KEY, block=4).protect(frames(MONO10, 1, 18, 16), [0])
    with pytest.raises(ValueError, match="max_dn"):
        FrameFormat(0, 1000)
    with pytest.raises(ValueError, match="above max_dn"):
        ELE(KEY).protect(np.full((1, 8, 8), 2000, np.uint16), [0])
    with pytest.raises(ValueError, match="uint16"):
        EtC(KEY).protect(np.zeros((1, 8, 8), np.int32), [0])
    with pytest.raises(ValueError, match="frame_indices"):
        EtC(KEY).protect(np.zeros((2, 8, 8), np.uint16), [0])
    with pytest.raises(ValueError, match="method"):
        build_protection("rot13", KEY, MONO10)


def test_descriptions_show_the_fingerprint_never_the_secret():
    for stage in every_stage(MONO10):
        text = repr(stage) + str(stage.describe())
        assert bytes(range(32)).hex() not in text
        assert (KEY.fingerprint in text) == stage.keyed


@pytest.mark.parametrize("method", KEYED)
def test_authorised_logits_match_the_plain_model_on_plain_frames(method):
    torch.manual_seed(0)
    model = CompactNet(1, 10).eval()
    x = frames(MONO10, 4, 16, 16)
    idx = np.array([0, 1, 2, 30])
    stage = build_protection(method, KEY, MONO10)
    with torch.inference_mode():
        plain = model(network_input(x, MONO10))
    logits = stage.authorised_logits(model, stage.protect(x, idx), idx)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


def test_i2p_is_keyless_and_the_plain_model_reads_its_frames():
    stage = tiny_i2p()
    torch.manual_seed(0)
    model = CompactNet(1, 10).eval()
    y = stage.protect(frames(MONO10, 2, 16, 16), [0, 1])
    assert y.min() >= MONO10.black_level and np.array_equal(stage.protect(frames(MONO10, 2, 16, 16), [5, 9]), y)
    with torch.inference_mode():
        torch.testing.assert_close(stage.authorised_logits(model, y, [0, 1]), model(network_input(y, MONO10)))
    with pytest.raises(NotImplementedError, match="keyless"):
        stage.with_key(KEY)
    with pytest.raises(NotImplementedError, match="position"):
        stage.position_tables(16, 16, [0])


def test_train_image_to_perturbation_keeps_the_classifier_frozen():
    torch.manual_seed(0)
    model = CompactNet(1, 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = frames(MONO10, 12, 12, 12)
    labels = np.arange(12) % 3
    for epochs, features in ((2, "classifier"), (1, "random")):
        stage, log = train_image_to_perturbation(model, x, labels, MONO10,
                                                 I2PTraining(epochs=epochs, batch_size=6, width=4, levels=2,
                                                             features=features))
        assert isinstance(stage, ImageToPerturbation) and len(log["epochs"]) == epochs
        assert np.isfinite(log["epochs"][-1]["cross_entropy"])
        assert stage.protect(x[:2], [0, 1]).shape == (2, 12, 12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="features"):
        train_image_to_perturbation(model, x, labels, MONO10, I2PTraining(features="vgg"))


def test_unet_keeps_odd_sizes():
    net = UNet(1, 2, width=4, levels=3)
    assert net(torch.zeros(2, 1, 7, 9)).shape == (2, 2, 7, 9)
    with pytest.raises(ValueError):
        UNet(levels=0)
