"""Training loop, exact resume, manifest, CIFAR-10 pickles end to end, and every accuracy-table row."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from pipeline.cli.main import main
from pipeline.lab import train as train_module
from pipeline.lab.evaluate import TEST_FRAME_BASE, capture_frames
from pipeline.lab.train import TrainConfig, train
from pipeline.stream.datasets import load_dataset
from pipeline.stream.inputs import network_input
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.sensor import Sensor
from tests.fitted import fitted_model


def cifar_like(images: np.ndarray) -> np.ndarray:
    """(B, 28, 28) grey uint8 -> (B, 32, 32, 3) RGB, padded with black like CIFAR's 32x32 frames."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)


def write_cifar(root, n_per_batch: int = 12) -> None:
    """CIFAR-10 python pickles (the real format) holding real images: the shipped Fashion-MNIST sample,
    padded to 32x32 RGB; the test batch is the sample's first ``n_per_batch`` images."""
    sample = load_dataset("fashion-mnist-sample")
    names = ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    for b, name in enumerate(names):
        part = slice(b * n_per_batch, (b + 1) * n_per_batch)
        data = cifar_like(sample.images[part]).transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": sample.labels[part].tolist(), b"batch_label": name.encode()}, fh)


def write_idx_pair(root, prefix: str, n: int, seed: int) -> None:
    import gzip

    rng = np.random.default_rng(seed)
    # Two easy classes: bright vs dark scenes, so a tiny training run learns something real.
    labels = rng.integers(0, 2, n)
    images = np.where(labels[:, None, None] == 1, 200, 40) + rng.integers(-30, 30, (n, 28, 28))
    for kind, arr in (("images-idx3", np.clip(images, 0, 255)), ("labels-idx1", labels)):
        header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_like(tmp_path):
    write_idx_pair(tmp_path, "train", 96, 1)
    write_idx_pair(tmp_path, "t10k", 48, 2)
    return tmp_path


def small_cfg(root, out, **kw) -> TrainConfig:
    base = {"dataset": "mnist", "data": str(root), "epochs": 2, "batch_size": 32, "out": str(out), "lr": 0.05}
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_writes_a_manifest(mnist_like, tmp_path):
    manifest = train(small_cfg(mnist_like, tmp_path / "m.pt", epochs=3), progress=False)
    assert manifest["plain_test_accuracy"] > 0.9, "bright vs dark must be learnt"
    assert read_manifest(tmp_path / "m.pt")["sha256"] == manifest["sha256"]
    assert manifest["train_images"] == 96 and manifest["scheme"] == "pixel"
    model, info = load_checkpoint(tmp_path / "m.pt")
    assert info["arch"] == {"name": "compact", "in_channels": 1, "num_classes": 2}


def interrupt_in_second_epoch(monkeypatch) -> None:
    """Ctrl-C during the second epoch's evaluation (the first epoch's state is saved)."""
    calls = {"n": 0}
    original = train_module.evaluate_plain

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_plain", evaluate)


def test_resume_after_interruption_is_exact(mnist_like, tmp_path, monkeypatch):
    straight = train(small_cfg(mnist_like, tmp_path / "a.pt"), progress=False)
    original = train_module.evaluate_plain
    interrupt_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(mnist_like, tmp_path / "b.pt"), progress=False)
    assert (tmp_path / "b.state").exists() and not (tmp_path / "b.pt").exists()
    monkeypatch.setattr(train_module, "evaluate_plain", original)
    resumed = train(small_cfg(mnist_like, tmp_path / "b.pt"), progress=False)
    a, _ = load_checkpoint(tmp_path / "a.pt")
    b, _ = load_checkpoint(tmp_path / "b.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert [h["test_accuracy"] for h in resumed["history"]] == [h["test_accuracy"] for h in straight["history"]]


def test_resume_refuses_a_different_config(mnist_like, tmp_path, monkeypatch):
    interrupt_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(mnist_like, tmp_path / "c.pt"), progress=False)
    from sensor.errors import ConfigError

    with pytest.raises(ConfigError, match="resume"):
        train(small_cfg(mnist_like, tmp_path / "c.pt", lr=0.01), progress=False)


def test_cifar10_train_and_eval_through_the_cli(tmp_path, capsys):
    write_cifar(tmp_path)
    out = tmp_path / "cifar.pt"
    assert main(["train", "--dataset", "cifar10", "--data", str(tmp_path), "--sensor", "configs/sensors/default.yaml",
                 "--scheme", "quad", "--epochs", "1", "--out", str(out), "--quiet", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["arch"]["in_channels"] == 4 and manifest["train_images"] == 60

    # One epoch on 60 images predicts about one class, and "keyed agrees with plain" would hold for any
    # constant model; the table is checked on a fitted model whose predictions vary (tests/fitted.py).
    colour = SensorConfig.from_yaml("configs/sensors/default.yaml")
    sample = load_dataset("fashion-mnist-sample")
    fit = slice(100, 484)
    model = fitted_model("compact", colour, "quad", cifar_like(sample.images[fit]), sample.labels[fit])
    fitted = tmp_path / "fitted.pt"
    save_checkpoint(fitted, model, {"name": "compact", "in_channels": 4, "num_classes": 10}, {"scheme": "quad"})
    test = load_dataset("cifar10", "test", tmp_path)
    plain, _ = capture_frames(test.images, Sensor(colour, seed=0), Key(bytes(32)), "quad", False, TEST_FRAME_BASE)
    with torch.no_grad():
        plain_preds = model(network_input(plain, FrameFormat.from_config(colour, scheme="quad"))).argmax(1).numpy()
    assert len(set(plain_preds.tolist())) >= 4, f"degenerate fitted model: {plain_preds.tolist()}"

    assert main(["eval", "accuracy", "--dataset", "cifar10", "--data", str(tmp_path), "--checkpoint", str(fitted),
                 "--sensor", "configs/sensors/default.yaml", "--scheme", "quad", "--attack-train-images", "24",
                 "--attack-epochs", "1", "--quiet", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["dataset"] == "cifar10" and table["test_images"] == 12
    assert [m["key_mode"] for m in table["modes"]] == ["static", "rotation"]
    for mode in table["modes"]:
        rows = {r["row"]: r for r in mode["rows"]}
        assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7]
        assert rows[1]["accuracy"] == float((plain_preds == test.labels).mean()), "row 1 is the plain model"
        assert rows[5]["accuracy"] == rows[1]["accuracy"] and rows[5]["agrees_with_row1_on"] == 12
        assert rows[3]["attack_budget"]["train_images"] == 24 and rows[4]["attack_budget"]["epochs"] == 1
        assert all(r["test_images"] == 12 for r in rows.values())
