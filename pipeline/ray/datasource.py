"""Recordings as a Ray Dataset: header scan, fingerprint check, one read task per recording that
authenticates its frames and streams blocks of whole model batches (see :mod:`pipeline.ray`)."""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    from sensor.errors import PrivcamError as _PrivcamError

    raise _PrivcamError(f"the Ray backend needs the optional extra: pip install 'privcam[ray]' ({_err})") from None


from sensor.config import SensorConfig
from sensor.errors import ConfigError, PrivcamError
from sensor.keys import Key
from sensor.readout import TABLE_FORMAT

from ..stream.authcheck import FrameAuthenticator, session_key
from ..stream.classifier import FrameFormat
from ..stream.recording import (
    RecordingReader,
    check_recording_format,
    check_table_format,
    encode_frame,
    stream_mismatch,
)
from ..stream.run import load_key, make_recording_hint

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


# -- recordings ----------------------------------------------------------------------------------------------
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
    table_format: int | None = TABLE_FORMAT
    recording_format: int | None = None
    session: str | None = None


def scan_header(path: str, index: int = 0) -> RecordingHeader:
    """Metadata (fingerprint, scheme, sensor levels) and the summary's frame count; stops at the first chunk
    once both privcam metadata records are known (a full walk only when they are missing)."""
    with RecordingReader(path, scan_metadata=False) as reader:
        reader.scan_header()
        sensor_cfg = SensorConfig.from_dict(reader.sensor_config() or {}, f"{path} [privcam.sensor]")
        return RecordingHeader(index, str(path), reader.key_fingerprint, reader.scheme, reader.rotation,
                               sensor_cfg.black_level_dn, sensor_cfg.max_dn, reader.summary_message_count(),
                               reader.size_bytes, reader.table_format, reader.recording_format, reader.session)


def expand_recordings(paths: list[str]) -> list[str]:
    """Files as given, folders as their ``*.mcap`` files, globs expanded (``**`` recursive); sorted, deduplicated.

    Raises PrivcamError when nothing matches.
    """
    found: list[str] = []
    for item in paths:
        if any(ch in item for ch in "*?["):
            matches = sorted(m for m in glob.glob(item, recursive=True) if m.endswith(".mcap") and os.path.isfile(m))
            if not matches:
                raise PrivcamError(f"{item}: no .mcap recording matches ({make_recording_hint('PATH.mcap')})")
            found += matches
        elif os.path.isdir(item):
            matches = sorted(str(p) for p in Path(item).glob("*.mcap") if p.is_file())
            if not matches:
                hint = make_recording_hint(os.path.join(item, "NAME.mcap"))
                raise PrivcamError(f"{item}: folder holds no .mcap recording ({hint})")
            found += matches
        elif not os.path.exists(item):
            raise PrivcamError(f"{item}: recording not found ({make_recording_hint(item)})")
        else:
            found.append(item)
    if not found:
        raise PrivcamError("no recordings given")
    return list(dict.fromkeys(found))


def check_fingerprints(headers: list[RecordingHeader], key: Key, key_file: str) -> None:
    """Refuse the whole job, naming every recording made with another key (as a local replay refuses one)."""
    for h in headers:
        if h.recording_format is not None:
            check_recording_format(h.path, h.recording_format)
        if h.table_format is not None:
            check_table_format(h.path, h.table_format)
        if h.session:  # a session key file opens only its own session: refused here, before Ray starts
            session_key(h.path, key, h.session)
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


def read_recording_blocks(header: RecordingHeader, batch_size: int, block_bytes: int,
                          key_file: str) -> Iterator[pa.Table]:
    """Read task body: a recording as blocks of whole batches, then one report row.

    Rows: ``frames`` holds up to ``batch_size`` encoded frames (:func:`~pipeline.stream.recording.encode_frame`),
    cut every ``batch_size`` authentic intact frames from the first, as the local replay batches them. Every
    frame's MAC is checked here, as the local replay checks it (:mod:`pipeline.stream.authcheck`), with the key
    read from ``key_file`` on this worker (only the path travels).
    """
    reader = RecordingReader(header.path)
    try:
        fmt_text, rows, batch, batch_index, rows_per_block = None, [], [], 0, 1
        first, skipped = None, 0
        frames = reader.frames()
        head = next(frames, None)
        auth = None
        if head is not None:
            session = header.session if header.session is not None else head.meta.session
            auth = FrameAuthenticator(load_key(key_file), session, header.path)
            frames = auth.filter(itertools.chain([head], frames))
        for frame in frames:
            if first is None:
                first = frame.meta
            why = stream_mismatch(first, frame.meta, header.key_fingerprint or first.key_fingerprint)
            if why is not None:  # as the local replay: skip a frame of another key or format, report it
                skipped += 1
                if skipped <= 20:
                    reader.report.problems.append(f"skipped {why}")
                continue
            if fmt_text is None:
                m = frame.meta
                fmt_text = _fmt_json(FrameFormat(header.black_level, header.max_dn, m.cfa, m.scheme, m.rotation,
                                                 m.height, m.width))
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
        report = reader.report.to_dict()
        if auth is not None:
            report["authentication"] = auth.report.to_dict()
        error = None if fmt_text is not None else ("no intact frame in the recording" if auth is None
                                                   else "no authentic frame in the recording")
        note = {"kind": "report", "batches": batch_index, "fmt": None if fmt_text is None else json.loads(fmt_text),
                "replay_report": report, "error": error}
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
    ``block_bytes`` holding whole batches, never the whole file, of the frames whose MACs verify under the
    key in ``key_file`` (read by each read task; only the path travels).
    """

    def __init__(self, headers: list[RecordingHeader], batch_size: int, block_bytes: int = 256 << 10, *,
                 key_file: str) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError("replay", "batch_size", ">= 1", batch_size)
        self.headers, self.batch_size, self.block_bytes = list(headers), batch_size, block_bytes
        self.key_file = str(key_file)

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(h.size_bytes for h in self.headers)  # compressed size: a lower bound

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for h in self.headers:
            meta = BlockMetadata(num_rows=None, size_bytes=h.size_bytes, input_files=[h.path], exec_stats=None)
            read = functools.partial(read_recording_blocks, h, self.batch_size, self.block_bytes,
                                     self.key_file)  # one header each
            tasks.append(ReadTask(read, meta, schema=BATCH_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "PrivcamRecording"


