"""Scale out on Ray: replay many recordings, serve many simulated cameras (optional extra ``ray``).

privcam does not schedule a cluster itself; it hands Ray two jobs and keeps the work in one place.
The per-batch work is :class:`~pipeline.stream.classifier.KeyedClassifier` (protected frames in,
predictions out), built by :func:`pipeline.stream.run.build_classifier` exactly as the local pipeline
builds it, here inside each Ray actor (:class:`KeyedBatchPredictor`).

Replay (:func:`replay_on_ray`)::

    recordings (paths, folders, globs) -> driver: header scan + fingerprint check per recording
    -> RecordingDatasource: one read task per recording, streaming blocks of whole batches
    -> map_batches(KeyedBatchPredictor) on a fixed actor pool -> driver: back in order -> sink

* A read task walks its recording through a read-only memory map with the same damage-tolerant
  walker as the local reader (:class:`MappedRecordingReader`), so the frames and the damage
  report are the local ones; the file is never read into memory as a whole.
* One dataset row is one model batch: ``batch_size`` consecutive intact frames of one recording,
  cut exactly where the local replay cuts them (from the first frame, in file order). CPU kernels
  give results that differ in the last bits for batches of other sizes, so equal batches are what
  makes the Ray predictions equal the local ones bit for bit. A block holds whole rows (about
  ``block_bytes``), so Ray may move, merge or split blocks without changing any batch.
* Model, key and gather tables are built once per actor (per frame format) from the key file
  path and checkpoint path given to the actor constructor; tensors and key material never travel
  as task arguments or through the object store (only protected frames and predictions do).
* The driver puts predictions back into recording order and file order (a small reorder buffer of
  predictions only), so a JSON-lines output line is the local line with a leading ``recording``.
  A recording whose batch fails (e.g. a frame of another format) keeps the predictions before
  that batch, as the local replay does, and the summary names the error.

Live many-camera mode (:func:`run_cameras_on_ray`)::

    CameraActor x N (own sensor, frame counter, rotation; optional own recording)
      --ray.util.queue.Queue(queue_size) of ObjectRefs--> ModelWorker x M --Queue--> driver sink

Every queue is bounded, so a slow model pool blocks the cameras (backpressure across
processes) and memory stays flat. Camera ``i`` captures a contiguous shard of the source whose
size is a multiple of ``batch_size`` and numbers its frames with the source item index, so every
frame index (and per-frame rotation) is unique across cameras and the batches are the local
run's: the union of the camera predictions equals ``privcam run`` bit for bit.

Keys: every worker reads the key file path it is given (on a cluster that path must exist on
every node, like the checkpoint and the recordings). :class:`sensor.keys.Key` refuses to be
pickled, so the secret cannot reach the object store or a task argument by accident; only the
16-hex-digit fingerprint appears in results and messages.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import pyarrow as pa
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from ray.util.queue import Empty, Full, Queue
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    from sensor.errors import PrivcamError as _PrivcamError

    raise _PrivcamError(f"the Ray backend needs the optional extra: pip install 'privcam[ray]' ({_err})") from None

import torch
from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Metadata, Statistics
from tqdm import tqdm

from models.checkpoint import read_manifest
from sensor.atomic import atomic_path
from sensor.config import SensorConfig
from sensor.errors import ConfigError, PrivcamError
from sensor.frame import ProtectedFrame
from sensor.keys import Key
from sensor.sensor import Sensor

from ..resources import resolve
from ..stream.classifier import FrameFormat, KeyedClassifier
from ..stream.datasets import load_dataset
from ..stream.engine import StageStats
from ..stream.recording import (
    MAGIC,
    Recorder,
    RecordingError,
    RecordingReader,
    ReplayReport,
    decode_frame,
    encode_frame,
)
from ..stream.run import (
    KeySection,
    ModelSection,
    RunConfig,
    build_classifier,
    capture_stage,
    load_key,
    pick_device,
    scene_items,
)

PREDICTION_FIELDS = ("frame_index", "label", "pred", "confidence")
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
_FOOTER_BYTES = 1 + 8 + 20  # opcode, length, summary_start + summary_offset_start + summary_crc
_POLL_S = 0.1
READ_CPUS = 0.25  # logical CPUs per read task (decompress + decode; the model is the heavy stage)

# One dataset row = one model batch of one recording. The last row of a recording has batch_index -1 and
# carries the read report (JSON) instead of frames.
BATCH_SCHEMA = pa.schema([("rec_index", pa.int64()), ("batch_index", pa.int64()), ("fmt", pa.string()),
                          ("fingerprint", pa.string()), ("frames", pa.large_list(pa.large_binary())),
                          ("report", pa.string())])
# One output row = the predictions of one batch (lists, one entry per frame), or a note (report, error).
PREDICTION_SCHEMA = pa.schema([("rec_index", pa.int64()), ("batch_index", pa.int64()),
                               ("frame_index", pa.list_(pa.int64())), ("label", pa.list_(pa.int64())),
                               ("pred", pa.list_(pa.int64())), ("confidence", pa.list_(pa.float64())),
                               ("note", pa.string())])


# -- recordings without reading them into memory ------------------------------------------------------------
class MappedRecordingReader(RecordingReader):
    """:class:`RecordingReader` over a read-only memory map: pages are read as the walk reaches them.

    The walk, the damage handling and the report are the local reader's. ``scan_metadata=False`` skips the
    full metadata pass (see :func:`scan_header` for a scan that stops early). Call :meth:`close` when done.
    """

    def __init__(self, path: str | os.PathLike, scan_metadata: bool = True) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise RecordingError(f"{self.path}: recording not found") from None
        except ValueError:  # an empty file cannot be mapped
            raise RecordingError(f"{self.path}: not an MCAP file (bad magic bytes)") from None
        except OSError as err:
            raise RecordingError(f"{self.path}: cannot read recording: {err.strerror}") from None
        if self._data[:len(MAGIC)] != MAGIC:
            self._data.close()
            raise RecordingError(f"{self.path}: not an MCAP file (bad magic bytes)")
        self.report = ReplayReport()
        self.metadata: dict[str, dict[str, str]] = {}
        if scan_metadata:
            self._scan_metadata()

    def close(self) -> None:
        self._data.close()


def summary_message_count(data: bytes | mmap.mmap) -> int | None:
    """Message count from an intact MCAP summary (footer -> Statistics), or None when there is none."""
    n, tail = len(data), _FOOTER_BYTES + len(MAGIC)
    if n < len(MAGIC) + tail or data[n - len(MAGIC):] != MAGIC or data[n - tail] != Opcode.FOOTER:
        return None
    (summary_start,) = struct.unpack_from("<Q", data, n - tail + 9)
    pos, end = summary_start, n - tail
    if not len(MAGIC) <= pos < end:
        return None
    while pos + 9 <= end:
        opcode = data[pos]
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        if pos + 9 + length > end:
            return None
        if opcode == Opcode.STATISTICS:
            return Statistics.read(ReadDataStream(io.BytesIO(data[pos + 9:pos + 9 + length]))).message_count
        pos += 9 + length
    return None


@dataclass(frozen=True)
class RecordingHeader:
    """What the driver learns about a recording without reading its frames. Public fields only."""

    index: int
    path: str
    key_fingerprint: str | None
    scheme: str | None
    rotation: bool
    black_level: int
    max_dn: int
    expected_frames: int | None
    size_bytes: int


def scan_header(path: str, index: int = 0) -> RecordingHeader:
    """Metadata (fingerprint, scheme, sensor levels) and the summary's frame count; stops at the first chunk
    once both privcam metadata records are known (a full walk only when they are missing)."""
    reader = MappedRecordingReader(path, scan_metadata=False)
    try:
        for opcode, body in reader._records(collect_problems=False):
            if opcode == Opcode.METADATA:
                record = Metadata.read(ReadDataStream(io.BytesIO(body)))
                reader.metadata[record.name] = dict(record.metadata)
            elif opcode in (Opcode.CHUNK, Opcode.MESSAGE) and {"privcam.sensor", "privcam.recording"} <= set(
                    reader.metadata):
                break
        sensor_cfg = SensorConfig.from_dict(reader.sensor_config() or {}, f"{path} [privcam.sensor]")
        return RecordingHeader(index, str(path), reader.key_fingerprint, reader.scheme, reader.rotation,
                               sensor_cfg.black_level_dn, sensor_cfg.max_dn, summary_message_count(reader._data),
                               len(reader._data))
    finally:
        reader.close()


def expand_recordings(paths: list[str]) -> list[str]:
    """Files as given, folders as their ``*.mcap`` files, globs expanded (``**`` recursive); sorted, deduplicated.

    Raises PrivcamError when nothing matches.
    """
    found: list[str] = []
    for item in paths:
        if any(ch in item for ch in "*?["):
            matches = sorted(m for m in glob.glob(item, recursive=True) if m.endswith(".mcap") and os.path.isfile(m))
            if not matches:
                raise PrivcamError(f"{item}: no .mcap recording matches")
            found += matches
        elif os.path.isdir(item):
            matches = sorted(str(p) for p in Path(item).glob("*.mcap") if p.is_file())
            if not matches:
                raise PrivcamError(f"{item}: folder holds no .mcap recording")
            found += matches
        else:
            found.append(item)
    if not found:
        raise PrivcamError("no recordings given")
    return list(dict.fromkeys(found))


def check_fingerprints(headers: list[RecordingHeader], key: Key, key_file: str) -> None:
    """Refuse the whole job, naming every recording made with another key (as a local replay refuses one)."""
    wrong = [h for h in headers if h.key_fingerprint != key.fingerprint]
    if wrong:
        raise PrivcamError("; ".join(f"{h.path}: recorded with key {h.key_fingerprint}, but {key_file} has "
                                     f"fingerprint {key.fingerprint}" for h in wrong)
                           + "; refusing to replay with the wrong key")


# -- the datasource -----------------------------------------------------------------------------------------
def _fmt_json(fmt: FrameFormat) -> str:
    return json.dumps(asdict(fmt), separators=(",", ":"))


def _batch_rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=BATCH_SCHEMA)


def read_recording_blocks(header: RecordingHeader, batch_size: int, block_bytes: int) -> Iterator[pa.Table]:
    """Read task body: a recording as blocks of whole batches, then one report row.

    Rows: ``frames`` holds up to ``batch_size`` encoded frames (:func:`~pipeline.stream.recording.encode_frame`),
    cut every ``batch_size`` intact frames from the first, as the local replay batches them.
    """
    reader = MappedRecordingReader(header.path)
    try:
        fmt_text, rows, batch, batch_index, rows_per_block = None, [], [], 0, 1
        for frame in reader.frames():
            if fmt_text is None:
                m = frame.meta
                fmt_text = _fmt_json(FrameFormat(m.scheme, m.rotation, m.height, m.width, header.black_level,
                                                 header.max_dn))
                rows_per_block = block_bytes // (batch_size * (frame.data.nbytes + 256)) + 1  # just over the target
            batch.append(encode_frame(frame))
            if len(batch) == batch_size:
                rows.append(_frames_row(header, batch_index, fmt_text, batch))
                batch, batch_index = [], batch_index + 1
                if len(rows) >= rows_per_block:
                    yield _batch_rows_table(rows)
                    rows = []
        if batch:
            rows.append(_frames_row(header, batch_index, fmt_text, batch))
            batch_index += 1
        note = {"kind": "report", "batches": batch_index, "fmt": None if fmt_text is None else json.loads(fmt_text),
                "replay_report": reader.report.to_dict(),
                "error": None if fmt_text is not None else "no intact frame in the recording"}
        rows.append({"rec_index": header.index, "batch_index": -1, "fmt": fmt_text,
                     "fingerprint": header.key_fingerprint, "frames": [], "report": json.dumps(note)})
        yield _batch_rows_table(rows)
    finally:
        reader.close()


def _frames_row(header: RecordingHeader, batch_index: int, fmt_text: str, frames: list[bytes]) -> dict[str, Any]:
    return {"rec_index": header.index, "batch_index": batch_index, "fmt": fmt_text,
            "fingerprint": header.key_fingerprint, "frames": frames, "report": None}


class RecordingDatasource(Datasource):
    """privcam MCAP recordings as a Ray Dataset of model batches (:data:`BATCH_SCHEMA`).

    One read task per recording (a recording is one ordered stream); each yields blocks of about
    ``block_bytes`` holding whole batches, never the whole file.
    """

    def __init__(self, headers: list[RecordingHeader], batch_size: int, block_bytes: int = 256 << 10) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError("replay", "batch_size", ">= 1", batch_size)
        self.headers, self.batch_size, self.block_bytes = list(headers), batch_size, block_bytes

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(h.size_bytes for h in self.headers)  # compressed size: a lower bound

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for h in self.headers:
            meta = BlockMetadata(num_rows=None, size_bytes=h.size_bytes, input_files=[h.path], exec_stats=None)
            read = functools.partial(read_recording_blocks, h, self.batch_size, self.block_bytes)  # one header each
            tasks.append(ReadTask(read, meta, schema=BATCH_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "PrivcamRecording"


# -- the per-actor model -------------------------------------------------------------------------------------
class KeyedBatchPredictor:
    """The model side of every Ray path: key and checkpoint loaded once per actor, from their paths.

    One :class:`~pipeline.stream.classifier.KeyedClassifier` per frame format, built on first use with
    :func:`pipeline.stream.run.build_classifier` (same checks as the local pipeline) and cached, errors included.
    ``__call__`` is the ``map_batches`` entry (pyarrow tables of :data:`BATCH_SCHEMA` rows in,
    :data:`PREDICTION_SCHEMA` rows out); :meth:`classify` is the plain call for the live workers.

    Args:
        key_file: key file path, read on the worker (the secret never leaves this process).
        checkpoint: plain model checkpoint path (.pt beside its .json manifest).
        mode: keyed network mode, "fused" or "fast".
        device: "auto", "cpu" or "cuda" (auto: CUDA when Ray gave this actor a GPU).
        threads: torch intra-op threads for this actor (default: leave torch's setting). Applied again after
            each model build and before each batch: the keyed build (numba kernels) resets torch to one thread
            per core, and on a shared machine that oversubscription costs several times the throughput.
    """

    def __init__(self, key_file: str, checkpoint: str, mode: str = "fused", device: str = "auto",
                 threads: int | None = None) -> None:
        self.threads = threads
        self._pin_threads()
        self._cfg = RunConfig(key=KeySection(file=key_file), model=ModelSection(checkpoint, mode, device))
        self._key = load_key(key_file)
        self.device = str(pick_device(device))
        self._classifiers: dict[FrameFormat, KeyedClassifier | PrivcamError] = {}

    @property
    def fingerprint(self) -> str:
        return self._key.fingerprint

    def _pin_threads(self) -> None:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def classifier(self, fmt: FrameFormat) -> KeyedClassifier:
        """The keyed classifier for ``fmt`` (built once); raises the build error again on later calls."""
        if fmt not in self._classifiers:
            try:
                self._classifiers[fmt] = build_classifier(self._cfg, self._key, fmt)[0]
            except PrivcamError as err:
                self._classifiers[fmt] = err
            self._pin_threads()
        found = self._classifiers[fmt]
        if isinstance(found, PrivcamError):
            raise found
        return found

    def classify(self, fmt: FrameFormat, frames: list[ProtectedFrame]) -> list[dict[str, Any]]:
        """Protected frames (each (H, W) uint16) -> one prediction dict per frame (the local model stage)."""
        classifier = self.classifier(fmt)
        self._pin_threads()
        return classifier(frames)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._row(row) for row in batch.to_pylist()], schema=PREDICTION_SCHEMA)

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"rec_index": row["rec_index"], "batch_index": row["batch_index"], "frame_index": None,
               "label": None, "pred": None, "confidence": None, "note": None}
        if row["batch_index"] < 0:
            out["note"] = json.dumps({**json.loads(row["report"]), "device": self.device})
            return out
        try:
            if row["fingerprint"] != self.fingerprint:
                raise PrivcamError(f"recorded with key {row['fingerprint']}, but the worker holds key "
                                   f"{self.fingerprint}; refusing to replay with the wrong key")
            preds = self.classify(FrameFormat(**json.loads(row["fmt"])), [decode_frame(p) for p in row["frames"]])
        except PrivcamError as err:
            out["note"] = json.dumps({"kind": "error", "error": f"{type(err).__name__}: {err}"})
            return out
        for name in PREDICTION_FIELDS:
            out[name] = [p[name] for p in preds]
        return out


# -- the driver side: order, sink, summary ----------------------------------------------------------------------
class PredictionWriter:
    """Predictions with a leading identity column (``recording`` or ``camera``) to .jsonl, .csv or .parquet.

    Writes to a temporary beside ``path`` and moves it into place on :meth:`close` (what was written is kept
    after an error, as the local sink keeps it). Counts frames and accuracy, overall and per ``lead`` value.
    """

    def __init__(self, path: str | None, lead: str, total: int | None, progress: bool) -> None:
        self.path = Path(path) if path else None
        if self.path is not None and self.path.suffix not in OUTPUT_SUFFIXES:
            raise ConfigError("output", "predictions", f"a path ending in one of {OUTPUT_SUFFIXES}", str(path))
        self.lead, self.fields = lead, (lead, *PREDICTION_FIELDS)
        self.count = self.labelled = self.correct = 0
        self.per: dict[Any, list[int]] = {}  # lead value -> [frames, labelled, correct]
        self._fh, self._csv, self._parquet, self._rows = None, None, None, []
        if self.path is not None:
            self._staged = atomic_path(self.path)
            tmp = self._staged.__enter__()
            if self.path.suffix == ".parquet":
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetWriter(tmp, self._arrow_schema())
            else:
                self._fh = open(tmp, "w", newline="")  # noqa: SIM115 - closed in close()
                if self.path.suffix == ".csv":
                    import csv

                    self._csv = csv.DictWriter(self._fh, fieldnames=self.fields)
                    self._csv.writeheader()
        self._bar = tqdm(total=total, unit="frame", desc="frames", disable=not progress, smoothing=0.1)

    def _arrow_schema(self) -> pa.Schema:
        lead_type = pa.string() if self.lead == "recording" else pa.int64()
        return pa.schema([(self.lead, lead_type), ("frame_index", pa.int64()), ("label", pa.int64()),
                          ("pred", pa.int64()), ("confidence", pa.float64())])

    def write(self, lead_value: Any, preds: list[dict[str, Any]]) -> None:
        """Write one batch of predictions (dicts with :data:`PREDICTION_FIELDS`) made for ``lead_value``."""
        stats = self.per.setdefault(lead_value, [0, 0, 0])
        for p in preds:
            row = {self.lead: lead_value, **{k: p[k] for k in PREDICTION_FIELDS}}
            stats[0] += 1
            if p["label"] is not None:
                stats[1] += 1
                stats[2] += int(p["pred"] == p["label"])
            if self._csv is not None:
                self._csv.writerow(row)
            elif self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")
            elif self._parquet is not None:
                self._rows.append(row)
        if len(self._rows) >= 65536:
            self._flush_parquet()
        self.count += len(preds)
        self.labelled = sum(s[1] for s in self.per.values())
        self.correct = sum(s[2] for s in self.per.values())
        self._bar.update(len(preds))
        if self.labelled:
            self._bar.set_postfix(accuracy=f"{self.correct / self.labelled:.4f}")

    def _flush_parquet(self) -> None:
        if self._rows:
            self._parquet.write_table(pa.Table.from_pylist(self._rows, schema=self._arrow_schema()))
            self._rows = []

    def stats(self, lead_value: Any) -> dict[str, Any]:
        frames, labelled, correct = self.per.get(lead_value, [0, 0, 0])
        return {"frames": frames, "labelled": labelled, "accuracy": correct / labelled if labelled else None}

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def close(self) -> None:
        self._bar.close()
        if self.path is None or self._staged is None:
            return
        if self._parquet is not None:
            self._flush_parquet()
            self._parquet.close()
        elif self._fh is not None:
            self._fh.close()
        staged, self._staged = self._staged, None
        staged.__exit__(None, None, None)


@dataclass
class _RecState:
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_batch: int = 0
    note: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


class ReorderingSink:
    """Driver side of the replay: output rows in any order -> predictions in recording order, then file order.

    Holds out-of-order predictions only (a few numbers per frame). After an error row, the rest of that
    recording is dropped, as a local replay stops at its first failing batch.
    """

    def __init__(self, headers: list[RecordingHeader], writer: PredictionWriter) -> None:
        self.headers, self.writer = headers, writer
        self.states = [_RecState() for _ in headers]
        self.cursor = 0
        self.first_output_s: float | None = None

    def add(self, row: dict[str, Any]) -> None:
        st = self.states[row["rec_index"]]
        if self.first_output_s is None and row["pred"]:
            self.first_output_s = time.perf_counter()
        if row["batch_index"] < 0:
            st.note = json.loads(row["note"])
        elif st.error is None and not st.done and row["batch_index"] >= st.next_batch:  # a retried task's copy
            st.pending[row["batch_index"]] = row
        self._advance()

    def _advance(self) -> None:
        while self.cursor < len(self.states):
            st, header = self.states[self.cursor], self.headers[self.cursor]
            if st.error is None and st.next_batch in st.pending:
                row = st.pending.pop(st.next_batch)
                st.next_batch += 1
                if row["note"] is not None:
                    st.error, st.pending = json.loads(row["note"])["error"], {}
                else:
                    self.writer.write(header.path, [dict(zip(PREDICTION_FIELDS, values, strict=True)) for values in
                                                    zip(*(row[k] for k in PREDICTION_FIELDS), strict=True)])
                continue
            if st.note is not None and (st.error is not None or st.next_batch >= st.note["batches"]):
                st.done, self.cursor = True, self.cursor + 1
                continue
            return

    def recording_summaries(self) -> list[dict[str, Any]]:
        out = []
        for h, st in zip(self.headers, self.states, strict=True):
            note = st.note or {}
            fmt = note.get("fmt") or {}
            error = st.error or note.get("error") or (None if st.done else "not finished")
            out.append({"recording": h.path, "key_fingerprint": h.key_fingerprint, "fingerprint_check": "ok",
                        "scheme": fmt.get("scheme", h.scheme), "rotation": fmt.get("rotation", h.rotation),
                        **self.writer.stats(h.path), "device": note.get("device"),
                        "replay_report": note.get("replay_report"), "error": error})
        return out


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One replay report for many recordings: counts summed, problems prefixed with the recording."""
    known = [r["replay_report"] for r in reports if r["replay_report"]]
    expected = [r["expected_frames"] for r in known]
    return {"frames_read": sum(r["frames_read"] for r in known), "frames_lost": sum(r["frames_lost"] for r in known),
            "lost_is_lower_bound": any(r["lost_is_lower_bound"] for r in known) or len(known) < len(reports),
            "expected_frames": sum(expected) if expected and None not in expected and len(known) == len(reports)
            else None,
            "problems": [f"{r['recording']}: {p}" for r in reports for p in (r["replay_report"] or {}).get(
                "problems", [])]}


# -- Ray session and resources --------------------------------------------------------------------------------
def ensure_ray(ray_address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``ray_address`` (e.g. ``ray://head:10001`` or ``auto``) or start a local Ray; reuse a running
    session. Returns True when this call started or connected (so the caller should shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if ray_address:
        ray.init(address=ray_address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def cluster_cpus() -> tuple[float, float]:
    """(CPUs in the cluster, CPUs of the largest alive node)."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return total, float(max(nodes, default=total))


def share_cpus(processes: int, reserve: float = 0.0, per_process: float | None = None) -> float:
    """Logical CPUs per process so that ``processes`` of them plus ``reserve`` fit the cluster (never more than
    one node holds), or ``per_process`` when given; raises ConfigError when that would not fit (Ray would wait
    for CPUs that never come)."""
    total, node = cluster_cpus()
    if total <= 0:
        raise PrivcamError("the Ray cluster reports no CPUs")
    if per_process is not None:
        if per_process * processes + reserve > total + 1e-9 or per_process > node:
            raise ConfigError("ray", "cpus_per_actor", f"at most {(total - reserve) / processes:.2f} for "
                              f"{processes} processes on {total:g} CPUs (one node has {node:g})", per_process)
        return float(per_process)
    return max(math.floor(min(node, (total - reserve) / processes) * 100) / 100, 0.01)  # down: the sum must fit


def ray_info(ray_address: str | None, **extra: Any) -> dict[str, Any]:
    total, node = cluster_cpus()
    return {"version": ray.__version__, "address": ray_address or "local",
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cluster_cpus": total, **extra}


def innermost(err: BaseException) -> BaseException:
    """The original error inside Ray's wrappers (``RayTaskError.cause``, ``__cause__``)."""
    inner = err
    while True:
        nxt = getattr(inner, "cause", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or nxt is inner:
            return inner
        inner = nxt


def error_text(err: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) error, as ``Type: message`` on one line."""
    inner = innermost(err)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


class DataContextFor:
    """Ray Data settings for one privcam dataset, restored on exit: progress bars and info logs off (privcam
    shows its own bar), and blocks of about ``block_bytes`` (Ray Data would otherwise merge a read task's
    output into blocks of up to 128 MiB, i.e. a whole small recording per block and per actor call)."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes

    def __enter__(self) -> DataContextFor:
        import logging

        ctx = ray.data.DataContext.get_current()
        self._saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size)
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        ctx.target_max_block_size = self.block_bytes
        self._logger = logging.getLogger("ray.data")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size = self._saved
        self._logger.setLevel(self._level)


# -- replay ------------------------------------------------------------------------------------------------
def prediction_dataset(source: RecordingDatasource, actors: int, cpus_per_actor: float, gpus_per_actor: float,
                       predictor_kwargs: dict[str, Any]) -> ray.data.Dataset:
    """Recordings -> batch rows -> :class:`KeyedBatchPredictor` on a fixed pool of ``actors`` (lazy Dataset).

    ``predictor_kwargs`` are the actor constructor's (paths and settings only: no key, no tensors).
    """
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    return ds.map_batches(KeyedBatchPredictor, batch_size=1, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                          num_gpus=gpus_per_actor or None, fn_constructor_kwargs=predictor_kwargs)


def replay_on_ray(paths: list[str], key_file: str, checkpoint: str, out: str | None = None, batch_size: int = 64,
                  actors: int = 2, mode: str = "fused", ray_address: str | None = None, progress: bool = True,
                  device: str = "auto", cpus_per_actor: float | None = None, gpus_per_actor: float = 0.0,
                  block_bytes: int = 256 << 10) -> dict[str, Any]:
    """Replay recordings through the keyed classifier on a Ray actor pool; predictions equal the local replay's.

    Args:
        paths: recordings, folders of ``*.mcap`` or globs (expanded, sorted, deduplicated).
        key_file: key file path; read by the driver (fingerprint check) and by every actor, never shipped.
        checkpoint: plain model checkpoint path (must exist at this path on every node).
        out: predictions file, .jsonl, .csv or .parquet (columns: recording, frame_index, label, pred,
            confidence; recording order, then file order), or None.
        batch_size: frames per model batch, cut per recording exactly as the local replay cuts them.
        actors: model actors in the fixed pool.
        mode: keyed network mode, "fused" or "fast".
        ray_address: existing cluster (``ray.init(address=...)``), e.g. ``auto`` or ``ray://head:10001``;
            None starts a local Ray unless one is already initialised.
        progress: show a progress bar (frames, accuracy).
        device: "auto", "cpu" or "cuda" inside each actor.
        cpus_per_actor: logical CPUs (and torch threads, rounded) per actor; default: the cluster's CPUs
            shared among the actors, keeping room for one read task.
        gpus_per_actor: GPUs per actor (e.g. 1, or 0.5 to pack two actors on one GPU).
        block_bytes: target size of one dataset block, whole batches only (at least one batch). A block goes to
            one actor, so small blocks balance the pool; the default gives 1-2 batches of 64 small frames.

    Returns:
        the local replay's summary fields over all recordings (frames, labelled, accuracy, wall_s, frames_per_s,
        replay_report, error, interrupted, predictions) plus ``recordings`` (per recording: fingerprint
        check, scheme, rotation, frames, accuracy, replay_report, error) and ``ray`` (version, cluster, actors).
    """
    if actors < 1:
        raise ConfigError("replay", "actors", ">= 1", actors)
    if batch_size < 1:
        raise ConfigError("replay", "batch_size", ">= 1", batch_size)
    ModelSection(checkpoint, mode, device)  # validates mode and device as the local config does
    key = load_key(key_file)
    headers = [scan_header(p, i) for i, p in enumerate(expand_recordings(list(paths)))]
    check_fingerprints(headers, key, key_file)
    started = ensure_ray(ray_address)
    try:
        cpus = share_cpus(actors, READ_CPUS, cpus_per_actor)
        threads = max(1, round(cpus))
        expected = [h.expected_frames for h in headers]
        writer = PredictionWriter(out, "recording", None if None in expected else sum(expected), progress)
        sink = ReorderingSink(headers, writer)
        t0 = time.perf_counter()
        err, interrupted = None, False
        try:
            with DataContextFor(block_bytes):
                ds = prediction_dataset(RecordingDatasource(headers, batch_size, block_bytes), actors, cpus,
                                        gpus_per_actor, {"key_file": str(key_file), "checkpoint": str(checkpoint),
                                                         "mode": mode, "device": device, "threads": threads})
                for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in table.to_pylist():
                        sink.add(row)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # noqa: BLE001 - reported in the summary like a local stage error
            err = error_text(exc)
        finally:
            writer.close()
        wall = time.perf_counter() - t0
        per = sink.recording_summaries()
        return _replay_summary(per, writer, sink, wall, t0, err, interrupted, key, checkpoint, mode, batch_size,
                               ray_info(ray_address, actors=actors, cpus_per_actor=cpus, threads_per_actor=threads,
                                        gpus_per_actor=gpus_per_actor))
    finally:
        if started:
            ray.shutdown()


def _replay_summary(per: list[dict[str, Any]], writer: PredictionWriter, sink: ReorderingSink, wall: float,
                    t0: float, err: str | None, interrupted: bool, key: Key, checkpoint: str, mode: str,
                    batch_size: int, info: dict[str, Any]) -> dict[str, Any]:
    errors = [f"{r['recording']}: {r['error']}" for r in per if r["error"] and r["error"] != "not finished"]
    if not err and not errors and not interrupted and any(r["error"] for r in per):
        errors = ["the Ray job ended before every recording finished"]
    schemes = {(r["scheme"], r["rotation"]) for r in per}
    devices = sorted({r["device"] for r in per if r["device"]})
    summary = {"job": "replay", "engine": "ray", "recordings": per,
               "scheme": next(iter(schemes))[0] if len(schemes) == 1 else None,
               "rotation": next(iter(schemes))[1] if len(schemes) == 1 else None,
               "mode": mode, "device": ",".join(devices) or None, "key_fingerprint": key.fingerprint,
               "checkpoint": str(checkpoint), "batch_size": batch_size, "replay_report": merge_reports(per),
               "frames": writer.count, "labelled": writer.labelled, "accuracy": writer.accuracy,
               "wall_s": round(wall, 3), "frames_per_s": round(writer.count / wall, 2) if wall > 0 else None,
               "first_prediction_s": None if sink.first_output_s is None else round(sink.first_output_s - t0, 3),
               "interrupted": interrupted, "error": err or ("; ".join(errors) if errors else None), "ray": info}
    if writer.path is not None:
        summary["predictions"] = str(writer.path)
    return summary


# -- live cameras -------------------------------------------------------------------------------------------
def camera_shards(n: int, cameras: int, batch_size: int, offset: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, stop) item ranges, one per camera, each a multiple of ``batch_size`` long (the last may
    be shorter, trailing cameras may get none), so each camera's batches are the local run's batches."""
    per = math.ceil(math.ceil(n / batch_size) / cameras) * batch_size
    return [(offset + min(i * per, n), offset + min((i + 1) * per, n)) for i in range(cameras)]


def frame_format(cfg: RunConfig, sensor_cfg: SensorConfig, height: int, width: int) -> FrameFormat:
    return FrameFormat(cfg.key.scheme, cfg.key.rotation, height, width, sensor_cfg.black_level_dn, sensor_cfg.max_dn)


def camera_recording_path(record: str, camera: int) -> str:
    """``out.mcap`` -> ``out.cam0.mcap`` for camera 0 (each camera records on its own node)."""
    path = Path(record)
    return str(path.with_name(f"{path.stem}.cam{camera}{path.suffix}"))


def portable_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise a PrivcamError from an actor method as a plain PrivcamError with the same text: subclasses with
    their own constructor (ConfigError) do not survive Ray's pickling and would arrive without their message."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except PrivcamError as err:
            if type(err) is PrivcamError:
                raise
            raise PrivcamError(str(err)) from None
    return wrapper


class CameraStopped(Exception):
    """Raised inside a camera's capture loop when the driver asked it to stop."""


class CameraActor:
    """One simulated camera: its own sensor, frame counter (its shard's item indices) and per-frame rotation.

    Captures with the local capture stage, batches ``batch_size`` frames, puts each batch into the object store
    and its reference into the bounded frame queue (waiting while it is full: backpressure). Runs as a threaded
    actor (``max_concurrency=2``) so :meth:`stop` reaches a camera that waits on the queue; its recording (if
    any) is finalised on every way out, as the local recorder stage is.
    """

    def __init__(self, camera: int, cfg: dict[str, Any], first: int, end: int, frames_q: Queue,
                 threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.camera, self.cfg, self.frames_q = camera, RunConfig.from_dict(cfg, f"camera {camera}"), frames_q
        self.first, self.end = first, end
        self.stats = StageStats(f"camera-{camera}")
        self._stop = threading.Event()

    @portable_errors
    def setup(self) -> str:
        """Load sensor profile, key (from its path) and the shard's scenes; returns the key fingerprint."""
        c = self.cfg
        self.sensor_cfg = SensorConfig.from_yaml(resolve(c.sensor.profile))
        key = load_key(c.key.file)
        self.fingerprint = key.fingerprint
        self.data = load_dataset(c.source.dataset, c.source.split, c.source.data).subset(self.end - self.first,
                                                                                          self.first)
        self.capture = capture_stage(Sensor(self.sensor_cfg, seed=c.sensor.seed), key, c.key.scheme, c.key.rotation)
        return self.fingerprint

    def stop(self) -> None:
        """Ask :meth:`run` to finish after the current frame (recording finalised)."""
        self._stop.set()

    @portable_errors
    def run(self) -> dict[str, Any]:
        """Capture the shard; returns the camera's stage stats (and its recording, when recording)."""
        c = self.cfg
        fmt = asdict(frame_format(c, self.sensor_cfg, *self.data.images.shape[1:3]))
        recorder = None
        if c.output.record:
            recorder = Recorder(camera_recording_path(c.output.record, self.camera), self.sensor_cfg.to_dict(),
                                c.key.scheme, c.key.rotation, self.fingerprint)
        stopped = False
        try:
            self._capture_all(fmt, recorder)
        except CameraStopped:
            stopped = True
        finally:
            if recorder is not None:
                recorder.close()
        result = {"stats": self.stats.to_dict(), "shard": [self.first, self.end], "stopped": stopped}
        if recorder is not None:
            result["recording"] = {"path": str(recorder.path), "frames_written": recorder.frames_written}
        return result

    def _capture_all(self, fmt: dict[str, Any], recorder: Recorder | None) -> None:
        stats, batch = self.stats, []
        for item in scene_items(self.data, self.first):
            if self._stop.is_set():
                raise CameraStopped
            t0 = time.perf_counter()
            frame = self.capture(item)
            if recorder is not None:
                recorder.write(frame)
            stats.busy_s += time.perf_counter() - t0
            stats.items_in += 1
            batch.append(frame)
            if len(batch) == self.cfg.pipeline.batch_size:
                self._put(fmt, batch)
                batch = []
        if batch:
            self._put(fmt, batch)

    def _put(self, fmt: dict[str, Any], frames: list[ProtectedFrame]) -> None:
        item = (self.camera, fmt, [ray.put(frames)])  # the reference travels through the queue, not the pixels
        t0 = time.perf_counter()
        while True:
            try:
                self.frames_q.put(item, timeout=_POLL_S)  # waits while the queue is full
                break
            except Full:
                if self._stop.is_set():
                    raise CameraStopped from None
        self.stats.wait_out_s += time.perf_counter() - t0
        self.stats.items_out += len(frames)


class ModelWorker:
    """One model actor of the live pool: batches from the frame queue -> :class:`KeyedBatchPredictor` -> results."""

    def __init__(self, worker: int, key_file: str, checkpoint: str, mode: str, device: str, threads: int,
                 fmt: dict[str, Any], frames_q: Queue, results_q: Queue) -> None:
        self._args = (key_file, checkpoint, mode, device, threads)
        self.fmt = FrameFormat(**fmt)
        self.frames_q, self.results_q = frames_q, results_q
        self.stats = StageStats(f"model-{worker}")

    @portable_errors
    def setup(self) -> str:
        """Load key and checkpoint from their paths and build the keyed model now (a format or checkpoint error
        surfaces before any frame); returns the device."""
        self.predictor = KeyedBatchPredictor(*self._args)
        self.predictor.classifier(self.fmt)
        return self.predictor.device

    @portable_errors
    def run(self) -> dict[str, Any]:
        """Serve until a None arrives; returns the worker's stage stats."""
        stats = self.stats
        while True:
            t0 = time.perf_counter()
            item = self.frames_q.get()
            stats.wait_in_s += time.perf_counter() - t0
            if item is None:
                return stats.to_dict()
            camera, fmt, (ref,) = item
            frames = ray.get(ref)
            t0 = time.perf_counter()
            preds = self.predictor.classify(FrameFormat(**fmt), frames)
            stats.busy_s += time.perf_counter() - t0
            stats.items_in += len(frames)
            t0 = time.perf_counter()
            self.results_q.put((camera, preds))  # blocks while the driver is behind
            stats.wait_out_s += time.perf_counter() - t0
            stats.items_out += len(frames)


def run_cameras_on_ray(cfg: RunConfig, cameras: int = 2, actors: int = 2, ray_address: str | None = None,
                       progress: bool = True, cpus_per_actor: float | None = None) -> dict[str, Any]:
    """Live many-camera run: ``cameras`` simulated sensors as Ray actors feeding ``actors`` model actors.

    The source items are split into contiguous per-camera shards (multiples of ``cfg.pipeline.batch_size``);
    frame queue and result queue hold ``cfg.pipeline.queue_size`` batches each. Predictions (``camera`` column
    first) go to ``cfg.output.predictions`` (.jsonl, .csv or .parquet) in arrival order; with
    ``cfg.output.record`` each camera writes ``<stem>.cam<i>.mcap`` on its node.

    Args:
        cfg: the local run's configuration (same sections and meaning as ``privcam run``).
        cameras: simulated cameras (Ray actors).
        actors: model actors.
        ray_address: existing cluster address for ``ray.init(address=...)``; None starts or reuses a local Ray.
        progress: show a progress bar.
        cpus_per_actor: logical CPUs per camera and per model actor (default: the cluster's CPUs shared).

    Returns:
        the local run's summary fields (frames, labelled, accuracy, wall_s, frames_per_s, stages, error,
        interrupted, predictions) plus ``cameras``, ``actors``, ``camera_shards``, ``recordings`` and ``ray``.
    """
    if cameras < 1:
        raise ConfigError("run", "cameras", ">= 1", cameras)
    if actors < 1:
        raise ConfigError("run", "actors", ">= 1", actors)
    key = load_key(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    data = load_dataset(cfg.source.dataset, cfg.source.split, cfg.source.data).subset(cfg.source.limit,
                                                                                        cfg.source.offset)
    if len(data) == 0:
        raise ConfigError("source", "limit", "at least one item in the selected range", cfg.source.limit)
    fmt = asdict(frame_format(cfg, sensor_cfg, *data.images.shape[1:3]))
    shards = camera_shards(len(data), cameras, cfg.pipeline.batch_size, cfg.source.offset)
    started = ensure_ray(ray_address)
    try:
        cpus = share_cpus(cameras + actors, 0.0, cpus_per_actor)
        return _serve_cameras(cfg, key, fmt, shards, actors, cpus, len(data), progress,
                              ray_info(ray_address, cameras=cameras, actors=actors, cpus_per_actor=cpus))
    finally:
        if started:
            ray.shutdown()


def _serve_cameras(cfg: RunConfig, key: Key, fmt: dict[str, Any], shards: list[tuple[int, int]], actors: int,
                   cpus: float, total: int, progress: bool, info: dict[str, Any]) -> dict[str, Any]:
    threads = max(1, round(cpus))
    frames_q = Queue(cfg.pipeline.queue_size, actor_options={"num_cpus": 0})
    results_q = Queue(cfg.pipeline.queue_size, actor_options={"num_cpus": 0})
    camera_cls = ray.remote(CameraActor).options(num_cpus=cpus, max_concurrency=2)
    worker_cls = ray.remote(ModelWorker).options(num_cpus=cpus)
    workers = [worker_cls.remote(i, str(cfg.key.file), cfg.model.checkpoint, cfg.model.mode, cfg.model.device,
                                 threads, fmt, frames_q, results_q) for i in range(actors)]
    cams = [camera_cls.remote(i, cfg.to_dict(), first, end, frames_q, threads) for i, (first, end) in
            enumerate(shards)]
    writer = PredictionWriter(cfg.output.predictions, "camera", total, progress)
    err, interrupted, devices, cam_runs, setup_error = None, False, [], {}, None
    cam_results: list[dict[str, Any]] = []
    worker_stats: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        devices = _setup_actors(workers, cams)
        t0 = time.perf_counter()
        cam_runs = {c.run.remote(): i for i, c in enumerate(cams)}
        cam_results, worker_stats = _drive(dict(cam_runs), workers, frames_q, results_q, writer)
    except KeyboardInterrupt:
        interrupted = True
    except SetupError as exc:
        setup_error = exc.cause
    except Exception as exc:  # noqa: BLE001 - reported like a local stage error
        err = error_text(exc)
    finally:
        if err or interrupted:
            cam_results = _stop_cameras(cams, cam_runs, results_q, writer)
        writer.close()
        for handle in [*workers, *cams]:
            ray.kill(handle)
        frames_q.shutdown(force=True)
        results_q.shutdown(force=True)
    if setup_error is not None:
        raise setup_error  # as the local run refuses a bad configuration before any frame
    wall = time.perf_counter() - t0
    summary = {"job": "run", "engine": "ray", "cameras": len(shards), "actors": actors,
               "dataset": cfg.source.dataset, "split": cfg.source.split, "scheme": cfg.key.scheme,
               "rotation": cfg.key.rotation, "mode": cfg.model.mode, "device": ",".join(devices) or None,
               "key_fingerprint": key.fingerprint, "checkpoint": cfg.model.checkpoint,
               "checkpoint_plain_accuracy": read_manifest(cfg.model.checkpoint).get("plain_test_accuracy"),
               "camera_shards": [list(s) for s in shards], "frames": writer.count, "labelled": writer.labelled,
               "accuracy": writer.accuracy, "wall_s": round(wall, 3),
               "frames_per_s": round(writer.count / wall, 2) if wall > 0 else None,
               "stages": [r["stats"] for r in cam_results] + worker_stats, "interrupted": interrupted,
               "error": err, "ray": info}
    recordings = [r["recording"] for r in cam_results if "recording" in r]
    if recordings:
        summary["recordings"] = recordings
    if writer.path is not None:
        summary["predictions"] = str(writer.path)
    return summary


class SetupError(Exception):
    """An actor's setup failed with a PrivcamError (``cause``): refuse the run like the local pipeline does."""

    def __init__(self, cause: PrivcamError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _setup_actors(workers: list, cams: list) -> list[str]:
    """Run every actor's setup; returns the model devices. A PrivcamError in any setup becomes SetupError."""
    try:
        devices = ray.get([w.setup.remote() for w in workers])
        ray.get([c.setup.remote() for c in cams])
    except Exception as exc:  # noqa: BLE001
        cause = innermost(exc)
        if isinstance(cause, PrivcamError):
            raise SetupError(PrivcamError(str(cause))) from None
        raise
    return sorted(set(devices))


def _stop_cameras(cams: list, cam_runs: dict, results_q: Queue, writer: PredictionWriter,
                  grace_s: float = 10.0) -> list[dict[str, Any]]:
    """After an error or Ctrl-C: keep the predictions already made, stop the cameras (recordings finalised)."""
    _drain(results_q, writer)
    for cam in cams:
        cam.stop.remote()
    if not cam_runs:
        return []
    done, _ = ray.wait(list(cam_runs), num_returns=len(cam_runs), timeout=grace_s)
    results = []
    for ref in done:
        try:
            results.append(ray.get(ref))
        except Exception:  # noqa: BLE001 - the first error is already reported
            continue
    return results


def _drain(results_q: Queue, writer: PredictionWriter) -> None:
    """Write whatever predictions already wait in the result queue."""
    while True:
        try:
            camera, preds = results_q.get_nowait()
        except Empty:
            return
        writer.write(camera, preds)


def _drive(cam_refs: dict, workers: list, frames_q: Queue, results_q: Queue,
           writer: PredictionWriter) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drain results while cameras run; then stop the workers with one None each. Raises the first actor error.

    ``cam_refs`` maps each camera's ``run`` reference to its index (entries are removed as cameras finish).
    """
    worker_refs = [w.run.remote() for w in workers]
    cam_results: list[dict[str, Any] | None] = [None] * len(cam_refs)
    stops_left = len(workers)
    while True:
        try:
            camera, preds = results_q.get(timeout=_POLL_S / 2)
            writer.write(camera, preds)
            continue
        except Empty:
            pass
        done, _ = ray.wait(list(cam_refs) + worker_refs, num_returns=len(cam_refs) + len(worker_refs), timeout=0)
        for ref in done:  # an actor that failed raises here
            result = ray.get(ref)
            if ref in cam_refs:
                cam_results[cam_refs.pop(ref)] = result
        if not cam_refs:
            while stops_left:
                try:
                    frames_q.put_nowait(None)
                    stops_left -= 1
                except Full:
                    break
        if not cam_refs and not stops_left and all(r in done for r in worker_refs) and results_q.empty():
            return [r for r in cam_results if r is not None], ray.get(worker_refs)
