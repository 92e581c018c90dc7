from __future__ import annotations

import json

import numpy as np
import pytest
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage

from pipeline.stream.recording import (
    RECORDING_FORMAT,
    TOPIC,
    Recorder,
    RecordingError,
    RecordingReader,
    check_recording_format,
    decode_image,
    encode_frame,
    encode_image,
    image_encoding,
)
from sensor.errors import PrivcamError
from sensor.frame import FrameMeta, ProtectedFrame
from tests import recording_edit

FP = "0123456789abcdef"


def make_frame(i: int) -> ProtectedFrame:
    data = np.random.default_rng(i).integers(0, 4096, (16, 24), dtype=np.uint16)
    return ProtectedFrame(data, FrameMeta(i, "quad", True, FP, 12, "RGGB", 16, 24, 10_000 + i, i % 10))


@pytest.fixture
def recording(tmp_path):
    path = tmp_path / "rec.mcap"
    with Recorder(path, {"name": "test-sensor", "bit_depth": 12}, "quad", True, FP, chunk_size=4000,
                  store_labels=True) as rec:
        for i in range(40):
            rec.write(make_frame(i))
    assert not (tmp_path / "rec.mcap.partial").exists()
    return path


def test_round_trip_is_exact_and_carries_metadata(recording):
    reader = RecordingReader(recording)
    frames = list(reader.frames())
    assert [f.meta.frame_index for f in frames] == list(range(40))
    for f in frames:
        want = make_frame(f.meta.frame_index)
        assert np.array_equal(f.data, want.data) and f.meta == want.meta
    assert reader.key_fingerprint == FP and reader.scheme == "quad" and reader.rotation
    assert reader.sensor_config() == {"name": "test-sensor", "bit_depth": 12}
    assert reader.report.frames_lost == 0 and reader.report.problems == []


def test_truncated_recording_replays_intact_frames(recording, tmp_path):
    data = recording.read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: len(data) // 2])
    reader = RecordingReader(cut)
    frames = list(reader.frames())
    assert 5 < len(frames) < 40
    assert [f.meta.frame_index for f in frames] == list(range(len(frames)))
    assert all(np.array_equal(f.data, make_frame(f.meta.frame_index).data) for f in frames)
    assert reader.report.lost_is_lower_bound
    assert any("truncated" in p for p in reader.report.problems)


