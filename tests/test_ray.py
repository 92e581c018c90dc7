"""Ray backend: replay and live cameras give the local predictions bit for bit; keys never travel.

Skipped when the optional extra ``ray`` is not installed. One local Ray (2 CPUs) for the module.
"""

from __future__ import annotations

import gzip
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from models.checkpoint import save_checkpoint  # noqa: E402
from models.plain import build_model  # noqa: E402
from pipeline.ray.cameras import camera_shards, run_cameras_on_ray  # noqa: E402, I001 - imported after the skip
from pipeline.ray.datasource import RecordingDatasource, expand_recordings, scan_header  # noqa: E402
from pipeline.ray.replay import replay_on_ray  # noqa: E402
from pipeline.stream.recording import Recorder, RecordingReader  # noqa: E402
from pipeline.stream.run import RunConfig, record_frames, replay_recording, run_pipeline  # noqa: E402
from sensor.errors import ConfigError, PrivcamError  # noqa: E402
from sensor.frame import ProtectedFrame  # noqa: E402
from sensor.frameauth import sign_frame  # noqa: E402
from sensor.keys import load_key_file, write_key_file  # noqa: E402

N_ITEMS = 72
BATCH = 8


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def config(world: Path, **sections) -> RunConfig:
    data = {"source": {"dataset": "mnist", "data": str(world), "limit": 40},
            "sensor": {"profile": "configs/sensors/mono10.yaml", "seed": 3},
            "key": {"file": str(world / "cam.key"), "scheme": "pixel"},
            "model": {"checkpoint": str(world / "m.pt"), "device": "cpu"},
            "pipeline": {"batch_size": BATCH, "batch_timeout_s": 30.0}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return RunConfig.from_dict(data, "test")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Dataset, random-weight checkpoint, two keys and recordings/: a (static key), b (rotation), c (truncated),
    d (an authentic frame of another size in its second batch: skipped and reported), e (manipulated: a
    tampered frame, a duplicated one, two swapped)."""
    root = tmp_path_factory.mktemp("ray_world")
    rng = np.random.default_rng(0)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (N_ITEMS, 28, 28), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, N_ITEMS))
    torch.manual_seed(0)
    arch = {"name": "compact", "in_channels": 1, "num_classes": 10}
    save_checkpoint(root / "m.pt", build_model(**arch), arch, {"scheme": "pixel"})
    write_key_file(root / "cam.key")
    write_key_file(root / "other.key")
    recs = root / "recordings"
    recs.mkdir()
    record_frames(config(root), str(recs / "a.mcap"), progress=False)
    record_frames(config(root, source={"offset": 40, "limit": 30}, key={"rotation": True}), str(recs / "b.mcap"),
                  progress=False)
    reader = RecordingReader(recs / "b.mcap")
    with Recorder(root / "c_full.mcap", reader.sensor_config(), "pixel", True, reader.key_fingerprint,
                  chunk_size=8000, session=reader.session) as rec:
        for frame in reader.frames():
            rec.write(frame)
    data = (root / "c_full.mcap").read_bytes()
    (recs / "c.mcap").write_bytes(data[: len(data) * 2 // 3])
    reader = RecordingReader(recs / "a.mcap")
    session_key = load_key_file(root / "cam.key").for_session(bytes.fromhex(reader.session))
    frames = list(reader.frames())[:20]
    with Recorder(recs / "d.mcap", reader.sensor_config(), "pixel", False, reader.key_fingerprint,
                  session=reader.session) as rec:
        for frame in frames:
            if frame.meta.frame_index == 13:  # an authentic frame of another size: skipped and reported
                frame = sign_frame(session_key, ProtectedFrame(frame.data[:14, :14].copy(),
                                                               replace(frame.meta, height=14, width=14)))
            rec.write(frame)
    with Recorder(recs / "e.mcap", reader.sensor_config(), "pixel", False, reader.key_fingerprint,
                  session=reader.session) as rec:
        for frame in [*frames[:10], frames[3], *frames[10:15], frames[16], frames[15], *frames[17:]]:
            if frame.meta.frame_index == 6:  # tampered: one pixel changed, the MAC kept
                frame = ProtectedFrame(frame.data ^ np.uint16(1), frame.meta)
            rec.write(frame)
    return root


def local_replay(world: Path, rec: Path, out: Path, batch: int = BATCH) -> tuple[dict, list[str]]:
    cfg = config(world, output={"predictions": str(out)}, pipeline={"batch_size": batch})
    summary = replay_recording(str(rec), cfg, progress=False)
    return summary, out.read_text().splitlines()


def with_recording(path: str, local_line: str) -> str:
    """The Ray JSON line for a local line: the same text with a leading recording field."""
    return '{"recording": ' + json.dumps(path) + ", " + local_line[1:]


def test_replay_on_ray_equals_local_replay_line_for_line(ray_session, world, tmp_path):
    recs = sorted((world / "recordings").glob("*.mcap"))
    out = tmp_path / "ray.jsonl"
    summary = replay_on_ray([str(world / "recordings")], str(world / "cam.key"), str(world / "m.pt"), str(out),
                            batch_size=BATCH, actors=2, mode="fused", ray_address=None, progress=False, device="cpu")
    assert not summary["interrupted"] and len(summary["recordings"]) == 5
    lines = out.read_text().splitlines()
    want, frames = [], 0
    for rec, per in zip(recs, summary["recordings"], strict=True):
        local, local_lines = local_replay(world, rec, tmp_path / f"{rec.stem}.jsonl")
        want += [with_recording(str(rec), line) for line in local_lines]
        assert per["recording"] == str(rec) and per["fingerprint_check"] == "ok"
        assert per["error"] == local["error"], "an error stops that recording where the local replay stops"
        assert (per["frames"], per["labelled"], per["accuracy"]) == (local["frames"], local["labelled"],
                                                                     local["accuracy"])
        assert per["replay_report"] == local["replay_report"], "the same damage and authentication reports"
        frames += local["frames"]
    assert lines == want, "Ray predictions must equal the local replay's bit for bit, in the same order"
    assert summary["frames"] == frames == len(lines) and summary["recordings"][2]["replay_report"]["problems"]
    # d: the frame of another size is skipped and reported (as the local replay does), not a stop of the recording
    assert summary["recordings"][3]["frames"] == 19, "d keeps every frame but the one of another size"
    assert [p for p in summary["recordings"][3]["replay_report"]["problems"] if "frame 13: " in p and "14x14" in p]
    # e: manipulated frames are found by the read task as the local replay finds them
    auth = summary["recordings"][4]["replay_report"]["authentication"]
    assert (auth["tampered"], auth["duplicated"], auth["reordered"], auth["failures"]) == ([6], [3], [15], 2)
    assert summary["recordings"][4]["frames"] == 19, "e: the tampered frame and the duplicate are skipped"
    e = str(recs[4])
    assert summary["replay_report"]["authentication"]["tampered"] == [{"recording": e, "frame_index": 6}]
    assert summary["replay_report"]["authentication"]["verified"] == sum(
        r["replay_report"]["authentication"]["verified"] for r in summary["recordings"])
    assert summary["error"] is None and [r["error"] for r in summary["recordings"]] == [None] * 5


def test_parquet_output_one_actor_other_batch_size_and_globs(ray_session, world, tmp_path):
    import pyarrow.parquet as pq

    recs = world / "recordings"
    out = tmp_path / "ray.parquet"
    summary = replay_on_ray([str(recs / "b.mcap"), str(world / "*" / "a.mcap")], str(world / "cam.key"),
                            str(world / "m.pt"), str(out), batch_size=16, actors=1, mode="fused", ray_address=None,
                            progress=False, device="cpu")
    assert summary["error"] is None
    rows = pq.read_table(out).to_pylist()
    want = []
    for rec in (recs / "b.mcap", recs / "a.mcap"):
        _, local_lines = local_replay(world, rec, tmp_path / f"{rec.stem}.jsonl", batch=16)
        want += [{"recording": str(rec), **json.loads(line)} for line in local_lines]
    assert rows == want


def test_wrong_key_is_refused_per_recording_before_any_work(world, monkeypatch):
    from pipeline.ray import replay as ray_replay

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not be touched before the fingerprints are checked")

    monkeypatch.setattr(ray_replay, "ensure_ray", no_ray)
    with pytest.raises(PrivcamError, match="a.mcap: recorded with key .* refusing to replay with the wrong key"):
        replay_on_ray([str(world / "recordings")], str(world / "other.key"), str(world / "m.pt"), None,
                      batch_size=BATCH, actors=1, mode="fused", ray_address=None, progress=False)


def test_what_travels_holds_no_key(world):
    secret = (world / "cam.key").read_text().strip()
    headers = [scan_header(str(p), i) for i, p in enumerate(sorted((world / "recordings").glob("*.mcap")))]
    blob = pickle.dumps(RecordingDatasource(headers, BATCH, key_file=str(world / "cam.key")))
    assert secret.encode() not in blob and bytes.fromhex(secret) not in blob
    assert headers[0].expected_frames == 40 and headers[2].expected_frames is None  # truncated: no summary


def test_live_cameras_equal_the_local_run_and_record_their_shards(ray_session, world, tmp_path):
    cfg = config(world, key={"rotation": True}, output={"predictions": str(tmp_path / "local.jsonl")})
    local = run_pipeline(cfg, progress=False)
    assert local["error"] is None
    cfg_ray = config(world, key={"rotation": True}, pipeline={"queue_size": 1},
                     output={"predictions": str(tmp_path / "live.jsonl"), "record": str(tmp_path / "live.mcap")})
    summary = run_cameras_on_ray(cfg_ray, cameras=2, actors=2, ray_address=None, progress=False)
    assert summary["error"] is None and summary["frames"] == 40
    assert summary["camera_shards"] == [[0, 24], [24, 40]] == [list(s) for s in camera_shards(40, 2, BATCH)]
    rows = [json.loads(line) for line in (tmp_path / "live.jsonl").read_text().splitlines()]
    for row in rows:
        start, stop = summary["camera_shards"][row["camera"]]
        assert start <= row["frame_index"] < stop
    rows.sort(key=lambda r: r["frame_index"])
    local_rows = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    # each camera and the local run are sessions of their own: other gather orders, so the keyed sums are
    # reassociated and confidences agree to float rounding; predictions, labels and indices exactly
    same = ("frame_index", "label", "pred")
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in local_rows], \
        "cameras on Ray = the local run"
    assert np.allclose([r["confidence"] for r in rows], [r["confidence"] for r in local_rows], rtol=0, atol=1e-6)
    assert summary["accuracy"] == local["accuracy"]
    assert {s["name"] for s in summary["stages"]} == {"camera-0", "camera-1", "model-0", "model-1"}
    for cam, rec in enumerate(summary["recordings"]):
        frames = [f.meta.frame_index for f in RecordingReader(rec["path"]).frames()]
        assert frames == list(range(*summary["camera_shards"][cam]))


def test_live_setup_error_is_refused_like_the_local_run(ray_session, world):
    cfg = config(world, key={"scheme": "quad"})  # the checkpoint takes 1-channel (pixel) input
    with pytest.raises(ConfigError, match="scheme"):
        run_pipeline(cfg, progress=False)
    with pytest.raises(PrivcamError, match="scheme whose network input matches the checkpoint"):
        run_cameras_on_ray(cfg, cameras=1, actors=1, ray_address=None, progress=False)


def test_live_cameras_at_a_sensor_size_equal_the_local_run(ray_session, world, tmp_path):
    """``source.frame_size`` on Ray: each camera exposes its scenes at 56x56 and the model actors read them
    through the keyed front end at the checkpoint's 28x28 input, as the local run does. Replaying the
    camera's recording locally (its session) gives Ray's predictions bit for bit."""
    arch = {"name": "compact", "in_channels": 1, "num_classes": 10}
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "m28.pt", build_model(**arch), arch, {"scheme": "pixel", "input_shape": [1, 28, 28]})
    sections = {"source": {"limit": 16, "frame_size": [56, 56]}, "model": {"checkpoint": str(tmp_path / "m28.pt")}}
    one = {"threads": {"sensor": 1, "model": 1, "mode": "serial"}}
    local = run_pipeline(config(world, **sections, pipeline=one, output={"predictions": str(tmp_path / "local.jsonl")}),
                         progress=False)
    assert local["error"] is None and local["frames"] == 16
    cfg_ray = config(world, **sections, output={"predictions": str(tmp_path / "live.jsonl"),
                                                "record": str(tmp_path / "live.mcap")})
    summary = run_cameras_on_ray(cfg_ray, cameras=1, actors=1, ray_address=None, progress=False)
    assert summary["error"] is None and summary["frames"] == 16
    rows = sorted((json.loads(line) for line in (tmp_path / "live.jsonl").read_text().splitlines()),
                  key=lambda r: r["frame_index"])
    local_rows = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    same = ("frame_index", "label", "pred")
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in local_rows], \
        "cameras on Ray = the local run"
    # The camera and the local run are sessions of their own (a fresh nonce per live capture), so their
    # readout orders differ, and the keyed front end's scatter-add sums each output cell's inputs in slot
    # order (models.frontend: exact up to float summation order): confidences agree to float rounding. The
    # same session gives the same sums: the local replay of the camera's recording equals Ray bit for bit.
    assert np.allclose([r["confidence"] for r in rows], [r["confidence"] for r in local_rows], rtol=0, atol=1e-6)
    (recording,) = summary["recordings"]
    replay = replay_recording(recording["path"], config(world, **sections,
                                                         output={"predictions": str(tmp_path / "replay.jsonl")}),
                              progress=False)
    assert replay["error"] is None and replay["frames"] == 16
    replayed = [json.loads(line) for line in (tmp_path / "replay.jsonl").read_text().splitlines()]
    fields = ("frame_index", "pred", "confidence")  # labels stay out of recordings
    assert [[r[k] for k in fields] for r in replayed] == [[r[k] for k in fields] for r in rows], \
        "the camera's recording replays to Ray's predictions bit for bit"


def test_expand_recordings_and_shards(world, tmp_path):
    recs = world / "recordings"
    names = [Path(p).name for p in expand_recordings([str(recs), str(recs / "a.mcap"), str(recs / "?.mcap")])]
    assert names == ["a.mcap", "b.mcap", "c.mcap", "d.mcap", "e.mcap"]
    with pytest.raises(PrivcamError, match="no .mcap"):
        expand_recordings([str(tmp_path)])
    assert camera_shards(10, 4, 4) == [(0, 4), (4, 8), (8, 10), (10, 10)]
    assert camera_shards(16, 2, 4, offset=5) == [(5, 13), (13, 21)]


def test_the_secret_never_reached_a_ray_log(ray_session, world):
    node = getattr(ray._private.worker, "_global_node", None)  # private: the session's log folder
    if node is None:
        pytest.skip("this Ray version does not expose its log folder")
    secret = (world / "cam.key").read_text().strip()
    logs = Path(node.get_logs_dir_path())
    assert any(logs.rglob("*.log"))
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
