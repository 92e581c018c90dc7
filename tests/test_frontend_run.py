"""The front end wired into ``privcam run`` / replay, training, evaluation and the demo: frames larger than
the checkpoint's ``input_shape`` are read at the model's resolution, and the keyed predictions equal the
plain model's on ``network_input(plain frames, size=model_hw)``.

What "equal" means here: the predicted class of every frame is the same and the confidence (max softmax
probability) agrees within 1e-5. The keyed front end sums in another order than the plain one (a
scatter-add over readout slots against OpenCV-style weight matrices or ``avg_pool2d``) and the keyed
convs gather in blocks, so logits differ by float rounding (about 1e-6), not bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, model_input_hw, read_manifest, save_checkpoint
from models.plain import build_model
from pipeline.cli.demo import predictions_without_labels, run_demo
from pipeline.cli.main import main
from pipeline.lab.evaluate import accuracy_table
from pipeline.lab.train import TrainConfig, model_input, train
from pipeline.resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from pipeline.stream.datasets import load_dataset
from pipeline.stream.inputs import network_input
from pipeline.stream.run import RunConfig, SourceSection, build_classifier, load_key
from pipeline.stream.sources import expose_scenes
from sensor.config import SensorConfig
from sensor.errors import ConfigError
from sensor.frame import FrameFormat
from sensor.keys import write_key_file
from sensor.sensor import Sensor
from tests.fitted import fitted_model

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12
PHOTO_HW = (60, 90)  # not a multiple of the 28x28 model input: INTER_AREA with fractional weights
MONO, COLOUR = str(resolve(MONO_PROFILE)), str(resolve(COLOUR_PROFILE))
SEED = 3


def write_photos(folder: Path, images: np.ndarray, labels: np.ndarray, hw: tuple[int, int],
                 colour: bool = False) -> Path:
    """Sample scenes as PNG photos of ``hw`` in class sub-folders; ``colour`` tints them (R, G, B differ)."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        photo = cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        if colour:
            photo = np.stack([photo, (photo * 0.7).astype(np.uint8), 255 - photo], axis=2)  # BGR on disk
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"class{label}" / f"{i:03d}.png"), photo)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Photos of 60x90 (grey and colour) and of 20x20, the shipped 28x28 checkpoint, a fitted 4-plane model
    whose manifest says it reads (4, 14, 14), and a key."""
    root = tmp_path_factory.mktemp("frontend_world")
    sample = load_dataset("fashion-mnist-sample")
    write_photos(root / "photos", sample.images[:N], sample.labels[:N], PHOTO_HW)
    write_photos(root / "colour", sample.images[:N], sample.labels[:N], PHOTO_HW, colour=True)
    write_photos(root / "small", sample.images[:4], sample.labels[:4], (20, 20))
    shipped = resolve(DEFAULT_CHECKPOINT)
    shutil.copyfile(shipped, root / "m.pt")
    shutil.copyfile(shipped.with_suffix(".json"), root / "m.json")
    fit = slice(N, N + 384)
    colour_scenes = np.stack([sample.images[fit], (sample.images[fit] * 0.7).astype(np.uint8),
                              255 - sample.images[fit]], axis=3)[..., ::-1]  # RGB, as the folder loader gives
    model4 = fitted_model("compact", SensorConfig.from_yaml(COLOUR), "quad", np.ascontiguousarray(colour_scenes),
                          sample.labels[fit])
    save_checkpoint(root / "m4.pt", model4, {"name": "compact", "in_channels": 4, "num_classes": 10},
                    {"scheme": "quad", "input_shape": [4, 14, 14]})
    write_key_file(root / "cam.key")
    return root


def run_args(world: Path, folder: str, checkpoint: str = "m.pt", profile: str = MONO) -> list[str]:
    return ["--key", str(world / "cam.key"), "--dataset", "folder", "--data", str(world / folder),
            "--checkpoint", str(world / checkpoint), "--set", f"sensor.profile={profile}",
            "--set", f"sensor.seed={SEED}", "--set", "model.device=cpu", "--set", "pipeline.batch_size=8",
            "--quiet", "--json"]


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def plain_predictions(world: Path, folder: str, checkpoint: str, profile: str, scheme: str,
                      model_hw: tuple[int, int], frame_size: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(pred, confidence) of the plain model on the plain front end's output of the plain frames: the
    frames the run captured, without the readout (frame n's noise depends on (seed, n) only)."""
    from models.checkpoint import load_checkpoint

    data = load_dataset("folder", "test", world / folder)
    sensor_cfg = SensorConfig.from_yaml(profile)
    plain = expose_scenes(data.images, Sensor(sensor_cfg, seed=SEED), 0, size=frame_size)
    model, _ = load_checkpoint(world / checkpoint)
    with torch.no_grad():
        probs = torch.softmax(model(network_input(plain, FrameFormat.from_config(sensor_cfg, scheme=scheme),
                                                  size=model_hw)), dim=1)
    conf, pred = probs.max(dim=1)
    return pred.numpy(), conf.numpy()


