"""End to end: live run, record, replay (bit for bit), wrong key, damaged recordings, interruption."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from pipeline.cli.main import main
from pipeline.resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.datasets import load_dataset
from pipeline.stream.inputs import network_input
from pipeline.stream.recording import RecordingReader
from pipeline.stream.run import RunConfig, record_frames, replay_recording, run_pipeline
from sensor.config import SensorConfig
from sensor.errors import ConfigError, PrivcamError
from sensor.frame import FrameFormat
from sensor.keys import load_key_file, write_key_file
from sensor.scene import render_photons
from sensor.sensor import Sensor
from tests.fitted import fitted_model
from tests.hostile_world import world_config, write_idx

N_FRAMES = 40
MONO, COLOUR = str(resolve(MONO_PROFILE)), str(resolve(COLOUR_PROFILE))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The first N_FRAMES images of the shipped sample as an IDX dataset, the shipped compact checkpoint
    (m.pt) and a fitted, non-degenerate 4-plane model for the quad and plane schemes (m4.pt)."""
    root = tmp_path_factory.mktemp("world")
    sample = load_dataset("fashion-mnist-sample")
    write_idx(root / "t10k-images-idx3-ubyte.gz", sample.images[:N_FRAMES])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", sample.labels[:N_FRAMES])
    shipped = resolve(DEFAULT_CHECKPOINT)
    shutil.copyfile(shipped, root / "m.pt")
    shutil.copyfile(shipped.with_suffix(".json"), root / "m.json")
    arch4 = {"name": "compact", "in_channels": 4, "num_classes": 10}
    fit = slice(N_FRAMES, N_FRAMES + 384)
    model4 = fitted_model("compact", SensorConfig.from_yaml(COLOUR), "quad", sample.images[fit], sample.labels[fit])
    save_checkpoint(root / "m4.pt", model4, arch4, {"scheme": "quad"})
    write_key_file(root / "cam.key")
    write_key_file(root / "other.key")
    return root


def config(world, **sections) -> RunConfig:
    return world_config(world, N_FRAMES, **sections)


@pytest.mark.parametrize("scheme, rotation, checkpoint, profile",
                         [("pixel", False, "m.pt", MONO), ("pixel", True, "m.pt", MONO),
                          ("quad", True, "m4.pt", COLOUR), ("plane", False, "m4.pt", COLOUR)],
                         ids=["pixel-static", "pixel-rotation", "quad-rotation", "plane-static"])
def test_live_run_equals_plain_model_and_replay_is_bit_exact(world, tmp_path, scheme, rotation, checkpoint, profile):
    rec, preds = tmp_path / "live.mcap", tmp_path / "live.jsonl"
    cfg = config(world, key={"scheme": scheme, "rotation": rotation}, sensor={"profile": profile},
                 model={"checkpoint": str(world / checkpoint)},
                 output={"record": str(rec), "predictions": str(preds)})
    summary = run_pipeline(cfg, progress=False)
    assert summary["error"] is None and summary["frames"] == N_FRAMES
    assert summary["recording"]["frames_written"] == N_FRAMES
    if rotation:  # the classifier took each frame's readout order from the sensor stage (replay builds them)
        assert (summary["readout_handoff"]["taken"], summary["readout_handoff"]["built_again"]) == (N_FRAMES, 0)
    else:
        assert "readout_handoff" not in summary
    live = [json.loads(line) for line in preds.read_text().splitlines()]

    # The keyed classifier on protected frames predicts what the plain model predicts on plain frames,
    # with the same confidence, and those predictions are far from constant.
    from models.checkpoint import load_checkpoint
    plain_model, _ = load_checkpoint(world / checkpoint)
    sensor_cfg = SensorConfig.from_yaml(profile)
    sensor = Sensor(sensor_cfg, seed=3)
    data = load_dataset("mnist", "test", world)
    plain = np.stack([sensor.expose(render_photons(im, sensor_cfg), i) for i, im in enumerate(data.images)])
    with torch.no_grad():
        logits = plain_model(network_input(plain, FrameFormat.from_config(sensor_cfg, scheme=scheme)))
    conf, pred = torch.softmax(logits, 1).max(1)
    assert len(set(pred.tolist())) >= 5, "degenerate plain predictions would make the comparison vacuous"
    assert float((pred.numpy() == data.labels).mean()) > 0.5
    assert [row["pred"] for row in live] == pred.tolist()
    assert np.allclose([row["confidence"] for row in live], conf.numpy(), rtol=0, atol=1e-5)
    assert [row["label"] for row in live] == data.labels.tolist()

    replay_preds = tmp_path / "replay.jsonl"
    cfg_replay = config(world, model={"checkpoint": str(world / checkpoint)},
                        output={"predictions": str(replay_preds)})
    replayed = replay_recording(str(rec), cfg_replay, progress=False)
    assert replayed["frames"] == N_FRAMES and replayed["replay_report"]["frames_lost"] == 0
    replay_rows = [json.loads(line) for line in replay_preds.read_text().splitlines()]
    assert all(row.pop("label") is None for row in replay_rows), "labels are not recorded by default"
    assert replay_rows == [{k: v for k, v in row.items() if k != "label"} for row in live], \
        "replay must give the same predictions bit for bit"


