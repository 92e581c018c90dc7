"""The floor attacks: permutation-invariant features and learners, the jigsaw solver, known-plaintext
across sessions, and the floors of ``privcam eval privacy`` on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.lab.attacks import (
    ConvergenceBudget,
    invariant_attack,
    invariant_features,
    train_to_convergence,
)
from pipeline.lab.floors import FloorBudget, cross_session_recovery, floor_table, format_floors, protect_frames
from pipeline.lab.jigsaw import (
    canonical_pieces,
    cut_pieces,
    edge_dissimilarity,
    jigsaw_attack,
    jigsaw_scores,
    solve_jigsaw,
)
from sensor.errors import ConfigError
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.readout import readout_permutation

KEY = Key(bytes(range(32)))
SESSION = KEY.for_session(bytes(range(16)))

pytestmark = pytest.mark.usefixtures("one_thread")


def random_frames(n: int, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (n, h, w)).astype(np.uint16)


def smooth(h: int = 16, w: int = 16) -> np.ndarray:
    """A smooth frame whose every 2x2 cell is distinct: a jigsaw with one right answer."""
    y, x = np.mgrid[0:h, 0:w]
    return (1000 + 40 * x + 7 * y + 3 * x * y).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Invariant features
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", ["pixel", "quad", "plane"])
def test_invariant_features_are_invariant_under_their_scheme_and_not_under_finer_ones(features):
    frames = random_frames(3)
    base = invariant_features(frames, features)
    # every readout scheme is a pixel permutation; quad moves whole cells, so it keeps every plane's values too
    keeps = {"pixel": ("pixel", "quad", "plane"), "quad": ("quad",), "plane": ("quad", "plane")}[features]
    for scheme in ("pixel", "quad", "plane"):
        for key, rotation in ((KEY, False), (SESSION, True)):
            same = np.array_equal(invariant_features(protect_frames(frames, key, scheme, rotation, 7), features), base)
            assert same == (scheme in keeps), (features, scheme, rotation)


def test_invariant_features_known_values():
    frame = np.array([[[4, 3, 9, 9], [2, 1, 9, 9], [0, 0, 5, 6], [0, 0, 7, 8]]], np.uint16)
    assert invariant_features(frame, "pixel").tolist() == [sorted(frame.reshape(-1).tolist())]
    # cells (tl, tr, bl, br): [4,3,2,1] sum 10, [9,9,9,9] 36, [0,0,0,0] 0, [5,6,7,8] 26
    assert invariant_features(frame, "quad").tolist() == [[0, 0, 0, 0, 4, 3, 2, 1, 5, 6, 7, 8, 9, 9, 9, 9]]
    # planes (0,0): 4 9 0 5; (0,1): 3 9 0 6; (1,0): 2 9 0 7; (1,1): 1 9 0 8
    assert invariant_features(frame, "plane").tolist() == [[0, 4, 5, 9, 0, 3, 6, 9, 0, 2, 7, 9, 0, 1, 8, 9]]


def test_invariant_features_refuse_bad_input():
    with pytest.raises(ValueError, match="even"):
        invariant_features(np.zeros((1, 5, 4), np.uint16), "quad")
    with pytest.raises(ValueError, match="scheme"):
        invariant_features(np.zeros((1, 4, 4), np.uint16), "tile")
    with pytest.raises(ValueError, match="integer"):
        invariant_features(np.zeros((4, 4), np.uint16), "pixel")


def test_training_to_convergence_stops_after_patience_and_keeps_the_best_epoch():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = torch.from_numpy((rng.normal(size=(200, 4)) + 4 * y[:, None]).astype(np.float32))
    model = torch.nn.Linear(4, 2)
    budget = ConvergenceBudget(train_images=200, max_epochs=100, patience=3, batch_size=32, lr=0.05)
    log = train_to_convergence(model, x, y, budget)
    assert log["val_accuracy"] == 1.0 and log["fit_images"] == 180 and log["val_images"] == 20
    assert log["epochs_run"] == log["best_epoch"] + 3 < 100
    with pytest.raises(ConfigError, match="val_fraction"):
        ConvergenceBudget(val_fraction=0.0)


def test_the_invariant_learner_classifies_by_histogram_whatever_the_key():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 160)
    frames = (rng.integers(0, 400, (160, 8, 8)) + 500 * labels[:, None, None]).astype(np.uint16)
    protected = protect_frames(frames, SESSION, "pixel", True, 0)
    budget = ConvergenceBudget(train_images=120, max_epochs=50, patience=3, hidden=16)
    res = invariant_attack(protected[:120], labels[:120], protected[120:], labels[120:], "pixel", 2, budget,
                           max_dn=1023)
    assert res["accuracy"] == 1.0 and res["test_images"] == 40
    assert res["budget"]["parameters"] == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert res["budget"]["epochs_run"] <= 50


# ----------------------------------------------------------------------------------------------
# Jigsaw
# ----------------------------------------------------------------------------------------------


def test_edge_dissimilarity_known_answer():
    a = np.array([[0, 1], [0, 1]], float)  # a ramp: its extrapolation to the right is 2
    b = np.array([[2, 3], [2, 3]], float)  # continues it exactly
    c = np.array([[5, 5], [5, 5]], float)
    pieces = np.stack([a, b, c])
    lr, tb = edge_dissimilarity(pieces)
    assert lr[0, 1] == 0.0  # a|b fits perfectly
    # a|c: a predicts 2 against 5, c predicts 5 against 1, two rows: (2 * 9 + 2 * 16) / 2 = 25, over
    # (the smaller second-best of a's right and c's left) + 1 = 25 + 1
    assert lr[0, 2] == pytest.approx(25 / 26)
    lr_t, tb_t = edge_dissimilarity(pieces.transpose(0, 2, 1))  # top-bottom is left-right transposed
    assert np.array_equal(tb_t, lr) and np.array_equal(lr_t, tb)


@pytest.mark.parametrize("rotation", [False, True])
def test_the_jigsaw_restores_a_smooth_quad_frame_exactly(rotation):
    plain = smooth()
    key = SESSION if rotation else KEY
    order = readout_permutation(key, "quad", 16, 16, 3 if rotation else None)
    res = jigsaw_attack(order.forward(plain)[None], "quad", order.table()[None])
    assert np.array_equal(res["restored"][0], plain)
    assert res["position_accuracy"].tolist() == [1.0] and res["neighbour_accuracy"].tolist() == [1.0]


@pytest.mark.parametrize("scheme", ["quad", "plane"])
def test_the_jigsaw_gives_the_same_answer_for_every_key(scheme):
    """A single-frame attack: rotation changes the shuffle, not what the solver sees."""
    plain = random_frames(2, 8, 8, seed=4) // 64
    out = []
    for key, idx in ((KEY, None), (SESSION, 0), (SESSION, 1)):
        orders = [readout_permutation(key, scheme, 8, 8, None if idx is None else idx + i) for i in range(2)]
        prot = np.stack([o.forward(f) for o, f in zip(orders, plain, strict=True)])
        out.append(jigsaw_attack(prot, scheme, np.stack([o.table() for o in orders])))
    for res in out[1:]:
        assert np.array_equal(res["restored"], out[0]["restored"])
        assert np.array_equal(res["position_accuracy"], out[0]["position_accuracy"])
    # every restored frame holds exactly the protected frame's values
    assert np.array_equal(np.sort(out[0]["restored"].reshape(2, -1)), np.sort(plain.reshape(2, -1)))


@pytest.mark.parametrize("scheme", ["quad", "plane"])
def test_jigsaw_scores_of_the_true_layout_and_of_one_swap(scheme):
    plain = random_frames(1, 8, 8, seed=5)[0]
    order = readout_permutation(KEY, scheme, 8, 8)
    prot = order.forward(plain)
    pieces = cut_pieces(prot, scheme)
    gh, gw = pieces.grid
    # the true layout: piece i (slot-ordered) belongs where the table sends its first sample
    first = order.table()[pieces.source[:, 0]]
    y, x = np.divmod(first, 8)
    layout = np.empty((gh, gw), np.int64)
    layout[y // pieces.size, x // pieces.size] = np.arange(gh * gw)
    assert jigsaw_scores(prot, pieces, layout, order.table()) == {"position_accuracy": 1.0, "neighbour_accuracy": 1.0}
    if scheme == "quad":  # swap two corner cells: 2 of 16 positions wrong, 4 of 24 neighbour pairs lost
        layout[0, 0], layout[3, 3] = layout[3, 3], layout[0, 0]
        assert jigsaw_scores(prot, pieces, layout, order.table()) == {"position_accuracy": 14 / 16,
                                                                      "neighbour_accuracy": 20 / 24}


def test_solver_and_pieces_refuse_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        cut_pieces(np.zeros((4, 4), np.uint16), "pixel")
    with pytest.raises(ValueError, match="even"):
        cut_pieces(np.zeros((5, 4), np.uint16), "quad")
    pieces = canonical_pieces(cut_pieces(smooth(4, 4), "quad"))
    assert solve_jigsaw(pieces).shape == (2, 2)
    with pytest.raises(ValueError, match="B, H, W"):
        jigsaw_attack(np.zeros((4, 4), np.uint16), "quad")


# ----------------------------------------------------------------------------------------------
# Known plaintext across sessions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["pixel", "quad", "plane"])
def test_session_nonces_make_earlier_runs_known_plaintext_worthless(scheme):
    known = random_frames(2, seed=6)  # 16-bit noise: two pairs pin every position of a shared table
    assert cross_session_recovery(KEY, scheme, known, 5, sessions=False) == 1.0
    assert cross_session_recovery(KEY, scheme, known, 5, sessions=True) < 0.02


# ----------------------------------------------------------------------------------------------
# The floors of eval privacy
# ----------------------------------------------------------------------------------------------


def test_floor_table_on_tiny_frames():
    rng = np.random.default_rng(7)
    y_train, y_test = rng.integers(0, 2, 48), rng.integers(0, 2, 6)
    train = (rng.integers(16, 300, (48, 16, 16)) + 400 * y_train[:, None, None]).astype(np.uint16)
    test = (rng.integers(16, 300, (6, 16, 16)) + 400 * y_test[:, None, None]).astype(np.uint16)
    budget = FloorBudget(invariant=ConvergenceBudget(train_images=40, max_epochs=3, patience=2, hidden=8),
                         jigsaw_frames=2, kpa_pairs=(1, 2), kpa_indices=3)
    out = floor_table(test, y_test, train, y_train, KEY, FrameFormat(16, 1023), budget, 2)
    assert [r["scheme"] for r in out["invariant"]] == ["pixel", "quad", "plane"]
    assert all(r["static_key_features_identical"] for r in out["invariant"])
    assert [(r["scheme"], r["key_mode"]) for r in out["jigsaw"]] == [
        ("quad", "static"), ("quad", "rotation"), ("plane", "static"), ("plane", "rotation")]
    for static, rotating in zip(out["jigsaw"][::2], out["jigsaw"][1::2], strict=True):
        assert static["restored_ssim"] == rotating["restored_ssim"]
        assert static["plain_model_on_restored"] is None  # no model given
    for rows in out["cross_session_kpa"]["schemes"].values():
        assert rows["no_sessions"]["2"] > 0.5 and rows["sessions"]["2"] < 0.05
    assert out["cross_session_kpa"]["indices"] == 3
    assert "cross-session KPA quad" in format_floors(out)
    with pytest.raises(ConfigError, match="schemes"):
        FloorBudget(schemes=("tile",))


def test_floors_alone_through_the_cli(tmp_path, capsys):
    from pipeline.cli.main import main
    from tests.hostile_world import write_idx

    rng = np.random.default_rng(8)
    for prefix, n in (("train", 40), ("t10k", 6)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 16, 16)).astype(np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    out = tmp_path / "floors.json"
    assert main(["eval", "privacy", "--dataset", "mnist", "--data", str(tmp_path), "--methods", "none", "--floors",
                 "quad", "--floor-train-images", "24", "--floor-max-epochs", "2", "--jigsaw-frames", "2",
                 "--kpa-pairs", "1,2", "--out", str(out), "--quiet"]) == 0
    assert "jigsaw quad" in capsys.readouterr().out
    table = json.loads(out.read_text())["tables"][0]
    assert table["methods"] == [] and [r["scheme"] for r in table["floors"]["invariant"]] == ["quad"]
    assert table["floors"]["budget"]["invariant"]["train_images"] == 24
    assert main(["eval", "privacy", "--methods", "none", "--floors", "none", "--quiet"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["eval", "privacy", "--floors", "quad,tile", "--quiet"]) == 2
    assert "--floors" in capsys.readouterr().err
