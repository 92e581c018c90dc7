from __future__ import annotations

import numpy as np
import pytest

from pipeline.stream.recording import Recorder, RecordingError, RecordingReader
from sensor.errors import PrivcamError
from sensor.frame import FrameMeta, ProtectedFrame

FP = "0123456789abcdef"


def make_frame(i: int) -> ProtectedFrame:
    data = np.random.default_rng(i).integers(0, 4096, (16, 24), dtype=np.uint16)
    return ProtectedFrame(data, FrameMeta(i, "quad", True, FP, 12, "RGGB", 16, 24, 10_000 + i, i % 10))


@pytest.fixture
def recording(tmp_path):
    path = tmp_path / "rec.mcap"
    with Recorder(path, {"name": "test-sensor", "bit_depth": 12}, "quad", True, FP, chunk_size=4000) as rec:
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
    with pytest.raises(KeyboardInterrupt), Recorder(path, {}, "quad", True, FP) as rec:
        rec.write(make_frame(0))
        rec.write(make_frame(1))
        raise KeyboardInterrupt
    reader = RecordingReader(path)
    assert [f.meta.frame_index for f in reader.frames()] == [0, 1]
    assert reader.report.expected_frames == 2