def test_labels_are_recorded_only_when_asked_for(world, tmp_path):
    """--store-labels (evaluation only) puts labels in the authenticated headers: replay then matches the
    live run byte for byte, labels included."""
    rec, preds, replay_preds = tmp_path / "l.mcap", tmp_path / "l.jsonl", tmp_path / "r.jsonl"
    cfg = config(world, output={"record": str(rec), "predictions": str(preds), "store_labels": True})
    assert run_pipeline(cfg, progress=False)["error"] is None
    with RecordingReader(rec) as reader:
        assert reader.metadata["privcam.recording"]["labels"] == "true"
        assert [f.meta.label for f in reader.frames()] == load_dataset("mnist", "test", world).labels.tolist()
    replay_recording(str(rec), config(world, output={"predictions": str(replay_preds)}), progress=False)
    assert replay_preds.read_text() == preds.read_text()
    with pytest.raises(ConfigError, match="store_labels"):
        config(world, output={"store_labels": "yes"})


def test_model_stage_only_sees_protected_frames(world):
    seen = []
    original = KeyedClassifier.prepare  # where frames enter the model stages (prepare, then predict)

    def spy(self, frames):
        seen.extend(frames)
        return original(self, frames)

    KeyedClassifier.prepare = spy
    try:
        summary = run_pipeline(config(world), progress=False)
    finally:
        KeyedClassifier.prepare = original
    sensor_cfg = SensorConfig.from_yaml("configs/sensors/mono10.yaml")
    sensor = Sensor(sensor_cfg, seed=3)
    images = load_dataset("mnist", "test", world).images
    # auto's trial of the modes (4 runs of trial_frames captures of the first scene) comes first, then the run
    trial = 4 * (summary["threads"].get("trial_frames") or 0)
    assert len(seen) == trial + N_FRAMES
    assert [f.meta.frame_index for f in seen[trial:]] == list(range(N_FRAMES))
    assert all(f.meta.frame_index == 0 and np.array_equal(f.data, seen[trial].data) for f in seen[:trial])
    for frame in seen[trial:trial + 5]:
        plain = sensor.expose(render_photons(images[frame.meta.frame_index], sensor_cfg), frame.meta.frame_index)
        assert not np.array_equal(frame.data, plain)
        assert np.array_equal(np.sort(frame.data, axis=None), np.sort(plain, axis=None)), "a permutation"


def test_replay_refuses_a_key_with_another_fingerprint(world, tmp_path):
    rec = tmp_path / "r.mcap"
    record_frames(config(world), str(rec), progress=False)
    with pytest.raises(PrivcamError, match="refusing to replay"):
        replay_recording(str(rec), config(world, key={"file": str(world / "other.key")}), progress=False)
    text = rec.read_bytes()
    secret = (world / "cam.key").read_text().strip()
    assert secret.encode() not in text and bytes.fromhex(secret) not in text
    assert load_key_file(world / "cam.key").fingerprint.encode() in text


