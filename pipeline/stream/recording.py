"""MCAP recordings of protected frames, and a reader that survives damaged files.

Layout: one channel ``/privcam/frames`` (schema ``privcam.ProtectedFrame``, encoding
``privcam-frame-v1``), zstd-compressed chunks. Each message is

    uint32 little-endian header length | JSON header (FrameMeta) | H*W uint16 little-endian

and the log time is the capture time in ns. Metadata records: ``privcam.sensor`` (the
sensor configuration as YAML) and ``privcam.recording`` (scheme, rotation, key fingerprint and
``table_format``, the readout-table derivation, :data:`sensor.readout.TABLE_FORMAT`; a recording
without it is format 1). A reader refuses frames whose tables it cannot rebuild (:func:`check_table_format`).
No key material is ever written.

The writer goes through ``<path>.partial`` and renames on :meth:`Recorder.close`, which also
runs on an exception or Ctrl-C, so a recording is either finalised or clearly partial.
The reader walks the records itself: a chunk whose CRC or compression is broken is skipped
(and counted, using the message index after it), a corrupted length field triggers a
search for the next intact chunk, and a truncated tail ends the walk. It never raises on
damage; it reports how many frames were lost and why.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Chunk, Message, MessageIndex, Metadata, Statistics
from mcap.stream_reader import breakup_chunk
from mcap.writer import CompressionType, Writer

from sensor.errors import PrivcamError
from sensor.frame import FrameMeta, ProtectedFrame
from sensor.readout import TABLE_FORMAT

TOPIC = "/privcam/frames"
SCHEMA_NAME = "privcam.ProtectedFrame"
ENCODING = "privcam-frame-v1"
MAGIC = b"\x89MCAP0\r\n"
_FOOTER_BYTES = 1 + 8 + 20  # opcode, length, summary_start + summary_offset_start + summary_crc
_SCHEMA_TEXT = (b"uint32le header_len; json FrameMeta header; uint16le data[height*width] "
                b"(pixels in keyed slot order)")


class RecordingError(PrivcamError):
    """A recording cannot be opened at all (missing, not MCAP)."""


def check_table_format(path: str | os.PathLike, table_format: int) -> None:
    """Refuse a recording whose readout tables this version cannot rebuild, naming both versions."""
    if table_format != TABLE_FORMAT:
        raise RecordingError(
            f"{path}: its frames were read out with table format {table_format} (1: privcam 0.1's keyed hash), "
            f"but this privcam rebuilds format {TABLE_FORMAT} (AES-256-CTR keystreams); replay it with the "
            "privcam that recorded it, or record it again")


def encode_frame(frame: ProtectedFrame) -> bytes:
    header = json.dumps(frame.meta.to_dict(), separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + frame.data.astype("<u2", copy=False).tobytes()


def decode_frame(payload: bytes) -> ProtectedFrame:
    """Inverse of :func:`encode_frame`; raises PrivcamError naming what is wrong."""
    if len(payload) < 4:
        raise PrivcamError("frame message: expected a 4-byte header length")
    (hlen,) = struct.unpack_from("<I", payload)
    try:
        meta = FrameMeta.from_dict(json.loads(payload[4:4 + hlen]))
    except (ValueError, TypeError) as err:
        raise PrivcamError(f"frame message: bad JSON header: {err}") from None
    pixels = payload[4 + hlen:]
    if len(pixels) != 2 * meta.height * meta.width:
        raise PrivcamError(f"frame {meta.frame_index}: expected {2 * meta.height * meta.width} pixel bytes, "
                           f"got {len(pixels)}")
    data = np.frombuffer(pixels, "<u2").reshape(meta.height, meta.width).astype(np.uint16)
    return ProtectedFrame(data, meta)


class Recorder:
    """Streaming MCAP writer of protected frames. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, sensor_config: dict[str, Any], scheme: str, rotation: bool,
                 key_fingerprint: str, chunk_size: int = 256 << 10) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.key_fingerprint = key_fingerprint
        self.frames_written = 0
        self._fh = open(self.partial, "wb")
        self._writer = Writer(self._fh, chunk_size=chunk_size, compression=CompressionType.ZSTD)
        self._writer.start(profile="privcam", library="privcam")
        schema = self._writer.register_schema(SCHEMA_NAME, ENCODING, _SCHEMA_TEXT)
        self._channel = self._writer.register_channel(TOPIC, ENCODING, schema)
        self._writer.add_metadata("privcam.sensor", {"yaml": yaml.safe_dump(sensor_config, sort_keys=False)})
        self._writer.add_metadata("privcam.recording", {"table_format": str(TABLE_FORMAT),
            "scheme": scheme, "rotation": str(bool(rotation)).lower(), "key_fingerprint": key_fingerprint})
        self._closed = False

    def write(self, frame: ProtectedFrame) -> None:
        if frame.meta.key_fingerprint != self.key_fingerprint:
            raise PrivcamError(f"frame {frame.meta.frame_index}: key fingerprint "
                               f"{frame.meta.key_fingerprint} differs from the recording's "
                               f"{self.key_fingerprint}")
        t = frame.meta.capture_time_ns
        self._writer.add_message(self._channel, log_time=t, publish_time=t, data=encode_frame(frame),
                                 sequence=frame.meta.frame_index & 0xFFFFFFFF)
        self.frames_written += 1

    def close(self) -> None:
        """Finish the MCAP summary and move the file into place. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.finish()
        finally:
            self._fh.close()
        os.replace(self.partial, self.path)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReplayReport:
    """What a damaged-file-tolerant read found."""

    frames_read: int = 0
    frames_lost: int = 0
    lost_is_lower_bound: bool = False
    problems: list[str] = field(default_factory=list)
    expected_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"frames_read": self.frames_read, "frames_lost": self.frames_lost,
                "lost_is_lower_bound": self.lost_is_lower_bound, "expected_frames": self.expected_frames,
                "problems": list(self.problems)}


class RecordingReader:
    """Read a recording's metadata and frames. Iterating never raises on damage; see :attr:`report`.

    The file is walked through a read-only memory map (pages are read as the walk reaches them), so
    a recording is never read into memory as a whole. ``scan_metadata=False`` skips the metadata
    pass (see :meth:`scan_header` for one that stops at the first chunk). Close it when done (or use
    it as a context manager); frames it yielded stay valid.
    """

    def __init__(self, path: str | os.PathLike, scan_metadata: bool = True) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise RecordingError(f"{self.path}: expected a regular file (a recording), got a device, "
                                         "pipe or folder")
                self._data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise RecordingError(f"{self.path}: recording not found") from None
        except IsADirectoryError:
            raise RecordingError(f"{self.path}: expected a recording file, got a folder") from None
        except ValueError:  # an empty file cannot be mapped
            raise RecordingError(f"{self.path}: not an MCAP file (empty)") from None
        except OSError as err:
            raise RecordingError(f"{self.path}: cannot read recording: {err.strerror}") from None
        if self._data[:len(MAGIC)] != MAGIC:
            self._data.close()
            raise RecordingError(f"{self.path}: not an MCAP file (bad magic bytes)")
        self.report = ReplayReport()
        self.metadata: dict[str, dict[str, str]] = {}
        if scan_metadata:
            self._scan_metadata()

    @property
    def size_bytes(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._data.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary_message_count(self) -> int | None:
        """Message count from an intact MCAP summary (footer -> Statistics), or None when there is none."""
        data = self._data
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

    def scan_header(self) -> None:
        """Read the metadata records, stopping at the first chunk once both privcam records are known
        (a full walk only when they are missing)."""
        for opcode, body in self._records(collect_problems=False):
            if opcode == Opcode.METADATA:
                record = Metadata.read(ReadDataStream(io.BytesIO(body)))
                self.metadata[record.name] = dict(record.metadata)
            elif opcode in (Opcode.CHUNK, Opcode.MESSAGE) and {"privcam.sensor", "privcam.recording"} <= set(
                    self.metadata):
                break

    # -- metadata ---------------------------------------------------------------------------------
    def _scan_metadata(self) -> None:
        for opcode, body in self._records(collect_problems=False):
            if opcode == Opcode.METADATA:
                record = Metadata.read(ReadDataStream(io.BytesIO(body)))
                self.metadata[record.name] = dict(record.metadata)
            elif opcode == Opcode.STATISTICS:
                stats = Statistics.read(ReadDataStream(io.BytesIO(body)))
                self.report.expected_frames = stats.message_count

    @property
    def key_fingerprint(self) -> str | None:
        return self.metadata.get("privcam.recording", {}).get("key_fingerprint")

    @property
    def table_format(self) -> int:
        """The readout-table derivation the frames were protected with (1 when the recording predates it)."""
        text = self.metadata.get("privcam.recording", {}).get("table_format", "1")
        return int(text) if text.isdigit() else -1

    @property
    def scheme(self) -> str | None:
        return self.metadata.get("privcam.recording", {}).get("scheme")

    @property
    def rotation(self) -> bool:
        return self.metadata.get("privcam.recording", {}).get("rotation") == "true"

    def sensor_config(self) -> dict[str, Any] | None:
        text = self.metadata.get("privcam.sensor", {}).get("yaml")
        return None if text is None else yaml.safe_load(text)

    # -- records ----------------------------------------------------------------------------------
    def _records(self, collect_problems: bool = True) -> Iterator[tuple[int, bytes]]:
        """Top-level (opcode, body) pairs, resynchronising on the next intact chunk after damage."""
        data, pos, end = self._data, len(MAGIC), len(self._data)
        while pos < end:
            if pos + 9 > end:
                self._problem(collect_problems, f"truncated at byte {pos} (incomplete record header)")
                return
            opcode = data[pos]
            (length,) = struct.unpack_from("<Q", data, pos + 1)
            if opcode not in Opcode._value2member_map_ or pos + 9 + length > end:
                nxt = self._next_chunk(pos + 1)
                if nxt is None:
                    known = opcode in Opcode._value2member_map_
                    self._problem(collect_problems, f"truncated at byte {pos} (record of {length} bytes runs "
                                  "past the end)" if known else f"corrupted record at byte {pos}")
                    return
                self._problem(collect_problems, f"corrupted record at byte {pos}; resumed at byte {nxt}")
                pos = nxt
                continue
            yield opcode, data[pos + 9:pos + 9 + length]
            if opcode == Opcode.FOOTER:
                return
            pos += 9 + length

    def _next_chunk(self, start: int) -> int | None:
        """Offset of the next chunk record whose body parses and whose CRC checks."""
        data = self._data
        pos = data.find(bytes([Opcode.CHUNK]), start)
        while pos != -1 and pos + 9 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos + 1)
            if 0 < length <= len(data) - pos - 9:
                try:
                    chunk = Chunk.read(ReadDataStream(io.BytesIO(data[pos + 9:pos + 9 + length])))
                    breakup_chunk(chunk, validate_crc=True)
                    return pos
                except Exception:  # noqa: BLE001 - any parse failure means "not a chunk here"
                    pass
            pos = data.find(bytes([Opcode.CHUNK]), pos + 1)
        return None

    def _problem(self, collect: bool, text: str) -> None:
        if collect:
            self.report.problems.append(text)

    def frames(self) -> Iterator[ProtectedFrame]:
        """Every intact frame in file order; damage is counted in :attr:`report`."""
        report = self.report
        report.frames_read, report.frames_lost, report.problems = 0, 0, []
        bad_chunk_pending = False
        seen_indices: list[int] = []
        for opcode, body in self._records():
            if opcode == Opcode.CHUNK:
                try:
                    chunk = Chunk.read(ReadDataStream(io.BytesIO(body)))
                    records = breakup_chunk(chunk, validate_crc=True)
                    bad_chunk_pending = False
                except Exception as err:  # noqa: BLE001 - damage of any kind skips the chunk
                    report.problems.append(f"chunk skipped: {type(err).__name__}")
                    bad_chunk_pending = True
                    continue
                for record in records:
                    if isinstance(record, Message):
                        frame = self._decode(record.data)
                        if frame is not None:
                            seen_indices.append(frame.meta.frame_index)
                            yield frame
            elif opcode == Opcode.MESSAGE_INDEX and bad_chunk_pending:
                try:
                    index = MessageIndex.read(ReadDataStream(io.BytesIO(body)))
                    report.frames_lost += len(index.records)
                except Exception:  # noqa: BLE001
                    report.lost_is_lower_bound = True
            elif opcode == Opcode.MESSAGE:
                frame = self._decode(Message.read(ReadDataStream(io.BytesIO(body)), len(body)).data)
                if frame is not None:
                    seen_indices.append(frame.meta.frame_index)
                    yield frame
        self._finish_count(seen_indices)

    def _decode(self, payload: bytes) -> ProtectedFrame | None:
        try:
            frame = decode_frame(payload)
        except PrivcamError as err:
            self.report.problems.append(f"frame skipped: {err}")
            self.report.frames_lost += 1
            return None
        self.report.frames_read += 1
        return frame

    def _finish_count(self, seen: list[int]) -> None:
        report = self.report
        if report.expected_frames is not None:
            report.frames_lost = max(report.frames_lost, report.expected_frames - report.frames_read)
            return
        if seen:
            gaps = (max(seen) - min(seen) + 1) - len(set(seen))
            report.frames_lost = max(report.frames_lost, gaps)
        if report.problems:
            report.lost_is_lower_bound = True
