"""MCAP recordings of protected frames, and a reader that survives damaged files.

Layout (recording format 2, :data:`RECORDING_FORMAT`): zstd-compressed chunks, two channels, one frame =
two messages written back to back with the same MCAP ``sequence`` (frame index mod 2**32) and log time
(the capture time in ns):

* ``/privcam/frame_header`` (schema ``privcam.FrameHeader``, encoding ``jsonschema``, message encoding
  ``json``): the frame's :class:`~sensor.frame.FrameMeta` as compact JSON: session nonce, frame index,
  scheme, rotation, key fingerprint, sizes, capture time, label (null unless recorded with
  ``--store-labels``) and ``mac``, the frame's HMAC-SHA256 tag (:mod:`sensor.frameauth`);
* ``/privcam/frames`` (schema ``foxglove.RawImage``, encoding ``protobuf``: a FileDescriptorSet of
  ``foxglove/RawImage.proto`` and its dependency, as Foxglove registers its schemas), the pixels: width,
  height, ``step`` = 2 * width, ``encoding`` ``mono16`` for a mono sensor or ``bayer_rggb16`` /
  ``bayer_bggr16`` / ``bayer_grbg16`` / ``bayer_gbrg16`` for a colour one (the CFA), ``frame_id``
  ``privcam``, ``data`` the (H, W) samples as little-endian uint16 in keyed slot order (RawImage has no
  ``is_bigendian`` field; 16-bit data is little-endian, as ROS's ``is_bigendian = 0``). Foxglove shows it
  as an image: the keyed permutation makes it look like noise, which is the point.

The header comes first; the reader pairs it with the next image of the same (sequence, log time), so an
image without its header (or a header without its image) counts as a lost frame, never as a frame.
Metadata records: ``privcam.sensor`` (the sensor configuration as YAML) and ``privcam.recording``
(``recording_format``, scheme, rotation, key fingerprint, session nonce, ``labels`` and ``table_format``,
the readout-table derivation, :data:`sensor.readout.TABLE_FORMAT`; a recording without it is format 1).
A reader refuses recordings of another format (:func:`check_recording_format`, format 1 had one
``privcam-frame-v1`` channel and no MACs) and frames whose tables it cannot rebuild
(:func:`check_table_format`). No key material is ever written (the MAC tags are public).

The writer goes through a unique ``<path>.<random>.partial`` (two recorders never share one) and
finalises it on :meth:`Recorder.close`, which also runs on an exception, Ctrl-C or SIGTERM; the
finalised file replaces an existing recording only when the run succeeded
(:class:`sensor.atomic.StagedOutput`), so a recording is either finalised or clearly partial.

The reader walks the records itself: a chunk whose CRC or compression is broken is skipped
(and counted, using the image channel's message index after it), a corrupted length field or opcode
triggers a search for the next intact chunk or metadata record, damaged metadata is skipped, and a
truncated tail ends the walk. A file without its footer (truncated, or left by ``kill -9``) is reported as
not finalised, with the number of frames recovered. It never raises on damage; it reports how many
frames were lost and why. Only regular files are opened (a pipe or device is refused). The reader does
not check MACs (it holds no key): the replay does (:mod:`pipeline.stream.authcheck`).
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
from google.protobuf.descriptor_pb2 import FileDescriptorSet
from google.protobuf.message import DecodeError
from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, Message, MessageIndex, Metadata, Statistics
from mcap.stream_reader import breakup_chunk
from mcap.writer import CompressionType, Writer

from sensor.atomic import StagedOutput
from sensor.configio import load_yaml
from sensor.errors import InputFileError, PrivcamError
from sensor.frame import FrameMeta, ProtectedFrame
from sensor.readout import TABLE_FORMAT
from sensor.safeio import open_regular

RECORDING_FORMAT = 2
TOPIC = "/privcam/frames"
HEADER_TOPIC = "/privcam/frame_header"
SCHEMA_NAME = RawImage.DESCRIPTOR.full_name  # "foxglove.RawImage"
HEADER_SCHEMA_NAME = "privcam.FrameHeader"
FRAME_ID = "privcam"
#: RawImage encoding of each sensor CFA (16-bit samples, little-endian).
IMAGE_ENCODINGS = {"mono": "mono16", "RGGB": "bayer_rggb16", "BGGR": "bayer_bggr16", "GRBG": "bayer_grbg16",
                   "GBRG": "bayer_gbrg16"}
# Channel ids as the Recorder registers them (the header's first); the reader prefers the channel records.
HEADER_CHANNEL_ID, IMAGE_CHANNEL_ID = 1, 2
V1_ENCODING = "privcam-frame-v1"
MAGIC = b"\x89MCAP0\r\n"
_FOOTER_BYTES = 1 + 8 + 20  # opcode, length, summary_start + summary_offset_start + summary_crc
_HEADER_SCHEMA = json.dumps({
    "title": HEADER_SCHEMA_NAME, "type": "object",
    "description": "privcam FrameMeta of the /privcam/frames image with the same sequence and log time; mac: "
                   "HMAC-SHA256 over this header (without mac) and the pixels",
    "properties": {"frame_index": {"type": "integer"}, "scheme": {"type": "string"}, "rotation": {"type": "boolean"},
                   "key_fingerprint": {"type": "string"}, "bit_depth": {"type": "integer"},
                   "cfa": {"type": "string"}, "height": {"type": "integer"}, "width": {"type": "integer"},
                   "capture_time_ns": {"type": "integer"}, "label": {"type": ["integer", "null"]},
                   "session": {"type": "string"}, "mac": {"type": "string"}}}, separators=(",", ":")).encode()


def file_descriptor_set(message_class: Any) -> bytes:
    """The serialized FileDescriptorSet of a protobuf message's file and every file it imports
    (dependencies first): the ``protobuf`` schema data MCAP and Foxglove expect."""
    out, seen = FileDescriptorSet(), set()

    def add(fd: Any) -> None:
        for dep in fd.dependencies:
            if dep.name not in seen:
                seen.add(dep.name)
                add(dep)
        fd.CopyToProto(out.file.add())

    add(message_class.DESCRIPTOR.file)
    return out.SerializeToString()


class RecordingError(PrivcamError):
    """A recording cannot be opened at all (missing, not MCAP)."""


def check_table_format(path: str | os.PathLike, table_format: int) -> None:
    """Refuse a recording whose readout tables this version cannot rebuild, naming both versions."""
    if table_format != TABLE_FORMAT:
        raise RecordingError(
            f"{path}: its frames were read out with table format {table_format} (1: privcam 0.1's keyed hash), "
            f"but this privcam rebuilds format {TABLE_FORMAT} (AES-256-CTR keystreams); replay it with the "
            "privcam that recorded it, or record it again")


def check_recording_format(path: str | os.PathLike, recording_format: int) -> None:
    """Refuse a recording of another layout than this privcam writes, naming both versions."""
    if recording_format != RECORDING_FORMAT:
        raise RecordingError(
            f"{path}: recording format {recording_format}"
            + (" (privcam 0.1: one privcam-frame-v1 channel, no frame MACs)" if recording_format == 1 else "")
            + f", but this privcam reads recording format {RECORDING_FORMAT} (foxglove.RawImage frames with "
            "authenticated headers); replay it with the privcam that recorded it, or record it again")


def image_encoding(cfa: str) -> str:
    """RawImage ``encoding`` of a sensor CFA ("mono" -> "mono16", "RGGB" -> "bayer_rggb16", ...)."""
    try:
        return IMAGE_ENCODINGS[cfa]
    except KeyError:
        raise PrivcamError(f"cfa: expected one of {', '.join(IMAGE_ENCODINGS)}, got {cfa!r:.40}") from None


def encode_header(meta: FrameMeta) -> bytes:
    """The ``/privcam/frame_header`` message: FrameMeta as compact JSON."""
    return json.dumps(meta.to_dict(), separators=(",", ":")).encode()


_DATA_FIELD = RawImage.DESCRIPTOR.fields_by_name["data"].number
_FRAME_ID_FIELD = RawImage(frame_id=FRAME_ID).SerializeToString()  # field 7, after data (6) in field order


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 64:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise DecodeError("varint longer than 10 bytes")


def encode_image(frame: ProtectedFrame) -> bytes:
    """The ``/privcam/frames`` message: a serialized foxglove.RawImage of the (H, W) uint16 slot-order pixels.

    The small fields go through protobuf; ``data`` is written as its field (tag, length, bytes) directly:
    the same bytes protobuf writes (fields in number order), without its copies of a large frame."""
    m = frame.meta
    image = RawImage(width=m.width, height=m.height, encoding=image_encoding(m.cfa), step=2 * m.width)
    image.timestamp.seconds, image.timestamp.nanos = divmod(m.capture_time_ns, 1_000_000_000)
    data = frame.data.astype("<u2", copy=False).tobytes()
    return b"".join((image.SerializeToString(), _varint(_DATA_FIELD << 3 | 2), _varint(len(data)), data,
                     _FRAME_ID_FIELD))


def parse_image(payload: bytes) -> tuple[Any, memoryview]:
    """A RawImage message as (RawImage without ``data``, the ``data`` bytes as a view, not a copy).

    Walks the protobuf wire format (the last ``data`` field wins, as in protobuf); raises DecodeError."""
    view, pos, rest, data = memoryview(payload), 0, [], memoryview(b"")
    while pos < len(payload):
        start = pos
        key, pos = _read_varint(payload, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(payload, pos)
        elif wire == 2:
            length, pos = _read_varint(payload, pos)
            if pos + length > len(payload):
                raise DecodeError(f"field {key >> 3} of {length} bytes runs past the message")
            pos += length
            if key >> 3 == _DATA_FIELD:
                data = view[pos - length:pos]
                continue
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise DecodeError(f"wire type {wire} is not in a RawImage")
        rest.append(view[start:pos])
    if pos != len(payload):
        raise DecodeError("last field runs past the message")
    return RawImage.FromString(b"".join(rest)), data


def decode_header(payload: bytes) -> FrameMeta:
    """Inverse of :func:`encode_header`; raises PrivcamError naming what is wrong."""
    if len(payload) > 1 << 16:
        raise PrivcamError(f"frame header: expected at most 65536 bytes of JSON, got {len(payload)}")
    try:
        return FrameMeta.from_dict(json.loads(payload))
    except (ValueError, TypeError, RecursionError) as err:
        raise PrivcamError(f"frame header: bad JSON: {err}") from None


def decode_image(meta: FrameMeta, payload: bytes) -> ProtectedFrame:
    """The frame of ``meta`` from its RawImage message; raises PrivcamError naming what disagrees."""
    if len(payload) > 4 and payload[4:5] == b"{":
        raise PrivcamError(f"frame {meta.frame_index}: a recording format 1 message (uint32 length + JSON + "
                           f"pixels), not a foxglove.RawImage; this privcam reads recording format {RECORDING_FORMAT}")
    try:
        image, pixels = parse_image(payload)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise PrivcamError(f"frame {meta.frame_index}: damaged foxglove.RawImage message ({err})") from None
    want = (meta.width, meta.height, 2 * meta.width, IMAGE_ENCODINGS.get(meta.cfa), 2 * meta.height * meta.width)
    got = (image.width, image.height, image.step, image.encoding, len(pixels))
    if got != want:
        raise PrivcamError(f"frame {meta.frame_index}: image (width, height, step, encoding, bytes) {got!r:.200} "
                           f"disagrees with its header's {want!r}")
    data = np.frombuffer(pixels, "<u2").reshape(meta.height, meta.width).astype(np.uint16)
    return ProtectedFrame(data, meta)


def encode_frame(frame: ProtectedFrame) -> bytes:
    """One frame as bytes, ``uint32le header length | JSON FrameMeta | H*W uint16le``: the Ray replay's
    transport between read tasks and model actors (not a recording message since format 2)."""
    header = encode_header(frame.meta)
    return struct.pack("<I", len(header)) + header + frame.data.astype("<u2", copy=False).tobytes()


def decode_frame(payload: bytes) -> ProtectedFrame:
    """Inverse of :func:`encode_frame`; raises PrivcamError naming what is wrong."""
    if len(payload) < 4:
        raise PrivcamError("frame message: expected a 4-byte header length")
    (hlen,) = struct.unpack_from("<I", payload)
    if hlen > min(len(payload) - 4, 1 << 16):
        raise PrivcamError(f"frame message: header length {hlen} runs past the message")
    meta = decode_header(payload[4:4 + hlen])
    pixels = payload[4 + hlen:]
    if len(pixels) != 2 * meta.height * meta.width:
        raise PrivcamError(f"frame {meta.frame_index}: expected {2 * meta.height * meta.width} pixel bytes, "
                           f"got {len(pixels)}")
    data = np.frombuffer(pixels, "<u2").reshape(meta.height, meta.width).astype(np.uint16)
    return ProtectedFrame(data, meta)


def _stream(m: FrameMeta) -> str:
    return f"{m.scheme}/{'rotating' if m.rotation else 'static'} {m.width}x{m.height} {m.bit_depth}-bit {m.cfa}"


def stream_mismatch(first: FrameMeta, meta: FrameMeta, fingerprint: str) -> str | None:
    """Why a frame cannot join the stream that ``first`` started (None when it can)."""
    if meta.key_fingerprint != fingerprint:
        return f"frame {meta.frame_index}: protected with key {meta.key_fingerprint}, not {fingerprint}"
    mine = (meta.scheme, meta.rotation, meta.height, meta.width, meta.bit_depth, meta.cfa)
    theirs = (first.scheme, first.rotation, first.height, first.width, first.bit_depth, first.cfa)
    if mine != theirs:
        return f"frame {meta.frame_index}: {_stream(meta)} differs from the stream's {_stream(first)}"
    return None


class Recorder:
    """Streaming MCAP writer of protected frames. Use as a context manager.

    Frames go to :attr:`partial` (``<path>.<random>.partial``); :meth:`close` finalises it and places it
    (see :class:`sensor.atomic.StagedOutput`): :attr:`final_path` is where the recording ended up and
    :attr:`note` says why when that is not ``path``.
    """

    def __init__(self, path: str | os.PathLike, sensor_config: dict[str, Any], scheme: str, rotation: bool,
                 key_fingerprint: str, chunk_size: int = 256 << 10, session: str = "",
                 store_labels: bool = False) -> None:
        self.path = Path(path)
        self.session, self.store_labels = session, store_labels
        self._out = StagedOutput(self.path)
        self.partial = self._out.path
        self.key_fingerprint = key_fingerprint
        self.frames_written = 0
        self.final_path: Path | None = None
        self.note: str | None = None
        self._closed = False
        try:
            self._fh = open(self.partial, "wb")  # noqa: SIM115 - closed in close()
            self._writer = Writer(self._fh, chunk_size=chunk_size, compression=CompressionType.ZSTD)
            self._writer.start(profile="privcam", library="privcam")
            header_schema = self._writer.register_schema(HEADER_SCHEMA_NAME, "jsonschema", _HEADER_SCHEMA)
            self._header_channel = self._writer.register_channel(HEADER_TOPIC, "json", header_schema)
            image_schema = self._writer.register_schema(SCHEMA_NAME, "protobuf", file_descriptor_set(RawImage))
            self._channel = self._writer.register_channel(TOPIC, "protobuf", image_schema)
            if (self._header_channel, self._channel) != (HEADER_CHANNEL_ID, IMAGE_CHANNEL_ID):
                raise PrivcamError(f"mcap writer gave channel ids {self._header_channel, self._channel}, expected "
                                   f"{HEADER_CHANNEL_ID, IMAGE_CHANNEL_ID}")
            self._writer.add_metadata("privcam.sensor", {"yaml": yaml.safe_dump(sensor_config, sort_keys=False)})
            self._writer.add_metadata("privcam.recording", {
                "recording_format": str(RECORDING_FORMAT), "table_format": str(TABLE_FORMAT), "scheme": scheme,
                "rotation": str(bool(rotation)).lower(),
                "key_fingerprint": key_fingerprint, "session": session,
                "labels": str(bool(store_labels)).lower()})
        except BaseException:
            if getattr(self, "_fh", None) is not None:
                self._fh.close()
            self._out.discard()
            self._closed = True
            raise

    def write(self, frame: ProtectedFrame) -> None:
        if frame.meta.key_fingerprint != self.key_fingerprint:
            raise PrivcamError(f"frame {frame.meta.frame_index}: key fingerprint "
                               f"{frame.meta.key_fingerprint} differs from the recording's "
                               f"{self.key_fingerprint}")
        if frame.meta.session != self.session:
            raise PrivcamError(f"frame {frame.meta.frame_index}: from session {frame.meta.session or '(none)'}, not "
                               f"the recording's session {self.session or '(none)'}")
        if frame.meta.label is not None and not self.store_labels:
            raise PrivcamError(f"frame {frame.meta.frame_index}: carries a class label, and labels are recorded only "
                               "when asked for (--store-labels, evaluation only)")
        image = encode_image(frame)
        t, seq = frame.meta.capture_time_ns, frame.meta.frame_index & 0xFFFFFFFF
        self._writer.add_message(self._header_channel, log_time=t, publish_time=t, data=encode_header(frame.meta),
                                 sequence=seq)
        self._writer.add_message(self._channel, log_time=t, publish_time=t, data=image, sequence=seq)
        self.frames_written += 1

    def close(self, ok: bool = True) -> Path | None:
        """Finish the MCAP summary and place the file (see the class docstring). Idempotent.

        ``ok`` is False after a failed or interrupted run: an existing recording at ``path`` is then
        never replaced. Returns :attr:`final_path` (None when nothing was written and the run failed).
        Raises PrivcamError when the file cannot be finalised (e.g. a full disk), naming the .partial
        file that keeps the frames written so far.
        """
        if self._closed:
            return self.final_path
        self._closed = True
        try:
            self._writer.finish()
            self._fh.flush()
        except Exception as err:  # noqa: BLE001 - a full disk, a closed file: report, keep the frames
            with contextlib.suppress(OSError):
                self._fh.close()
            if self.frames_written == 0:
                self._out.discard()
                raise PrivcamError(f"{self.path}: cannot finalise the recording ({type(err).__name__}: {err}); "
                                   "nothing was written") from None
            self.final_path = self.partial
            self.note = (f"{self.path} was not written: cannot finalise the recording ({type(err).__name__}: "
                         f"{err}); the {self.frames_written} frames written are in {self.partial} (not finalised; "
                         "privcam replay reads it)")
            raise PrivcamError(self.note) from None
        self._fh.close()
        self.final_path = self._out.finish(ok, self.frames_written > 0)
        self.note = self._out.note
        return self.final_path

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)


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
    a recording is never read into memory as a whole; only regular files are mapped (a pipe or a
    device such as ``/dev/zero`` is refused without blocking). ``scan_metadata=False`` skips the
    metadata pass (see :meth:`scan_header` for one that stops at the first chunk). Close it when done
    (or use it as a context manager); frames it yielded stay valid.
    """

    def __init__(self, path: str | os.PathLike, scan_metadata: bool = True) -> None:
        self.path = Path(path)
        try:
            fh = open_regular(self.path, "a recording file")
        except InputFileError as err:
            if err.got == "no such file":
                raise RecordingError(f"{self.path}: recording not found") from None
            if err.got == "a folder":
                raise RecordingError(f"{self.path}: expected a recording file, got a folder") from None
            raise RecordingError(f"{self.path}: expected a regular file (a recording), got {err.got}") from None
        try:
            with fh:
                self._data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise RecordingError(f"{self.path}: not an MCAP file (empty)") from None
        except OSError as err:
            raise RecordingError(f"{self.path}: cannot read recording: {err.strerror}") from None
        self.report = ReplayReport()
        self.metadata: dict[str, dict[str, str]] = {}
        self.metadata_problems: list[str] = []
        #: Channel id -> (topic, message encoding), from the channel records seen so far (summary, chunks).
        self.channels: dict[int, tuple[str, str]] = {}
        self._pending: tuple[int, int, bytes] | None = None  # (sequence, log_time, header payload)
        self._lost_since_header = False
        self._start_problem: str | None = None
        head = self._data[:len(MAGIC)]
        if head != MAGIC:
            # One or two damaged bytes of an MCAP file: resume at the first intact record. Anything else
            # (a different file, or nothing recognisable after it) is not a recording.
            close_enough = len(head) == len(MAGIC) and sum(a == b for a, b in zip(head, MAGIC, strict=True)) >= 6
            if not close_enough or self._next_record(len(MAGIC)) is None:
                self._data.close()
                raise RecordingError(f"{self.path}: not an MCAP file (bad magic bytes)")
            self._start_problem = "damaged magic bytes at the start of the file"
        n, tail = len(self._data), _FOOTER_BYTES + len(MAGIC)
        #: The recorder finished the file: a footer record and the closing magic bytes are at its end.
        self.finalised = n >= len(MAGIC) + tail and self._data[n - len(MAGIC):] == MAGIC and \
            self._data[n - tail] == Opcode.FOOTER
        if scan_metadata:
            self._scan_metadata()

    @property
    def size_bytes(self) -> int:
        return len(self._data)

    @property
    def is_partial(self) -> bool:
        """True for a ``.partial`` file: a recording that was never placed (interrupted, killed, or kept
        beside an existing recording after a failed run)."""
        return self.path.name.endswith(".partial")

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
            if opcode == Opcode.CHANNEL:
                self._add_channel(data[pos + 9:pos + 9 + length])
            elif opcode == Opcode.STATISTICS:
                stats = self._parse(Statistics, data[pos + 9:pos + 9 + length])
                return None if stats is None else self._frame_count(stats)
            pos += 9 + length
        return None

    def _frame_count(self, stats: Statistics) -> int:
        """Frames in a recording's statistics: the image channel's message count."""
        return stats.channel_message_counts.get(self.image_channel, 0)

    def _add_channel(self, body: bytes) -> None:
        channel = self._parse(Channel, body)
        if channel is not None:
            self.channels[channel.id] = (channel.topic, channel.message_encoding)

    def _channel_id(self, topic: str, default: int) -> int:
        """The id of ``topic``'s format-2 channel: from the channel records seen (-1 when they name none), the
        Recorder's fixed id when no channel record survived."""
        if not self.channels:
            return default
        return next((i for i, (t, enc) in self.channels.items() if t == topic and enc != V1_ENCODING), -1)

    @property
    def image_channel(self) -> int:
        """Id of the ``/privcam/frames`` channel."""
        return self._channel_id(TOPIC, IMAGE_CHANNEL_ID)

    @property
    def header_channel(self) -> int:
        """Id of the ``/privcam/frame_header`` channel."""
        return self._channel_id(HEADER_TOPIC, HEADER_CHANNEL_ID)

    def scan_header(self) -> None:
        """Read the metadata records, stopping at the first chunk once both privcam records are known
        (a full walk only when they are missing)."""
        for opcode, body, pos in self._records(collect_problems=False):
            if opcode == Opcode.METADATA:
                self._add_metadata(body, pos)
            elif opcode in (Opcode.CHUNK, Opcode.MESSAGE) and {"privcam.sensor", "privcam.recording"} <= set(
                    self.metadata):
                break

    # -- metadata ---------------------------------------------------------------------------------
    @staticmethod
    def _parse(record_type: Any, body: bytes) -> Any:
        """A record parsed from its body, or None when the body is damaged."""
        try:
            return record_type.read(ReadDataStream(io.BytesIO(body)))
        except Exception:  # noqa: BLE001 - EndOfFile, struct.error, UnicodeDecodeError, ...
            return None

    def _add_metadata(self, body: bytes, pos: int) -> None:
        record = self._parse(Metadata, body)
        if record is None or not isinstance(record.metadata, dict):
            self._metadata_problem(f"damaged metadata record at byte {pos} skipped")
            return
        self.metadata[record.name] = dict(record.metadata)

    def _metadata_problem(self, text: str) -> None:
        if text not in self.metadata_problems:
            self.metadata_problems.append(text)

    def _scan_metadata(self) -> None:
        for opcode, body, pos in self._records(collect_problems=False):
            if opcode == Opcode.METADATA:
                self._add_metadata(body, pos)
            elif opcode == Opcode.CHANNEL:
                self._add_channel(body)
            elif opcode == Opcode.STATISTICS:
                stats = self._parse(Statistics, body)
                if stats is not None:
                    self.report.expected_frames = self._frame_count(stats)

    @property
    def key_fingerprint(self) -> str | None:
        return self.metadata.get("privcam.recording", {}).get("key_fingerprint")

    @property
    def recording_format(self) -> int | None:
        """The recording layout: 1 when the recording predates format 2 (no ``recording_format`` in its
        ``privcam.recording`` record, or a ``privcam-frame-v1`` channel), None when that record is missing
        or damaged and no channel record tells."""
        version = self._version("recording_format")
        if version is None and any(enc == V1_ENCODING for _, enc in self.channels.values()):
            return 1
        return version

    @property
    def table_format(self) -> int | None:
        """The readout-table derivation the frames were protected with: 1 when the recording predates it,
        None when the ``privcam.recording`` record is missing or damaged."""
        return self._version("table_format")

    def _version(self, name: str) -> int | None:
        """A version field of the ``privcam.recording`` record: 1 when absent (older recordings), -1 when
        not a number, None when the record itself is missing or damaged."""
        record = self.metadata.get("privcam.recording")
        if record is None:
            return None
        text = record.get(name, "1")
        return int(text) if text.isdigit() else -1

    @property
    def session(self) -> str | None:
        """The recording's public session nonce (32 hex digits; "" when made under a master key directly),
        None when the ``privcam.recording`` record is missing or damaged."""
        record = self.metadata.get("privcam.recording")
        return None if record is None else record.get("session", "")

    @property
    def scheme(self) -> str | None:
        return self.metadata.get("privcam.recording", {}).get("scheme")

    @property
    def rotation(self) -> bool:
        return self.metadata.get("privcam.recording", {}).get("rotation") == "true"

    def sensor_config(self) -> dict[str, Any] | None:
        """The recorded sensor configuration, or None when it is missing or damaged (then noted in
        :attr:`metadata_problems`)."""
        text = self.metadata.get("privcam.sensor", {}).get("yaml")
        if text is None:
            return None
        try:
            data = load_yaml(text)
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            self._metadata_problem("damaged privcam.sensor metadata (not a YAML mapping) skipped")
            return None
        return data

    # -- records ----------------------------------------------------------------------------------
    def _records(self, collect_problems: bool = True) -> Iterator[tuple[int, bytes, int]]:
        """Top-level (opcode, body, offset) triples, resynchronising on the next intact chunk or metadata
        record after damage."""
        data, end = self._data, len(self._data)
        pos = len(MAGIC)
        if self._start_problem is not None:
            self._problem(collect_problems, self._start_problem)
            pos = self._next_record(len(MAGIC)) or end
        footer_at = end - len(MAGIC) - _FOOTER_BYTES
        prev = None  # start of the last record yielded: a wrong length there is only noticed at the next one
        while pos < end:
            if pos + 9 > end:
                self._problem(collect_problems, f"truncated at byte {pos} (incomplete record header)")
                return
            opcode = data[pos]
            (length,) = struct.unpack_from("<Q", data, pos + 1)
            misplaced_footer = opcode == Opcode.FOOTER and (pos != footer_at or data[end - len(MAGIC):] != MAGIC)
            if opcode not in Opcode._value2member_map_ or pos + 9 + length > end or misplaced_footer:
                nxt = self._next_record(pos + 1 if prev is None else prev + 1)
                if nxt is None:
                    known = opcode in Opcode._value2member_map_ and not misplaced_footer
                    self._problem(collect_problems, f"truncated at byte {pos} (record of {length} bytes runs "
                                  "past the end)" if known else f"corrupted record at byte {pos}")
                    return
                self._problem(collect_problems, f"corrupted record at byte {pos}; resumed at byte {nxt}")
                pos = nxt
                continue
            yield opcode, data[pos + 9:pos + 9 + length], pos
            prev = pos
            if opcode == Opcode.FOOTER:
                return
            pos += 9 + length

    def _next_record(self, start: int) -> int | None:
        """Offset of the next chunk whose body parses and whose CRC checks, or of the next metadata record
        whose body parses exactly, whichever comes first."""
        data = self._data
        candidates = [p for p in (data.find(bytes([Opcode.CHUNK]), start), data.find(bytes([Opcode.METADATA]), start))
                      if p != -1]
        while candidates:
            pos = min(candidates)
            if pos + 9 <= len(data):
                (length,) = struct.unpack_from("<Q", data, pos + 1)
                if 0 < length <= len(data) - pos - 9 and self._intact(data[pos], data[pos + 9:pos + 9 + length]):
                    return pos
            candidates = [p for p in (data.find(bytes([data[pos]]), pos + 1), *[c for c in candidates if c != pos])
                          if p != -1]
        return None

    def _intact(self, opcode: int, body: bytes) -> bool:
        if opcode == Opcode.CHUNK:
            try:
                breakup_chunk(Chunk.read(ReadDataStream(io.BytesIO(body))), validate_crc=True)
                return True
            except Exception:  # noqa: BLE001 - any parse failure means "not a chunk here"
                return False
        stream = ReadDataStream(io.BytesIO(body))
        try:
            record = Metadata.read(stream)
        except Exception:  # noqa: BLE001
            return False
        return stream.count == len(body) and record.name.startswith("privcam.")

    def _problem(self, collect: bool, text: str) -> None:
        if collect:
            self.report.problems.append(text)

    def frames(self) -> Iterator[ProtectedFrame]:
        """Every intact frame (a header paired with its image) in file order; damage is counted in :attr:`report`.

        A frame is lost once: an image lost with a skipped chunk (the image channel's message index after it),
        an image without its header, a header without its image (unless a skipped chunk took the image), or a
        pair that does not decode.
        """
        report = self.report
        report.frames_read, report.frames_lost, report.problems = 0, 0, []
        if self.is_partial:
            report.problems.append(f"{self.path.name} is a .partial file: the recording was not placed by the "
                                   "recorder (interrupted, killed, or kept beside an existing recording)")
        bad_chunk_pending = False
        self._pending, self._lost_since_header = None, False
        seen_indices: list[int] = []
        for opcode, body, pos in self._records():
            if opcode == Opcode.CHUNK:
                try:
                    chunk = Chunk.read(ReadDataStream(io.BytesIO(body)))
                    records = breakup_chunk(chunk, validate_crc=True)
                    bad_chunk_pending = False
                except Exception as err:  # noqa: BLE001 - damage of any kind skips the chunk
                    report.problems.append(f"chunk skipped: {type(err).__name__}")
                    bad_chunk_pending = self._lost_since_header = True
                    continue
                for record in records:
                    if isinstance(record, Message):
                        frame = self._message(record)
                        if frame is not None:
                            seen_indices.append(frame.meta.frame_index)
                            yield frame
                    elif isinstance(record, Channel):
                        self.channels[record.id] = (record.topic, record.message_encoding)
            elif opcode == Opcode.MESSAGE_INDEX and bad_chunk_pending:
                index = self._parse(MessageIndex, body)
                if index is None:
                    report.lost_is_lower_bound = True
                elif index.channel_id == self.image_channel:
                    report.frames_lost += len(index.records)
            elif opcode == Opcode.CHANNEL:
                self._add_channel(body)
            elif opcode == Opcode.MESSAGE:
                try:
                    message = Message.read(ReadDataStream(io.BytesIO(body)), len(body))
                except Exception:  # noqa: BLE001 - its frame is counted when its partner finds none
                    report.problems.append(f"damaged message record at byte {pos} skipped")
                    continue
                frame = self._message(message)
                if frame is not None:
                    seen_indices.append(frame.meta.frame_index)
                    yield frame
        self._orphan_header()
        if not self.finalised:
            report.problems.append(f"not finalised (no footer or summary: the recorder was interrupted, killed or "
                                   f"the file was cut): {report.frames_read} frames recovered, frames written after "
                                   "the last intact record are lost")
            report.lost_is_lower_bound = True
        for text in self.metadata_problems:
            if text not in report.problems:
                report.problems.append(text)
        self._finish_count(seen_indices)

    def _message(self, message: Message) -> ProtectedFrame | None:
        """Pair a header with the image after it; returns the frame when ``message`` completes one."""
        channel = message.channel_id
        if channel == self.header_channel:
            self._orphan_header()
            self._pending = (message.sequence, message.log_time, message.data)
            self._lost_since_header = False
            return None
        if channel != self.image_channel:
            topic, encoding = self.channels.get(channel, (f"channel {channel}", ""))
            if encoding == V1_ENCODING:
                self.report.problems.append(f"frame skipped: a recording format 1 message (this privcam reads "
                                            f"format {RECORDING_FORMAT})")
                self.report.frames_lost += 1
            else:
                self.report.problems.append(f"message on unknown channel {topic!r:.60} skipped")
            return None
        pending, self._pending = self._pending, None
        if pending is None or pending[:2] != (message.sequence, message.log_time):
            if pending is not None:
                self._pending = pending
                self._orphan_header()
            self.report.problems.append(f"frame image (sequence {message.sequence}, log time {message.log_time}) "
                                        "without its header skipped")
            self.report.frames_lost += 1
            return None
        try:
            frame = decode_image(decode_header(pending[2]), message.data)
        except PrivcamError as err:
            self.report.problems.append(f"frame skipped: {err}")
            self.report.frames_lost += 1
            return None
        self.report.frames_read += 1
        return frame

    def _orphan_header(self) -> None:
        """The pending header never met its image: a lost frame, unless a skipped chunk took (and counted) it."""
        if self._pending is not None and not self._lost_since_header:
            self.report.problems.append(f"frame header (sequence {self._pending[0]}, log time {self._pending[1]}) "
                                        "without its image skipped")
            self.report.frames_lost += 1
        self._pending = None

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