def test_damaged_recording_replays_intact_frames_without_traceback(world, tmp_path, capsys):
    rec = tmp_path / "r.mcap"
    cfg = config(world, source={"limit": N_FRAMES})
    from pipeline.stream import run as run_module
    from pipeline.stream.recording import Recorder

    original = Recorder.__init__

    def small_chunks(self, *args, **kwargs):
        kwargs["chunk_size"] = 8000
        original(self, *args, **kwargs)

    Recorder.__init__ = small_chunks
    try:
        run_module.record_frames(cfg, str(rec), progress=False)
    finally:
        Recorder.__init__ = original
    data = rec.read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    args = ["replay", str(cut), "--key", str(world / "cam.key"), "--checkpoint", str(world / "m.pt"), "--quiet",
            "--set", "model.device=cpu", "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert 0 < summary["frames"] < N_FRAMES
    assert "truncated" in out.err and "Traceback" not in out.err

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.mcap").write_bytes(bytes(flipped))
    reader = RecordingReader(tmp_path / "flip.mcap")
    intact = list(reader.frames())
    assert len(intact) + reader.report.frames_lost == N_FRAMES and reader.report.frames_lost > 0


def test_stage_error_finalises_the_recording_and_reports(world, tmp_path, monkeypatch):
    rec = tmp_path / "err.mcap"
    calls = {"n": 0}
    original = KeyedClassifier.predict  # the model stage (after prepare, the tables stage)

    def failing(self, prepared):
        if any(frame.meta.frame_index for frame in prepared[0]):  # the run's batches, not auto's trial of
            calls["n"] += 1                                        # the modes on copies of frame 0
        if calls["n"] == 3:
            raise RuntimeError("model stage failed")
        return original(self, prepared)

    monkeypatch.setattr(KeyedClassifier, "predict", failing)
    summary = run_pipeline(config(world, output={"record": str(rec)}), progress=False)
    assert "model stage failed" in summary["error"]
    assert summary["frames"] == 16
    reader = RecordingReader(rec)
    assert len(list(reader.frames())) == summary["recording"]["frames_written"] >= 16
    assert reader.report.problems == []


def test_config_errors_name_the_field(world):
    with pytest.raises(ConfigError, match="pipeline.batch_size"):
        config(world, pipeline={"batch_size": 0})
    with pytest.raises(ConfigError, match="key.scheme"):
        config(world, key={"scheme": "rows"})
    with pytest.raises(ConfigError, match="key.file"):
        run_pipeline(config(world, key={"file": None}), progress=False)
    with pytest.raises(ConfigError, match="scheme"):
        run_pipeline(config(world, key={"scheme": "quad"}), progress=False)  # 1-channel checkpoint


def test_classifier_refuses_frames_of_another_format(world):
    from models.checkpoint import load_checkpoint
    model, _ = load_checkpoint(world / "m.pt")
    key = load_key_file(world / "cam.key")
    clf = KeyedClassifier(model, key, FrameFormat(16, 1023, height=28, width=28), device="cpu")
    sensor = Sensor(SensorConfig.from_yaml("configs/sensors/mono10.yaml"))
    frame = sensor.capture(np.full((28, 28), 100.0), key.for_session(bytes(16)), 0, scheme="pixel", rotation=True)
    with pytest.raises(PrivcamError, match="rotation"):
        clf([frame])
    other = sensor.capture(np.full((28, 28), 100.0), load_key_file(world / "other.key"), 0, scheme="pixel")
    with pytest.raises(PrivcamError, match="protected with key"):
        clf([other])
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):  # it holds the key and the tables
        pickle.dumps(clf)