def assert_same_predictions(rows: list[dict], want: tuple[np.ndarray, np.ndarray], what: str) -> None:
    pred, conf = want
    assert [r["frame_index"] for r in rows] == list(range(len(pred))), what
    assert [r["pred"] for r in rows] == pred.tolist(), f"{what}: predicted classes differ"
    got = np.array([r["confidence"] for r in rows])
    assert np.abs(got - conf).max() <= 1e-5, f"{what}: confidences differ by {np.abs(got - conf).max():.3g}"
    assert len(set(pred.tolist())) >= 3, f"{what}: degenerate predictions {pred.tolist()}, the check proves little"


@pytest.mark.parametrize("rotation", [False, True], ids=["static", "rotation"])
def test_run_on_photos_of_another_size_reads_them_at_the_model_size(world, tmp_path, rotation, capsys):
    """60x90 photos, the shipped 28x28 checkpoint: the network runs at 28x28 behind the keyed front end, and
    the replay of the run's recording gives the same predictions file."""
    args = run_args(world, "photos") + (["--rotation"] if rotation else [])
    assert main(["run", *args, "--predictions", str(tmp_path / "live.jsonl"),
                 "--record", str(tmp_path / "live.mcap")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["error"] is None and summary["frames"] == N
    live = read_predictions(tmp_path / "live.jsonl")
    want = plain_predictions(world, "photos", "m.pt", MONO, "pixel", (28, 28))
    assert_same_predictions(live, want, f"run, rotation={rotation}")

    cfg = RunConfig.from_dict({"key": {"file": str(world / "cam.key"), "rotation": rotation},
                               "model": {"checkpoint": str(world / "m.pt"), "device": "cpu"}})
    fmt = FrameFormat.from_config(SensorConfig.from_yaml(MONO), rotation=rotation, height=60, width=90)
    classifier, _ = build_classifier(cfg, load_key(cfg.key.file), fmt)
    assert classifier.model_hw == (28, 28) and classifier.model.frontend.out_hw == (28, 28)

    replay = ["replay", str(tmp_path / "live.mcap"), "--key", str(world / "cam.key"), "--checkpoint",
              str(world / "m.pt"), "--set", "model.device=cpu", "--set", "pipeline.batch_size=8",
              "--predictions", str(tmp_path / "replay.jsonl"), "--quiet", "--json"]
    assert main(replay) == 0
    capsys.readouterr()
    # bit-identical predictions; the recording holds no labels (no --store-labels), so replay's are null
    assert predictions_without_labels(tmp_path / "replay.jsonl") == predictions_without_labels(
        tmp_path / "live.jsonl")
    assert all(json.loads(line)["label"] is None for line in (tmp_path / "replay.jsonl").read_text().splitlines())


def test_run_with_a_sensor_frame_size_bins_the_upscaled_scenes(world, tmp_path, capsys):
    """``source.frame_size`` [56, 84]: every photo is exposed at 56x84 and binned 2x3 to the model's 28x28."""
    assert main(["run", *run_args(world, "photos"), "--set", "source.frame_size=[56, 84]",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["error"] is None
    want = plain_predictions(world, "photos", "m.pt", MONO, "pixel", (28, 28), frame_size=(56, 84))
    assert_same_predictions(read_predictions(tmp_path / "p.jsonl"), want, "run at frame_size 56x84")


def test_run_quad_with_rotation_resamples_each_cfa_plane(world, tmp_path, capsys):
    """Colour 60x90 photos on the RGGB sensor, quad readout rotating per frame, a 4-plane model trained at
    (4, 14, 14): the four packed planes (30x45) are resampled to 14x14 by the keyed front end."""
    args = run_args(world, "colour", "m4.pt", COLOUR) + ["--scheme", "quad", "--rotation"]
    assert main(["run", *args, "--predictions", str(tmp_path / "q.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["error"] is None
    want = plain_predictions(world, "colour", "m4.pt", COLOUR, "quad", (14, 14))
    assert_same_predictions(read_predictions(tmp_path / "q.jsonl"), want, "quad with rotation")


@pytest.mark.parametrize(("folder", "extra", "gives"), [("small", [], "20x20"),
                                                          ("photos", ["--set", "source.frame_size=[24, 40]"], "24x40")])
def test_frames_smaller_than_the_model_input_are_refused(world, tmp_path, capsys, folder, extra, gives):
    assert main(["run", *run_args(world, folder), *extra, "--predictions", str(tmp_path / "p.jsonl")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in ("expects 1 channel at 28x28", f"gives {gives}", "smaller than the model's input", "frame_size"):
        assert needle in err[0], (needle, err[0])
    assert not (tmp_path / "p.jsonl").exists()


def test_model_input_hw_decides_from_the_manifest():
    model = build_model("compact", 1, 10)
    manifest = {"input_shape": [1, 28, 28]}
    assert model_input_hw(model, manifest, (1, 28, 28), "frames") is None
    assert model_input_hw(model, manifest, (1, 1080, 1920), "frames") == (28, 28)
    assert model_input_hw(model, {}, (1, 60, 90), "frames") is None  # no input_shape: fed as they are
    with pytest.raises(CheckpointError, match=r"expects 1 channel at 28x28; frames gives 4 channels at 540x960"):
        model_input_hw(model, manifest, (4, 540, 960), "frames")
    with pytest.raises(CheckpointError, match=r"gives 20x1920, smaller than the model's input"):
        model_input_hw(model, manifest, (1, 20, 1920), "frames")
    with pytest.raises(CheckpointError, match=r"input_shape: expected \[C, h, w\]"):
        model_input_hw(model, {"input_shape": [1, 28]}, (1, 28, 28), "frames")
    with pytest.raises(CheckpointError, match="expects 4 channels at 14x14"):  # the first conv takes 1 channel
        model_input_hw(model, {"input_shape": [4, 14, 14]}, (1, 28, 28), "frames")


def test_frame_size_options_are_validated(tmp_path):
    assert SourceSection(frame_size=[1080, 1920]).frame_size == (1080, 1920)
    assert RunConfig.from_dict({"source": {"frame_size": [56, 84]}}).to_dict()["source"]["frame_size"] == (56, 84)
    for bad in ([0, 10], [10], "56x84", [56.0, 84], [True, 3], [1 << 17, 2]):
        with pytest.raises(ConfigError, match="frame_size"):
            RunConfig.from_dict({"source": {"frame_size": bad}})
    with pytest.raises(ConfigError, match="rawfolder"):
        SourceSection(dataset="rawfolder", data=str(tmp_path), frame_size=(56, 84))
    with pytest.raises(ConfigError, match="input_size"):
        TrainConfig(input_size=(0, 3))
    assert model_input(TrainConfig(frame_size=(56, 56)), (28, 28)) == ((1, 56, 56), (28, 28))
    assert model_input(TrainConfig(scheme="quad", frame_size=(64, 96), input_size=(16, 24)), (28, 28)) == (
        (4, 32, 48), (16, 24))
    with pytest.raises(ConfigError, match=r"input_size.*no larger than the network input"):
        model_input(TrainConfig(input_size=(32, 32)), (28, 28))
    with pytest.raises(ConfigError, match="frame_size"):
        model_input(TrainConfig(frame_size=(20, 20)), (28, 28))


def test_train_and_eval_at_a_sensor_size_use_the_front_end(tmp_path):
    """Training on 56x56 frames of 28x28 scenes writes a 28x28 model (the plain front end bins 2x2); the
    accuracy table on 56x56 frames reads them through the front end: the keyed row agrees with the plain row
    on every image."""
    sample = load_dataset("fashion-mnist-sample")
    root = tmp_path / "data"
    root.mkdir()
    from tests.hostile_world import write_idx

    for prefix, part in (("train", slice(0, 160)), ("t10k", slice(160, 200))):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", sample.images[part])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", sample.labels[part])
    cfg = TrainConfig(dataset="mnist", data=str(root), epochs=1, batch_size=32, out=str(tmp_path / "m.pt"),
                      frame_size=(56, 56))
    manifest = train(cfg, progress=False, device="cpu")
    assert manifest["input_shape"] == [1, 28, 28] and manifest["frame_size"] == [56, 56]
    assert read_manifest(tmp_path / "m.pt")["train_config"]["frame_size"] == [56, 56]

    from pipeline.lab.attacks import AttackBudget

    test = load_dataset("fashion-mnist-sample").subset(24, 200)
    train_set = load_dataset("fashion-mnist-sample").subset(24, 300)
    budget = AttackBudget(train_images=16, epochs=1)
    table = accuracy_table(str(resolve(DEFAULT_CHECKPOINT)), test, train_set, SensorConfig.from_yaml(MONO),
                           load_key_from(tmp_path), "pixel", budget, progress=False, frame_size=(56, 56))
    assert table["frame_size"] == [56, 56] and table["model_input"] == [28, 28] and "front_end" in table
    for mode in table["modes"]:
        rows = {r["row"]: r for r in mode["rows"]}
        assert rows[5]["agrees_with_row1_on"] == 24 and rows[5]["accuracy"] == rows[1]["accuracy"]
        assert rows[1]["accuracy"] >= 0.5, "the shipped model reads binned 56x56 frames like 28x28 ones"


def load_key_from(tmp_path: Path):
    from sensor.keys import load_key_file

    path = tmp_path / "eval.key"
    if not path.exists():
        write_key_file(path)
    return load_key_file(path)


def test_demo_at_a_sensor_size(tmp_path):
    """``privcam demo --frame-size 56 56``: the 28x28 checkpoint reads the 56x56 protected frames through the
    keyed front end; its accuracy is the plain model's on the plain front end's output of the same frames."""
    from models.checkpoint import load_checkpoint

    summary = run_demo(tmp_path / "demo", limit=16, progress=False, frame_size=(56, 56))
    assert summary["error"] is None and summary["replay_identical_predictions"] is True
    assert summary["frame_size"] == [56, 56] and summary["model_input"] == [28, 28]
    sample = load_dataset("fashion-mnist-sample").subset(16)
    mono = SensorConfig.from_yaml(MONO)
    plain = expose_scenes(sample.images, Sensor(mono, seed=0), 0, size=(56, 56))
    model, _ = load_checkpoint(resolve(DEFAULT_CHECKPOINT))
    with torch.no_grad():
        pred = model(network_input(plain, FrameFormat.from_config(mono), size=(28, 28))).argmax(1).numpy()
    assert summary["keyed_accuracy"] == float((pred == sample.labels).mean())
    assert summary["wrong_key_accuracy"] < summary["keyed_accuracy"]


def test_show_reads_a_large_photo_through_the_front_end(world):
    """``privcam show`` with a checkpoint on a photo larger than its input: the keyed first conv map behind
    the keyed front end is the plain one behind the plain front end, in slot order."""
    from pipeline.cli.show import show_panels
    from sensor.keys import load_key_file

    model = build_model("compact", 1, 10).eval()
    photo = load_dataset("folder", "test", world / "photos").images[0]
    _, facts = show_panels(photo, SensorConfig.from_yaml(MONO), load_key_file(world / "cam.key"), "pixel", model,
                           model_hw=(28, 28))
    assert facts["frame_shape"] == list(PHOTO_HW) and facts["model_input"] == [28, 28]
    assert facts["keyed_vs_plain_feature_max_abs_diff"] <= 1e-5


def test_training_state_from_before_the_size_options_resumes(tmp_path, monkeypatch):
    """A ``.state`` written before ``frame_size``/``input_size`` existed (its config lacks them) resumes a run
    that leaves them at their defaults; a run that sets one is refused as a different config."""
    from models.checkpoint import load_training_state, save_training_state
    from pipeline.lab import train as train_module
    from tests.hostile_world import write_idx

    sample = load_dataset("fashion-mnist-sample")
    for prefix, part in (("train", slice(0, 64)), ("t10k", slice(64, 96))):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", sample.images[part])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", sample.labels[part])
    cfg = TrainConfig.from_dict({"dataset": "mnist", "data": str(tmp_path), "epochs": 2, "batch_size": 32,
                                 "out": str(tmp_path / "m.pt")})
    original = train_module.evaluate_plain
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_plain", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, device="cpu")
    monkeypatch.setattr(train_module, "evaluate_plain", original)
    state = load_training_state(tmp_path / "m.state")
    for name in ("frame_size", "input_size"):
        del state["config"][name]
    save_training_state(tmp_path / "m.state", state)
    with pytest.raises(ConfigError, match="resume"):
        train(TrainConfig.from_dict({**cfg.__dict__, "frame_size": [56, 56]}), progress=False, device="cpu")
    manifest = train(cfg, progress=False, device="cpu")
    assert [h["epoch"] for h in manifest["history"]] == [1, 2] and manifest["input_shape"] == [1, 28, 28]
    assert manifest["history"][0] == state["history"][0], "epoch 1 comes from the resumed state"
