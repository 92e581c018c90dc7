"""The ``privcam`` commands as a user runs them: separate processes, on the shipped sample, small limits.

Every command runs this checkout's code (``python -m pipeline.cli.main`` with PYTHONPATH set), from an
empty working folder. Covered: run, record, replay (JSON lines and CSV predictions), show, bench, demo;
Ctrl-C (SIGINT) during run, record and replay (exit status 130, what was done kept, the recording
finalised and replayable); SIGTERM during run; and no secret in any output: prediction files,
recordings (decompressed), JSON summaries, stderr, demo_out.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from mcap.stream_reader import StreamReader

from pipeline.stream.datasets import load_dataset
from pipeline.stream.recording import RecordingReader
from pipeline.stream.run import RunConfig, record_frames
from sensor.keys import Key, load_key_file, write_key_file
from sensor.readout import readout_permutation

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
CPU = ("--set", "model.device=cpu")
LONG = 1000  # frames of a run that is interrupted: the whole sample, one frame per batch
TIMEOUT_S = 300


def privcam(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def summary_of(proc: subprocess.CompletedProcess | str) -> dict:
    out = proc if isinstance(proc, str) else proc.stdout
    return json.loads(out[out.index("{"):])


# -- secrets --------------------------------------------------------------------------------------


def secret_forms(key_file: Path) -> list[bytes]:
    """The key as it could leak: hex (either case) and the raw 32 bytes."""
    text = key_file.read_text().strip()
    assert len(text) == 64
    return [text.lower().encode(), text.upper().encode(), bytes.fromhex(text)]


def readable_bytes(path: Path) -> bytes:
    """A file's bytes; for a recording also every record decompressed (zstd chunks hide a plain search)."""
    data = path.read_bytes()
    if path.suffix != ".mcap":
        return data
    parts = [data]
    with open(path, "rb") as fh:
        for record in StreamReader(fh, emit_chunks=False).records:
            for name in ("data", "metadata", "topic", "name"):
                value = getattr(record, name, None)
                if isinstance(value, bytes):
                    parts.append(value)
                elif value is not None:
                    parts.append(json.dumps(value, default=str).encode())
    return b"\n".join(parts)


def assert_no_secret(key_file: Path, files: list[Path], texts: list[str]) -> None:
    forms = secret_forms(key_file)
    assert files, "nothing to check"
    for path in files:
        if path.resolve() == key_file.resolve():
            continue
        content = readable_bytes(path)
        assert not any(form in content for form in forms), f"{path.name} holds the secret key"
    for text in texts:
        assert not any(form in text.encode() for form in forms), "a summary or stderr holds the secret key"


# -- interrupted processes ------------------------------------------------------------------------