def test_a_folder_of_raw_frames_is_a_source(world, tmp_path):
    from sensor.rawio import RawMeta, write_raw

    folder = tmp_path / "raws"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        data = rng.integers(16, 1023, (28, 28), dtype=np.uint16)
        write_raw(folder / f"f{i}.npy", data, RawMeta(width=28, height=28, bit_depth=10, cfa="mono", black_level=16))
    summary = run_pipeline(config(world, source={"dataset": "rawfolder", "data": str(folder), "limit": None}),
                           progress=False)
    assert summary["error"] is None and summary["frames"] == 5 and summary["labelled"] == 0
    with pytest.raises(ConfigError, match="source"):
        run_pipeline(config(world, source={"dataset": "rawfolder", "data": str(tmp_path / "none")}), progress=False)


def test_a_session_key_file_replays_its_session_and_refuses_others(world, tmp_path, capsys):
    """keygen --session-of writes a key that a classifier host can use for one recording and no other; a live
    run refuses it (live capture always starts a new session under the master key)."""
    recs = [tmp_path / "a.mcap", tmp_path / "b.mcap"]
    for rec in recs:
        assert record_frames(config(world, key={"rotation": True}), str(rec), progress=False)["error"] is None
    sessions = [RecordingReader(r).session for r in recs]
    assert len(set(sessions)) == 2 and all(len(s) == 32 for s in sessions)
    session_file = tmp_path / "a.key"
    assert main(["keygen", "--session-of", str(world / "cam.key"), "--nonce", sessions[0], "--out",
                 str(session_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["session"] == sessions[0] and out["fingerprint"] == load_key_file(world / "cam.key").fingerprint
    by_master, by_session = tmp_path / "m.jsonl", tmp_path / "s.jsonl"
    replay_recording(str(recs[0]), config(world, output={"predictions": str(by_master)}), progress=False)
    replay_recording(str(recs[0]), config(world, key={"file": str(session_file)},
                                          output={"predictions": str(by_session)}), progress=False)
    assert by_session.read_text() == by_master.read_text() and by_master.read_text()
    with pytest.raises(PrivcamError, match=f"opens session {sessions[0]} only, not session {sessions[1]}"):
        replay_recording(str(recs[1]), config(world, key={"file": str(session_file)}), progress=False)
    with pytest.raises(ConfigError, match="master key for live capture"):
        run_pipeline(config(world, key={"file": str(session_file)}), progress=False)
    assert main(["keygen", "--session-of", str(world / "cam.key"), "--out", str(tmp_path / "x.key")]) == 2
    assert "--session-of and --nonce go together" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["split", "turns", "serial", "serial_at_once", "overlap"])
def test_micro_batches_and_a_thread_budget_give_the_serial_predictions_bit_for_bit(world, tmp_path, mode):
    """A run with micro-batches that do not divide the model batch, a thread budget and the tables stage
    (or, in serial mode, capture, recorder, batches and model in one stage; "at once": a frame per core
    captured at once) writes the predictions the classifier gives on the same frames serially, in batches
    of the same size at the same torch thread count, bit for bit (the serial classifier builds every readout
    order itself; the run's takes them from its sensor stage); it records every frame, in order; the
    summary reports the budget and the handoff."""
    from pipeline.stream.budget import machine_cores, torch_threads
    from pipeline.stream.handoff import handoff_capacity, order_nbytes
    from pipeline.stream.run import build_classifier, capture_stage, load_key

    cores = machine_cores()
    if mode in ("split", "serial_at_once") and cores < 2:
        pytest.skip(f"{mode} needs two cores")
    if mode == "split":
        threads = {"sensor": 1, "model": cores - 1}
    elif mode == "serial_at_once":
        threads = {"sensor": 1, "model": cores, "mode": "serial", "sensor_frames": cores}
    else:
        threads = {"sensor": cores, "model": cores, "mode": mode}
    mode = threads.get("mode", "split")

    preds, rec = tmp_path / "live.jsonl", tmp_path / "live.mcap"
    cfg = config(world, key={"rotation": True}, output={"predictions": str(preds), "record": str(rec)},
                 pipeline={"micro_batch": 3, "threads": threads})
    summary = run_pipeline(cfg, progress=False)
    assert summary["error"] is None and summary["frames"] == N_FRAMES
    assert summary["threads"] == {"mode": mode, "sensor": threads["sensor"], "model": threads["model"],
                                  "sensor_frames": threads.get("sensor_frames", 1),
                                  "cores": summary["threads"]["cores"], "source": "config"}
    assert summary["micro_batch"] == 3
    # every frame's readout order went from the sensor stage to the classifier, none built twice
    assert summary["readout_handoff"] == {
        "capacity": handoff_capacity(cfg.pipeline.batch_size, 3, cfg.pipeline.queue_size,
                                     order_nbytes("pixel", 28, 28)),
        "taken": N_FRAMES, "built_again": 0, "evicted": 0}
    sensor_stage = next(s for s in summary["stages"] if s["name"] == ("serial" if mode == "serial" else "sensor"))
    assert sensor_stage["items_in"] == -(-N_FRAMES // 3) and sensor_stage["frames_out"] == N_FRAMES
    if mode == "serial":
        assert [s["name"] for s in summary["stages"]] == ["source", "serial", "sink"]
        assert sensor_stage["items_out"] == -(-N_FRAMES // cfg.pipeline.batch_size)  # one item per model batch
    frames = list(RecordingReader(rec).frames())
    assert [f.meta.frame_index for f in frames] == list(range(N_FRAMES))

    key = load_key(cfg.key.file).for_session(bytes.fromhex(summary["session"]))  # the run's session
    sensor_cfg = SensorConfig.from_yaml(cfg.sensor.profile)
    fmt = FrameFormat.from_config(sensor_cfg, scheme="pixel", rotation=True, height=28, width=28)
    classifier, _ = build_classifier(cfg, key, fmt)
    capture = capture_stage(Sensor(sensor_cfg, seed=cfg.sensor.seed), key, "pixel", True)
    data = load_dataset("mnist", "test", world)
    serial = []
    with torch_threads(threads["model"]):
        for start in range(0, N_FRAMES, cfg.pipeline.batch_size):
            batch = [capture((i, data.images[i], int(data.labels[i])))
                     for i in range(start, min(start + cfg.pipeline.batch_size, N_FRAMES))]
            serial += classifier(batch)
    assert [f.data.tobytes() for f in frames] == [capture((i, data.images[i], None)).data.tobytes()
                                                   for i in range(N_FRAMES)]
    assert [json.loads(line) for line in preds.read_text().splitlines()] == serial
    assert len({row["pred"] for row in serial}) >= 3, "constant predictions would make the comparison vacuous"


def test_auto_thread_budget_is_measured_and_reported(world):
    from pipeline.stream.workers import concurrent_numba_layer

    cfg = config(world)
    summary = run_pipeline(cfg, progress=False)
    assert summary["error"] is None and summary["frames"] == N_FRAMES
    threads = summary["threads"]
    assert threads["source"] == "auto" and threads["mode"] in ("split", "overlap", "serial")
    at_once = concurrent_numba_layer()  # (numba's workqueue layer: never at once, so never tried)
    if threads["mode"] != "split" and at_once:  # overlap or serial: both were tried, and the faster kept
        trial = threads["trial_frames_per_s"]
        assert trial["serial"] > 0 and trial["overlap"] > 0 and threads["trial_frames"] >= 2 * cfg.pipeline.batch_size
        assert (threads["mode"] == "overlap") == (trial["overlap"] >= trial["serial"])
        if threads["mode"] == "serial":
            assert "overlap ran slower than serial in the trial" in threads["note"]
    assert threads["sensor"] >= 1 and threads["model"] >= 1
    if threads["mode"] == "split":
        assert threads["sensor"] + threads["model"] <= threads["cores"]
    measured = threads["measured"]
    assert measured["cores"] == threads["cores"]
    assert all(measured[k] > 0 for k in measured if k.endswith("thread") or k.endswith("threads"))
    assert "serial" in threads["estimated_frames_per_s"]
    assert summary["micro_batch"] == 8  # auto: about a megapixel of 28x28 frames, capped by the model batch