def test_flipped_bytes_skip_only_the_damaged_chunk(recording, tmp_path):
    data = bytearray(recording.read_bytes())
    for k in range(4):
        data[len(data) // 3 + 5 * k] ^= 0xA5
    bad = tmp_path / "flipped.mcap"
    bad.write_bytes(bytes(data))
    reader = RecordingReader(bad)
    frames = list(reader.frames())
    report = reader.report
    assert 0 < report.frames_lost < 40
    assert report.frames_read + report.frames_lost == 40
    assert len(frames) == report.frames_read
    assert all(np.array_equal(f.data, make_frame(f.meta.frame_index).data) for f in frames)
    assert frames[-1].meta.frame_index == 39, "chunks after the damage are still read"


def top_level_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, opcode) of each top-level MCAP record, walked from the magic."""
    out, pos = [], 8
    while pos + 9 <= len(data):
        out.append((pos, data[pos]))
        pos += 9 + int.from_bytes(data[pos + 1:pos + 9], "little")
    return out


def test_corrupted_length_field_resynchronises(recording, tmp_path):
    data = bytearray(recording.read_bytes())
    chunks = [pos for pos, opcode in top_level_records(bytes(data)) if opcode == 0x06]
    assert len(chunks) > 3
    data[chunks[1] + 5] ^= 0x7F  # a high byte of the second chunk's length: the walk loses sync
    bad = tmp_path / "length.mcap"
    bad.write_bytes(bytes(data))
    reader = RecordingReader(bad)
    frames = list(reader.frames())
    assert frames, "intact chunks after the damage must still be found"
    assert all(np.array_equal(f.data, make_frame(f.meta.frame_index).data) for f in frames)
    assert reader.report.problems
    assert reader.report.frames_lost > 0 and len(frames) + reader.report.frames_lost == 40
    assert frames[-1].meta.frame_index == 39


def test_unreadable_inputs(tmp_path):
    with pytest.raises(RecordingError, match="not found"):
        RecordingReader(tmp_path / "none.mcap")
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"hello world")
    with pytest.raises(RecordingError, match="not an MCAP"):
        RecordingReader(junk)


def test_recorder_refuses_a_frame_from_another_key(tmp_path):
    with Recorder(tmp_path / "r.mcap", {}, "quad", True, FP) as rec:
        meta = FrameMeta(0, "quad", True, "ffff", 12, "RGGB", 2, 2)
        other = ProtectedFrame(np.zeros((2, 2), np.uint16), meta)
        with pytest.raises(PrivcamError, match="fingerprint"):
            rec.write(other)
    assert RecordingReader(tmp_path / "r.mcap").report.expected_frames == 0


def test_interrupted_writer_still_finalises(tmp_path):
    path = tmp_path / "int.mcap"
    with pytest.raises(KeyboardInterrupt), Recorder(path, {}, "quad", True, FP, store_labels=True) as rec:
        rec.write(make_frame(0))
        rec.write(make_frame(1))
        raise KeyboardInterrupt
    reader = RecordingReader(path)
    assert [f.meta.frame_index for f in reader.frames()] == [0, 1]
    assert reader.report.expected_frames == 2


# -- format 2: foxglove.RawImage frames beside their privcam headers --------------------------------------------
def test_frames_are_foxglove_raw_images_beside_their_headers(recording, tmp_path):
    from google.protobuf import descriptor_pool, message_factory
    from google.protobuf.descriptor_pb2 import FileDescriptorSet
    from mcap.reader import make_reader

    with open(recording, "rb") as fh:
        reader = make_reader(fh)
        meta = {m.name: m.metadata for m in reader.iter_metadata()}
        fh.seek(0)
        messages = list(make_reader(fh).iter_messages(log_time_order=False))
    assert meta["privcam.recording"]["recording_format"] == str(RECORDING_FORMAT) == "2"
    assert [ch.topic for _, ch, _ in messages[:2]] == ["/privcam/frame_header", "/privcam/frames"]
    (hs, hc, hm), (schema, channel, message) = messages[:2]
    assert (hs.name, hs.encoding, hc.message_encoding) == ("privcam.FrameHeader", "jsonschema", "json")
    assert (schema.name, schema.encoding, channel.message_encoding) == ("foxglove.RawImage", "protobuf", "protobuf")
    assert (hm.sequence, hm.log_time) == (message.sequence, message.log_time) == (0, 10_000)
    # decode as a generic viewer does: the message class from the schema's FileDescriptorSet alone
    pool = descriptor_pool.DescriptorPool()
    for file in FileDescriptorSet.FromString(schema.data).file:
        pool.Add(file)
    image = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name)).FromString(message.data)
    want = make_frame(0)
    assert (image.width, image.height, image.step, image.encoding) == (24, 16, 48, "bayer_rggb16")
    assert (image.timestamp.seconds, image.timestamp.nanos, image.frame_id) == (0, 10_000, "privcam")
    assert image.data == want.data.astype("<u2").tobytes(), "little-endian uint16 rows, step = 2 * width"
    assert json.loads(hm.data) == want.meta.to_dict()
    assert "is_bigendian" not in [f.name for f in pool.FindMessageTypeByName(schema.name).fields]


@pytest.mark.parametrize(("cfa", "encoding"), [("mono", "mono16"), ("RGGB", "bayer_rggb16"),
                                               ("BGGR", "bayer_bggr16"), ("GRBG", "bayer_grbg16"),
                                               ("GBRG", "bayer_gbrg16")])
def test_image_encoding_names_the_cfa(tmp_path, cfa, encoding):
    data = np.arange(12, dtype=np.uint16).reshape(3, 4) * 4001
    frame = ProtectedFrame(data, FrameMeta(7, "pixel", False, FP, 16, cfa, 3, 4, 5))
    assert RawImage.FromString(encode_image(frame)).encoding == encoding == image_encoding(cfa)
    with Recorder(tmp_path / "c.mcap", {}, "pixel", False, FP) as rec:
        rec.write(frame)
    (back,) = RecordingReader(tmp_path / "c.mcap").frames()
    assert np.array_equal(back.data, data) and back.meta == frame.meta


def write_format_1(path, metadata: bool = True) -> None:
    """A recording as privcam 0.1 wrote it: one privcam-frame-v1 channel, no recording_format."""
    from mcap.writer import Writer

    frame = make_frame(0)
    with open(path, "wb") as fh:
        writer = Writer(fh)
        writer.start(profile="privcam", library="privcam")
        schema = writer.register_schema("privcam.ProtectedFrame", "privcam-frame-v1", b"uint32le header_len; ...")
        channel = writer.register_channel("/privcam/frames", "privcam-frame-v1", schema)
        if metadata:
            writer.add_metadata("privcam.recording", {"table_format": "2", "scheme": "quad", "rotation": "true",
                                                      "key_fingerprint": FP})
        writer.add_message(channel, log_time=1, publish_time=1, data=encode_frame(frame), sequence=0)
        writer.finish()


@pytest.mark.parametrize("metadata", [True, False])
def test_a_format_1_recording_is_refused_naming_both_versions(tmp_path, metadata):
    path = tmp_path / "old.mcap"
    write_format_1(path, metadata)
    reader = RecordingReader(path)
    assert reader.recording_format == 1, "metadata without recording_format, or the v1 channel, says format 1"
    with pytest.raises(RecordingError, match=r"old.mcap: recording format 1 .*this privcam reads recording format 2"):
        check_recording_format(path, reader.recording_format)
    assert list(reader.frames()) == [] and reader.report.frames_lost == 1
    assert any("a recording format 1 message" in p for p in reader.report.problems)


def test_an_image_or_header_without_its_partner_is_a_lost_frame(recording, tmp_path):
    def drop(frames):  # frame 5 loses its header, frame 9 its image; frame 12's image is another frame's
        out = []
        for header, image in frames:
            i = header.header["frame_index"]
            out.append((header,) if i == 9 else (image,) if i == 5 else (header, image))
        return out
    rec = recording_edit.read(recording)
    pairs = drop(rec.pairs())
    rec.items = [item for pair in pairs for item in pair]
    at = {(item.topic, item.sequence): k for k, item in enumerate(rec.items)}
    rec.items[at[(TOPIC, 12)]] = rec.items[at[(TOPIC, 13)]]  # a stray copy of 13's image where 12's was
    reader = RecordingReader(recording_edit.write(tmp_path / "odd.mcap", rec))
    frames = list(reader.frames())
    assert [f.meta.frame_index for f in frames] == [i for i in range(40) if i not in (5, 9, 12)]
    assert all(np.array_equal(f.data, make_frame(f.meta.frame_index).data) for f in frames)
    assert reader.report.frames_read == 37
    assert reader.report.frames_lost == 4, "frames 5, 9 and 12, and the stray image: each a lost frame"
    problems = " ".join(reader.report.problems)
    for text in ("image (sequence 5,", "header (sequence 9,", "header (sequence 12,", "image (sequence 13,"):
        assert text in problems


def test_recorder_refuses_labels_unless_asked(tmp_path):
    with Recorder(tmp_path / "r.mcap", {}, "quad", True, FP) as rec, \
            pytest.raises(PrivcamError, match="frame 3: carries a class label.*--store-labels"):
        rec.write(make_frame(3))


def test_image_bytes_are_protobufs_own_and_damage_is_a_clear_error():
    frame = make_frame(2)
    want = RawImage(frame_id="privcam", width=24, height=16, encoding="bayer_rggb16", step=48,
                    data=frame.data.astype("<u2").tobytes())
    want.timestamp.nanos = 10_002
    payload = encode_image(frame)
    assert payload == want.SerializeToString(), "the direct data field writes protobuf's bytes"
    assert np.array_equal(decode_image(frame.meta, payload).data, frame.data)
    rng = np.random.default_rng(0)
    damaged = [payload[:cut] for cut in (0, 1, 5, 20, len(payload) - 1)]
    for _ in range(200):
        bad = bytearray(payload)
        for at in rng.integers(0, 40, 3):  # the small fields and the data field's tag and length
            bad[at] = rng.integers(0, 256)
        damaged.append(bytes(bad))
    outcomes = set()
    for bad in damaged:
        try:
            back = decode_image(frame.meta, bad)
        except PrivcamError as err:
            outcomes.add("error")
            assert str(err).startswith("frame 2: ")
        else:
            outcomes.add("frame")
            assert back.data.shape == (16, 24)
    assert "error" in outcomes
