"""Hostile input, part 2: outputs, recordings and signals. No overwritten data, no silent loss.

Classes (of the issue): 3 data loss, 4 silent loss, 5 damaged recording metadata, 6 late failures on
output paths. Part 1 (tests/test_hostile.py) covers what a user hands in.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import save_checkpoint
from models.plain import build_model
from pipeline.cli.main import main
from pipeline.stream import run as run_module
from pipeline.stream.datasets import load_image_folder
from pipeline.stream.recording import Recorder, RecordingReader, encode_header, encode_image
from pipeline.stream.run import RunConfig, record_frames, replay_recording, run_pipeline
from pipeline.stream.sinks import PredictionWriter
from sensor.errors import KeyFileError, PrivcamError
from sensor.frame import FrameMeta, ProtectedFrame
from sensor.frameauth import sign_frame
from sensor.keys import load_key_file, write_key_file
from sensor.rawio import RawMeta, write_raw
from tests.hostile_world import N, make_world, model_args, source_args, top_level_records, world_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return make_world(tmp_path_factory.mktemp("hostile_out"))


def config(world, **sections) -> RunConfig:
    return world_config(world, N, **sections)


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.partial"))


def fail_capture_after(monkeypatch, n: int, exc: BaseException) -> None:
    """The sensor stage raises ``exc`` on its n-th item (n = 0: before any frame)."""
    original = run_module.capture_stage

    def failing_stage(*args, **kwargs):
        capture, calls = original(*args, **kwargs), {"n": 0}

        def stage(item):
            calls["n"] += 1
            if calls["n"] > n:
                raise exc
            return capture(item)
        return stage

    monkeypatch.setattr(run_module, "capture_stage", failing_stage)


# -- 3. data loss -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_before", [0, 5])
@pytest.mark.parametrize("exc", [RuntimeError("sensor broke"), KeyboardInterrupt(),
                                 OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_record_never_replaces_an_existing_recording(world, tmp_path, monkeypatch, n_before, exc):
    out = tmp_path / "rec.mcap"
    out.write_bytes((world / "rec.mcap").read_bytes())
    before = out.read_bytes()
    fail_capture_after(monkeypatch, n_before, exc)
    summary = record_frames(config(world), str(out), progress=False)
    assert summary["error"] or summary["interrupted"]
    assert out.read_bytes() == before, "an existing recording was replaced by a failed run"
    kept = partials(tmp_path)
    assert summary["frames"] <= n_before  # the stop may overtake frames still between the stages
    if summary["frames"] == 0:
        assert kept == [] and summary["recording"] is None, "nothing written, nothing left behind"
    else:
        assert len(kept) == 1 and summary["recording"] == str(kept[0]) and str(kept[0]) in summary["notes"][0]
        assert len(list(RecordingReader(kept[0]).frames())) == summary["frames"]


def test_a_failed_record_keeps_its_frames_when_there_was_no_recording(world, tmp_path, monkeypatch):
    out = tmp_path / "new.mcap"
    fail_capture_after(monkeypatch, 5, RuntimeError("sensor broke"))
    summary = record_frames(config(world), str(out), progress=False)
    assert "sensor broke" in summary["error"] and summary["recording"] == str(out)
    assert 0 < len(list(RecordingReader(out).frames())) == summary["frames"] <= 5 and partials(tmp_path) == []


def test_a_successful_record_replaces_the_old_one(world, tmp_path):
    out = tmp_path / "rec.mcap"
    out.write_bytes(b"old")
    summary = record_frames(config(world), str(out), progress=False)
    assert summary["error"] is None and summary["recording"] == str(out)
    assert len(list(RecordingReader(out).frames())) == N and partials(tmp_path) == []


def test_a_full_disk_while_finalising_keeps_the_frames_in_the_partial(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rec.mcap"
    out.write_bytes(b"old")
    original = Recorder.close

    def full_disk(self, ok=True):
        self._writer.finish = lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return original(self, ok)

    monkeypatch.setattr(Recorder, "close", full_disk)
    assert main(["record", *source_args(world), "--out", str(out), "--quiet", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert "No space left" in summary["error"] and out.read_bytes() == b"old"
    assert len(partials(tmp_path)) == 1 and str(partials(tmp_path)[0]) in summary["error"]


def test_a_sensor_failing_only_while_auto_times_it_leaves_the_run_whole(world, tmp_path, monkeypatch):
    """``threads: auto`` times the capture on the first scene; when that timing call fails with an ordinary
    error (not an unusable scene) the run falls back to the serial plan, says so in its summary, and
    still classifies and records every frame (the run's own captures do not fail)."""
    original = run_module.capture_stage
    made = []

    def probe_fails(*args, **kwargs):
        capture = original(*args, **kwargs)
        made.append(capture)
        if len(args) > 5 or "skips" in kwargs:  # the run's capture (it logs skips); the probe that auto times
            return capture                        # raises instead, and is made with no skip log
        calls = {"n": 0}

        def probe(item):
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("sensor hiccup")
            return capture(item)
        return probe

    monkeypatch.setattr(run_module, "capture_stage", probe_fails)
    preds, rec = tmp_path / "p.jsonl", tmp_path / "r.mcap"
    summary = run_pipeline(config(world, output={"predictions": str(preds), "record": str(rec)}), progress=False)
    assert len(made) == 2 and summary["error"] is None
    assert summary["threads"]["mode"] == "serial" and "sensor hiccup" in summary["threads"]["note"]
    assert len(preds.read_text().splitlines()) == N and len(list(RecordingReader(rec).frames())) == N


def test_run_and_replay_outputs_are_not_replaced_by_a_failed_run(world, tmp_path, monkeypatch):
    preds, rec = tmp_path / "p.jsonl", tmp_path / "r.mcap"
    preds.write_text("precious\n")
    rec.write_bytes(b"precious")
    fail_capture_after(monkeypatch, 10, RuntimeError("sensor broke"))
    summary = run_pipeline(config(world, output={"predictions": str(preds), "record": str(rec)}), progress=False)
    assert "sensor broke" in summary["error"]
    assert preds.read_text() == "precious\n" and rec.read_bytes() == b"precious"
    assert summary["notes"] and all(str(p) for p in partials(tmp_path))
    monkeypatch.undo()
    original = PredictionWriter.write

    def interrupted(self, lead, preds_):
        raise KeyboardInterrupt

    monkeypatch.setattr(PredictionWriter, "write", interrupted)
    summary = replay_recording(str(world / "rec.mcap"), config(world, output={"predictions": str(preds)}),
                               progress=False)
    assert summary["interrupted"] and preds.read_text() == "precious\n"
    monkeypatch.setattr(PredictionWriter, "write", original)


def test_two_recorders_on_one_path_lose_no_frames(tmp_path):
    fp = "0123456789abcdef"

    def frame(i: int) -> ProtectedFrame:
        data = np.full((4, 6), i, np.uint16)
        return ProtectedFrame(data, FrameMeta(i, "pixel", False, fp, 12, "mono", 4, 6))

    out = tmp_path / "same.mcap"
    a, b = Recorder(out, {}, "pixel", False, fp), Recorder(out, {}, "pixel", False, fp)
    assert a.partial != b.partial, "each recorder has its own .partial"
    for i in range(3):
        a.write(frame(i))
        b.write(frame(100 + i))
    assert a.close() == out
    assert b.close() == b.partial and "meanwhile" in b.note
    assert [f.meta.frame_index for f in RecordingReader(out).frames()] == [0, 1, 2]
    assert [f.meta.frame_index for f in RecordingReader(b.partial).frames()] == [100, 101, 102]


def test_a_bad_file_in_a_folder_source_is_skipped_and_reported(world, tmp_path):
    folder = tmp_path / "raws"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        write_raw(folder / f"f{i}.npy", rng.integers(16, 1023, (28, 28), dtype=np.uint16),
                  RawMeta(width=28, height=28, bit_depth=10, cfa="mono", black_level=16))
    (folder / "f2.npy").write_bytes(b"\x93NUMPY garbage")
    write_raw(folder / "f3.npy", rng.integers(16, 1023, (30, 28), dtype=np.uint16),
              RawMeta(width=28, height=30, bit_depth=10, cfa="mono", black_level=16))
    summary = run_pipeline(config(world, source={"dataset": "rawfolder", "data": str(folder), "limit": None}),
                           progress=False)
    assert summary["error"] is None and summary["frames"] == 3 and summary["skipped"] == 2
    assert any("f2.npy" in s for s in summary["skipped_items"])
    assert any("30" in s for s in summary["skipped_items"])


def test_a_bad_image_in_a_folder_dataset_is_skipped_and_reported(tmp_path):
    import cv2

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cv2.imwrite(str(tmp_path / "dog" / "big.png"), np.zeros((9, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "stray.png"), np.zeros((8, 8, 3), np.uint8))
    ds = load_image_folder(tmp_path)
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
    assert len(ds.skipped) == 3 and any("broken.png" in s for s in ds.skipped)


def test_frames_of_another_size_or_key_inside_a_valid_chunk_are_skipped(world, tmp_path):
    key = load_key_file(world / "cam.key")
    good = list(RecordingReader(world / "rec.mcap").frames())
    session = good[0].meta.session
    skey = key.for_session(bytes.fromhex(session))
    # authentic frames (signed with the session key, new indices) that do not fit the stream: only the stream
    # check stops them
    odd_size = sign_frame(skey, ProtectedFrame(np.zeros((30, 28), np.uint16),
                                               FrameMeta(**{**good[3].meta.to_dict(), "height": 30, "frame_index": N})))
    odd_key = sign_frame(skey, ProtectedFrame(good[4].data, FrameMeta(**{**good[4].meta.to_dict(), "frame_index": N + 1,
                                                                         "key_fingerprint": "f" * 16})))
    rec = tmp_path / "mixed.mcap"
    with Recorder(rec, {**_sensor(world)}, "pixel", False, key.fingerprint, session=session, chunk_size=1 << 20) as r:
        for i, frame in enumerate(good):
            r.write(frame)
            if i == N - 1:
                for odd in (odd_size, odd_key):  # bypass the recorder's own key and size checks
                    r._writer.add_message(r._header_channel, log_time=0, publish_time=0,
                                          data=encode_header(odd.meta), sequence=0)
                    r._writer.add_message(r._channel, log_time=0, publish_time=0, data=encode_image(odd), sequence=0)
    summary = replay_recording(str(rec), config(world, output={"predictions": str(tmp_path / "p.csv")}),
                               progress=False)
    assert summary["error"] is None and summary["frames"] == N and summary["skipped"] == 2
    auth = summary["replay_report"]["authentication"]
    assert auth["failures"] == 0 and auth["verified"] == N + 2 and auth["reordered"] == []
    assert any("30" in p for p in summary["replay_report"]["problems"])
    assert any("ffff" in p for p in summary["replay_report"]["problems"])
    assert len((tmp_path / "p.csv").read_text().splitlines()) == N + 1


def _sensor(world: Path) -> dict:
    return RecordingReader(world / "rec.mcap").sensor_config()


def test_train_writes_to_the_working_directory_and_refuses_to_overwrite(world, tmp_path, monkeypatch, capsys):
    from pipeline.lab.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    default = Path(TrainConfig().out)
    assert not default.is_absolute() and default.resolve().parent == tmp_path
    out = tmp_path / "m.pt"
    save_checkpoint(out, build_model("compact", 1, 10), {"name": "compact", "in_channels": 1, "num_classes": 10}, {})
    before = out.read_bytes()
    argv = ["train", "--dataset", "mnist", "--data", str(world), "--epochs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*argv, "--force", "--limit-train", "16", "--limit-test", "8"]) == 0
    assert out.read_bytes() != before


def test_capture_never_replaces_its_input(world, tmp_path, capsys):
    frame = tmp_path / "f.npy"
    write_raw(frame, np.full((8, 8), 100, np.uint16), RawMeta(width=8, height=8, bit_depth=10, cfa="mono"))
    before = frame.read_bytes()
    assert main(["capture", str(frame), "--sensor", "configs/sensors/mono10.yaml", "--out", str(frame)]) == 2
    assert "also an input" in capsys.readouterr().err and frame.read_bytes() == before
    assert main(["capture", str(frame), "--sensor", "configs/sensors/mono10.yaml", "--out", str(tmp_path / "o.png"),
                 "--preview", str(tmp_path / "o.png")]) == 2
    assert "same file" in capsys.readouterr().err


def test_keygen_on_a_full_disk_leaves_no_key_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KeyFileError, match="nothing was left behind"):
        write_key_file(tmp_path / "k.key")
    assert not (tmp_path / "k.key").exists()
    monkeypatch.undo()
    write_key_file(tmp_path / "k.key")
    assert load_key_file(tmp_path / "k.key").fingerprint


# -- 4. silent loss ---------------------------------------------------------------------------------------------------
def small_chunk_recording(world: Path, path: Path) -> None:
    original = Recorder.__init__

    def small_chunks(self, *args, **kwargs):
        kwargs["chunk_size"] = 3000
        original(self, *args, **kwargs)

    Recorder.__init__ = small_chunks
    try:
        record_frames(config(world), str(path), progress=False)
    finally:
        Recorder.__init__ = original


def test_a_recording_cut_at_a_chunk_boundary_is_reported(world, tmp_path, capsys):
    full = tmp_path / "full.mcap"
    small_chunk_recording(world, full)
    data = full.read_bytes()
    records = top_level_records(data)
    chunks = [i for i, (_, op, _) in enumerate(records) if op == 0x06]
    assert len(chunks) > 3
    cut_at = records[chunks[2]][0]  # the start of the third chunk: two whole chunks and their indexes remain
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[:cut_at])
    reader = RecordingReader(cut)
    frames = list(reader.frames())
    assert 0 < len(frames) < N
    assert reader.report.lost_is_lower_bound and any("not finalised" in p for p in reader.report.problems)
    assert main(["replay", str(cut), "--key", str(world / "cam.key"), *model_args(world), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "not finalised" in err and f"{len(frames)} frames recovered" in err


def test_a_partial_left_by_kill_is_replayed_and_said_so(world, tmp_path, capsys):
    key = load_key_file(world / "cam.key")
    frames = list(RecordingReader(world / "rec.mcap").frames())
    rec = Recorder(tmp_path / "k.mcap", _sensor(world), "pixel", False, key.fingerprint, chunk_size=3000,
                   session=frames[0].meta.session)
    for f in frames:
        rec.write(f)
    rec._fh.flush()
    killed = tmp_path / "k.mcap.0badc0de.partial"
    killed.write_bytes(rec.partial.read_bytes())  # what kill -9 leaves: chunks so far, no summary, no footer
    rec.close()
    assert main(["replay", str(killed), "--key", str(world / "cam.key"), *model_args(world), "--quiet",
                 "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert 0 < summary["frames"] <= N
    assert ".partial file" in out.err and "not finalised" in out.err


def test_sigterm_finalises_a_recording_like_ctrl_c(tmp_path):
    key = tmp_path / "cam.key"
    write_key_file(key)
    out = tmp_path / "t.mcap"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "record", "--key", str(key), "--dataset",
                             "fashion-mnist-sample", "--limit", "1000", "--out", str(out), "--quiet", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        staged = partials(tmp_path)
        if staged and staged[0].stat().st_size > 100_000:  # frames are being written
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and 0 < summary["frames"] < 1000
    reader = RecordingReader(out)
    assert reader.finalised and len(list(reader.frames())) == summary["frames"]
    assert reader.report.problems == [] and partials(tmp_path) == []


def test_sigterm_is_handled_like_ctrl_c_in_every_command(monkeypatch, capsys):
    import pipeline.cli.main as cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(cli, "cmd_ptc", terminated)
    assert main(["ptc"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler, None) or callable(
        signal.getsignal(signal.SIGTERM))


# -- 5. damaged metadata ----------------------------------------------------------------------------------------------
def test_a_flipped_byte_anywhere_before_the_frames_loses_no_frame(world, tmp_path):
    data = (world / "rec.mcap").read_bytes()
    first_chunk = next(pos for pos, op, _ in top_level_records(data) if op == 0x06)
    assert first_chunk > 300, "the metadata records come first"
    bad = tmp_path / "flip.mcap"
    for offset in range(first_chunk):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            reader = RecordingReader(bad)
        except PrivcamError as err:  # only a recording whose magic is gone may be refused
            assert offset < 8, (offset, err)
            continue
        frames = list(reader.frames())
        assert len(frames) == N, (offset, reader.report.problems)
        reader.sensor_config()  # never raises


def test_replay_survives_damaged_metadata_and_says_so(world, tmp_path, capsys):
    data = (world / "rec.mcap").read_bytes()
    records = top_level_records(data)
    metadata = [pos for pos, op, _ in records if op == 0x0C][:2]
    bad = tmp_path / "meta.mcap"
    for pos in metadata:
        for delta in (9 + 3, 9 + 40):  # a string length field and a byte of the text
            flipped = bytearray(data)
            flipped[pos + delta] ^= 0xFF
            bad.write_bytes(bytes(flipped))
            summary = replay_recording(str(bad), config(world), progress=False)
            assert summary["frames"] == N and summary["error"] is None, summary
    flipped = bytearray(data)
    sensor_at = metadata[0] + 9 + 40
    flipped[sensor_at:sensor_at + 6] = b"\x00\xff{[:\t"  # unparsable YAML
    bad.write_bytes(bytes(flipped))
    assert main(["replay", str(bad), "--key", str(world / "cam.key"), *model_args(world), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sensor" in err


# -- 6. output paths, checked before the work -------------------------------------------------------------------------
@pytest.fixture
def blocker(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


def outputs_cases(world: Path, tmp: Path, blocker: Path) -> list[tuple[list[str], str]]:
    photo = tmp / "photo.npy"
    if not photo.exists():
        write_raw(photo, np.full((8, 8), 100, np.uint16), RawMeta(width=8, height=8, bit_depth=10, cfa="mono"))
    key = str(world / "cam.key")
    mono = ["--sensor", "configs/sensors/mono10.yaml"]
    return [
        (["record", *source_args(world), "--out", str(blocker / "x.mcap")], "--out"),
        (["record", *source_args(world), "--out", str(tmp)], "--out"),
        (["record", *source_args(world), "--out", str(tmp / "x.txt")], ".mcap"),
        (["run", *source_args(world), *model_args(world), "--predictions", str(blocker / "p.jsonl")], "--predictions"),
        (["run", *source_args(world), *model_args(world), "--predictions", str(tmp / "p.txt")], "predictions"),
        (["run", *source_args(world), *model_args(world), "--record", str(tmp)], "record"),
        (["replay", str(world / "rec.mcap"), "--key", key, *model_args(world), "--predictions", str(tmp)],
         "predictions"),
        (["capture", str(photo), *mono, "--out", str(tmp / "o.npy"), "--preview", str(blocker / "p.png")],
         "--preview"),
        (["capture", str(photo), *mono, "--out", str(tmp / "o.txt")], "--out"),
        (["show", "--key", key, "--out", str(blocker / "s.png")], "--out"),
        (["show", "--key", key, "--out", str(tmp / "s.jpg")], ".png"),
        (["eval", "accuracy", "--dataset", "mnist", "--data", str(world), "--out", str(tmp)], "--out"),
        (["eval", "privacy", "--out", str(blocker / "t.json")], "--out"),
        (["bench", "readout", "--out", str(tmp / "r.txt")], ".json"),
        (["train", "--dataset", "mnist", "--data", str(world), "--out", str(blocker / "m.pt")], "out"),
        (["keygen", "--out", str(blocker / "k.key")], "--out"),
        (["demo", "--out", str(blocker)], "--out"),
    ]


def test_bad_output_paths_are_refused_before_any_work(world, tmp_path, blocker, capsys):
    for argv, words in outputs_cases(world, tmp_path, blocker):
        t0 = time.perf_counter()
        assert main([*argv, "--quiet"] if argv[0] in ("record", "run", "replay", "train", "demo") or
                    argv[:2] == ["eval", "accuracy"] else argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert time.perf_counter() - t0 < 30, (argv, "refused late")
    assert not (tmp_path / "o.npy").exists(), "capture wrote --out although --preview was unwritable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "photo.npy", "photo.npy.yaml"]


def test_outputs_into_a_missing_folder_are_created(world, tmp_path):
    out = tmp_path / "new" / "sub" / "r.mcap"
    assert main(["record", *source_args(world, 4), "--out", str(out), "--quiet"]) == 0
    assert len(list(RecordingReader(out).frames())) == 4