class Running:
    """A privcam process with a progress bar on stderr, read in a thread."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=cwd, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.err.extend(chunk)

    def progress(self) -> int:
        counts = re.findall(rb"(\d+)/%d " % LONG, bytes(self.err))
        return int(counts[-1]) if counts else 0

    def signal_after(self, frames: int, sig: int) -> None:
        """Send ``sig`` once the progress bar shows ``frames`` done (the run is well under way)."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.progress() < frames:
            assert self.proc.poll() is None, f"ended before the signal: {bytes(self.err)[-2000:]!r}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        self.proc.send_signal(sig)

    def finish(self) -> tuple[int, str, str]:
        out = self.proc.stdout.read().decode()
        rc = self.proc.wait(timeout=TIMEOUT_S)
        self._reader.join(timeout=10)
        return rc, out, bytes(self.err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running():
    started: list[Running] = []

    def start(cwd: Path, *args: str) -> Running:
        started.append(Running(cwd, *args))
        return started[-1]

    yield start
    for r in started:
        r.kill()


def leftovers(folder: Path) -> list[str]:
    """Half-written files: recordings still .partial, prediction temporaries."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".tmp" in p.name)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "camera.key"
    write_key_file(path)
    return path


@pytest.fixture(scope="module")
def commands(tmp_path_factory, key_file):
    """run (recording + JSON lines), replay of that recording (CSV), and record, each once."""
    cwd = tmp_path_factory.mktemp("commands")
    key = str(key_file)
    source = ("--dataset", "fashion-mnist-sample", "--limit", "24", "--rotation")
    procs = {
        "run": privcam(cwd, "run", "--key", key, *source, "--batch-size", "8", "--record", "live.mcap",
                       "--predictions", "live.jsonl", "--json", "--quiet", *CPU),
        "replay": privcam(cwd, "replay", "live.mcap", "--key", key, "--predictions", "replay.csv", "--json",
                          "--quiet", *CPU),
        "record": privcam(cwd, "record", "--key", key, *source, "--out", "rec.mcap", "--json", "--quiet"),
    }
    return cwd, procs


def test_run_on_the_shipped_sample(commands, key_file):
    cwd, procs = commands
    proc = procs["run"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    assert summary["error"] is None and summary["interrupted"] is False
    assert summary["frames"] == 24 and summary["recording"]["frames_written"] == 24
    assert summary["rotation"] is True and summary["key_fingerprint"] == load_key_file(key_file).fingerprint
    assert summary["accuracy"] >= 0.75, "the shipped checkpoint through the keyed path"
    rows = jsonl(cwd / "live.jsonl")
    labels = load_dataset("fashion-mnist-sample").labels[:24].tolist()
    assert [r["frame_index"] for r in rows] == list(range(24)) and [r["label"] for r in rows] == labels
    assert summary["accuracy"] == np.mean([r["pred"] == r["label"] for r in rows])


def unlabelled(rows: list[dict]) -> list[dict]:
    """Prediction rows without labels (recordings hold none by default, so replays report label null)."""
    return [{k: v for k, v in r.items() if k != "label"} for r in rows]


def test_replay_to_csv_gives_the_run_predictions(commands):
    """CSV predictions: the documented header, then the JSON lines' rows, value for value."""
    cwd, procs = commands
    proc = procs["replay"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    assert summary["frames"] == 24 and summary["replay_report"]["frames_lost"] == 0
    lines = (cwd / "replay.csv").read_text().splitlines()
    assert lines[0] == "frame_index,label,pred,confidence"
    with open(cwd / "replay.csv", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert all(r["label"] == "" for r in raw), "the recording holds no labels (no --store-labels)"
    rows = [{"frame_index": int(r["frame_index"]), "pred": int(r["pred"]), "confidence": float(r["confidence"])}
            for r in raw]
    assert rows == unlabelled(jsonl(cwd / "live.jsonl"))


def test_record_captures_the_frames_the_run_recorded(commands, key_file):
    cwd, procs = commands
    proc = procs["record"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_of(proc)["frames"] == 24
    recorded = list(RecordingReader(cwd / "rec.mcap").frames())
    live = list(RecordingReader(cwd / "live.mcap").frames())
    assert len(recorded) == len(live) == 24
    assert recorded[0].meta.session != live[0].meta.session, "every run is a session of its own"
    master = load_key_file(key_file)
    for a, b in zip(recorded, live, strict=True):
        assert not np.array_equal(a.data, b.data), "two sessions read frame n out in unrelated orders"
        plain_a, plain_b = (readout_permutation(master.for_session(bytes.fromhex(f.meta.session)), "pixel", 28, 28,
                                                f.meta.frame_index).inverse(f.data) for f in (a, b))
        assert np.array_equal(plain_a, plain_b), "the same plain frame under either session's key"
        volatile = {"capture_time_ns": 0, "session": "", "mac": ""}
        assert {**a.meta.to_dict(), **volatile} == {**b.meta.to_dict(), **volatile}
    assert leftovers(cwd) == []


def test_no_secret_in_any_output_of_run_record_replay(commands, key_file):
    cwd, procs = commands
    files = sorted(p for p in cwd.iterdir() if p.is_file())
    assert {p.name for p in files} == {"live.mcap", "live.jsonl", "replay.csv", "rec.mcap"}
    assert_no_secret(key_file, files, [t for p in procs.values() for t in (p.stdout, p.stderr)])


def test_show_writes_the_five_panels(tmp_path, key_file):
    proc = privcam(tmp_path, "show", "--key", str(key_file), "--scheme", "quad", "--out", "show.png", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    image = cv2.imread(str(tmp_path / "show.png"))
    assert image.shape == (224 + 28, 5 * 224, 3)
    assert summary["keyed_vs_plain_feature_max_abs_diff"] < 1e-4
    assert summary["scheme"] == "quad" and summary["frame_shape"] == [96, 144]
    assert_no_secret(key_file, [tmp_path / "show.png"], [proc.stdout, proc.stderr])


def test_bench_readout_with_tiny_options(tmp_path):
    proc = privcam(tmp_path, "bench", "readout", "--json", "--out", "bench.json", "--",
                   "--height", "64", "--width", "64", "--repeat", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = summary_of(proc)
    assert result == json.loads((tmp_path / "bench.json").read_text())
    assert result["frame"]["height"] == 64 and result["frame"]["width"] == 64 and result["repeat"] == 2
    names = {r["name"] for r in result["results"]}
    assert {"memcpy", "three_pass_forward/pixel", "three_pass_inverse/quad", "three_pass_forward/plane"} <= names
    assert all(r["ms"] > 0 for r in result["results"])


def test_demo_with_a_small_limit(tmp_path):
    proc = privcam(tmp_path, "demo", "--out", "demo_out", "--limit", "32", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    out = tmp_path / "demo_out"
    assert summary["error"] is None and summary["frames"] == 32 and summary["replay_frames"] == 32
    assert summary["replay_identical_predictions"] is True
    assert summary["keyed_accuracy"] >= 0.75 and summary["wrong_key_accuracy"] < 0.4
    assert {"camera.key", "chart.dng", "chart_preview.png", "frames.mcap", "predictions.jsonl", "replay.jsonl",
            "show.png"} <= set(summary["files"])
    assert (out / "camera.key").stat().st_mode & 0o777 == 0o600
    assert summary["key_fingerprint"] == load_key_file(out / "camera.key").fingerprint
    assert_no_secret(out / "camera.key", sorted(out.iterdir()), [proc.stdout, proc.stderr])


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------


def interrupted_run(running, cwd: Path, key_file: Path, sig: int) -> tuple[int, str, str]:
    run = running(cwd, "run", "--key", str(key_file), "--dataset", "fashion-mnist-sample", "--limit", str(LONG),
                  "--rotation", "--batch-size", "1", "--record", "live.mcap", "--predictions", "live.jsonl",
                  "--json", *CPU)
    run.signal_after(16, sig)
    return run.finish()


def assert_replayable(recording: Path, key_file: Path, tmp_path: Path) -> list[dict]:
    """The recording is finalised (an intact MCAP summary, nothing lost) and ``privcam replay`` replays it;
    returns its predictions (one frame per batch, as the interrupted runs classify, and in a process like
    theirs, with the same thread count: CPU GEMMs reassociate sums by thread count and batch shape, so
    bit-for-bit equality is the claim for the same command on the same machine)."""
    reader = RecordingReader(recording)
    frames = list(reader.frames())
    assert reader.summary_message_count() == len(frames) > 0, "finalised: the summary counts every frame"
    assert reader.report.frames_lost == 0 and reader.report.problems == []
    assert [f.meta.frame_index for f in frames] == list(range(len(frames)))
    out = tmp_path / "replayed.jsonl"
    proc = privcam(tmp_path, "replay", str(recording), "--key", str(key_file), "--batch-size", "1",
                   "--predictions", str(out), "--json", "--quiet", *CPU)
    summary = summary_of(proc)
    assert proc.returncode == 0 and summary["error"] is None and summary["frames"] == len(frames), proc.stderr
    return jsonl(out)


def test_ctrl_c_during_run_keeps_what_was_done(running, tmp_path, key_file):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, out, err = interrupted_run(running, cwd, key_file, signal.SIGINT)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err
    summary = summary_of(out)
    assert summary["interrupted"] is True and summary["exit_status"] == 130
    assert 16 <= summary["frames"] < LONG
    assert leftovers(cwd) == []
    rows = jsonl(cwd / "live.jsonl")
    assert len(rows) == summary["frames"], "every frame that reached the sink is in the predictions file"
    assert [r["frame_index"] for r in rows] == list(range(len(rows)))
    replayed = assert_replayable(cwd / "live.mcap", key_file, tmp_path)
    assert len(replayed) == summary["recording"]["frames_written"] >= len(rows)
    assert unlabelled(replayed[:len(rows)]) == unlabelled(rows), "the recording replays to the live predictions"
    assert_no_secret(key_file, [cwd / "live.mcap", cwd / "live.jsonl"], [out, err])


def test_ctrl_c_during_record_finalises_the_recording(running, tmp_path, key_file):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rec = running(cwd, "record", "--key", str(key_file), "--dataset", "fashion-mnist-sample", "--limit", str(LONG),
                  "--rotation", "--out", "rec.mcap", "--json", "--set", "pipeline.queue_size=1")
    rec.signal_after(16, signal.SIGINT)
    rc, out, err = rec.finish()
    assert rc == 130, err[-2000:]
    summary = summary_of(out)
    assert summary["interrupted"] is True and 16 <= summary["frames"] < LONG
    assert leftovers(cwd) == []
    assert len(assert_replayable(cwd / "rec.mcap", key_file, tmp_path)) == summary["frames"]


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory, key_file) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.mcap"
    cfg = RunConfig.from_dict({"source": {"dataset": "fashion-mnist-sample", "limit": LONG},
                               "key": {"file": str(key_file), "rotation": True}}, "test")
    assert record_frames(cfg, str(path), progress=False)["frames"] == LONG
    return path


def test_ctrl_c_during_replay_keeps_the_predictions_made(running, tmp_path, key_file, long_recording):
    rep = running(tmp_path, "replay", str(long_recording), "--key", str(key_file), "--batch-size", "1",
                  "--predictions", "replay.jsonl", "--json", *CPU)
    rep.signal_after(16, signal.SIGINT)
    rc, out, err = rep.finish()
    assert rc == 130, err[-2000:]
    summary = summary_of(out)
    assert summary["interrupted"] is True and 16 <= summary["frames"] < LONG
    assert leftovers(tmp_path) == []
    rows = jsonl(tmp_path / "replay.jsonl")
    assert [r["frame_index"] for r in rows] == list(range(summary["frames"]))


def test_sigterm_during_run_finalises_like_ctrl_c(running, tmp_path, key_file):
    """SIGTERM stops the run like Ctrl-C: exit 130, outputs finalised, nothing temporary left behind."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, out, err = interrupted_run(running, cwd, key_file, signal.SIGTERM)
    assert rc == 130, f"exit status {rc}: SIGTERM was not handled like Ctrl-C"
    assert leftovers(cwd) == []
    rows = jsonl(cwd / "live.jsonl")
    assert len(rows) >= 16
    assert len(assert_replayable(cwd / "live.mcap", key_file, tmp_path)) >= len(rows)


def test_secret_forms_would_be_found(tmp_path):
    """The secret check itself can fail: a file holding the key's hex or bytes, or a recording holding it
    inside a compressed chunk, is caught."""
    key_file = tmp_path / "k.key"
    key = write_key_file(key_file)
    assert isinstance(key, Key)
    hex_text = key_file.read_text().strip()
    (tmp_path / "a.txt").write_text(f"x {hex_text.upper()} y")
    (tmp_path / "b.bin").write_bytes(b"\0" + bytes.fromhex(hex_text) + b"\0")
    for name in ("a.txt", "b.bin"):
        with pytest.raises(AssertionError, match="holds the secret"):
            assert_no_secret(key_file, [tmp_path / name], [])
    from mcap.writer import CompressionType, Writer

    with open(tmp_path / "c.mcap", "wb") as fh:
        writer = Writer(fh, compression=CompressionType.ZSTD)
        writer.start()
        channel = writer.register_channel("/t", "raw", writer.register_schema("s", "raw", b""))
        writer.add_message(channel, 0, hex_text.encode() * 3, 0)
        writer.finish()
    assert hex_text.encode() not in (tmp_path / "c.mcap").read_bytes(), "compressed: a plain search misses it"
    with pytest.raises(AssertionError, match="holds the secret"):
        assert_no_secret(key_file, [tmp_path / "c.mcap"], [])
    with pytest.raises(AssertionError, match="summary or stderr"):
        assert_no_secret(key_file, [tmp_path / "k.key"], [f"error: {hex_text}"])
