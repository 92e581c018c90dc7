"""Replay authentication (issue 15, items 1 and 2): every manipulation of a recording is found, by frame
index and kind, separately from damaged chunks; an untouched recording replays as before, all verified.

Manipulated copies are made with the MCAP writer the Recorder uses (tests/recording_edit.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage

from pipeline.cli.main import main
from pipeline.stream.authcheck import FrameAuthenticator
from pipeline.stream.recording import Recorder, RecordingReader
from pipeline.stream.run import replay_recording, run_pipeline
from sensor.frame import FrameMeta, ProtectedFrame
from sensor.frameauth import sign_frame
from sensor.keys import Key, load_key_file
from tests import recording_edit
from tests.hostile_world import make_world, model_args, world_config

MASTER = Key(bytes(range(32)))
S1 = MASTER.for_session(bytes.fromhex("11" * 16))
S2 = MASTER.for_session(bytes.fromhex("22" * 16))
N_FRAMES = 12


def signed(i: int, key: Key, mac: bool = True) -> ProtectedFrame:
    data = np.random.default_rng(i).integers(0, 1024, (6, 8), dtype=np.uint16)
    frame = ProtectedFrame(data, FrameMeta(i, "pixel", False, MASTER.fingerprint, 10, "mono", 6, 8, 1000 + i,
                                           session=key.session))
    return sign_frame(key, frame) if mac else frame


def record(path: Path, key: Key, frames: list[ProtectedFrame] | None = None) -> Path:
    with Recorder(path, {"name": "t"}, "pixel", False, MASTER.fingerprint, chunk_size=2000,
                  session=key.session) as rec:
        for frame in frames if frames is not None else [signed(i, key) for i in range(N_FRAMES)]:
            rec.write(frame)
    return path


@pytest.fixture
def recordings(tmp_path) -> tuple[Path, Path]:
    return record(tmp_path / "s1.mcap", S1), record(tmp_path / "s2.mcap", S2)


def authenticate(path: Path, key: Key = MASTER) -> tuple[list[int], dict]:
    """(indices of the frames that may be classified, the authentication report) of a recording."""
    with RecordingReader(path) as reader:
        auth = FrameAuthenticator(key, reader.session, str(path))
        kept = [f.meta.frame_index for f in auth.filter(reader.frames())]
        assert reader.report.frames_lost == 0 and reader.report.problems == [], "no damage: only manipulation"
    return kept, auth.report.to_dict()


def failures(report: dict) -> dict:
    return {k: report[k] for k in ("tampered", "spliced", "duplicated", "reordered", "unauthenticated") if report[k]}


@pytest.mark.parametrize("key", [MASTER, S1], ids=["master key", "session key"])
def test_an_untouched_recording_verifies_every_frame(recordings, key):
    kept, report = authenticate(recordings[0], key)
    assert kept == list(range(N_FRAMES))
    assert report["verified"] == N_FRAMES and report["failures"] == 0 and failures(report) == {}
    assert report["details"] == []


def test_rewritten_pixels_are_tampered(recordings, tmp_path):
    def edit(frames):
        header, image = frames[4]
        msg = RawImage.FromString(image.data)
        msg.data = bytes([msg.data[0] ^ 1]) + msg.data[1:]  # one bit of one pixel
        frames[4] = (header, image.with_data(msg.SerializeToString()))
        return frames
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "t.mcap", edit))
    assert failures(report) == {"tampered": [4]} and report["failures"] == 1
    assert kept == [i for i in range(N_FRAMES) if i != 4], "a tampered frame is skipped"
    assert report["details"] == ["frame 4: MAC mismatch (header or pixels changed)"]


def test_a_rewritten_index_is_tampered(recordings, tmp_path):
    def edit(frames):
        header, image = frames[5]
        frames[5] = (header.with_header(frame_index=50), image)
        return frames
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "i.mcap", edit))
    assert failures(report) == {"tampered": [50]}, "reported by the index the header claims"
    assert kept == [i for i in range(N_FRAMES) if i != 5]


def test_swapped_frames_are_reordered_and_still_classified(recordings, tmp_path):
    def edit(frames):
        frames[3], frames[4] = frames[4], frames[3]
        return frames
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "r.mcap", edit))
    assert failures(report) == {"reordered": [3]} and report["failures"] == 0
    assert kept == [0, 1, 2, 4, 3, *range(5, N_FRAMES)], "authentic frames are classified in file order"
    assert report["verified"] == N_FRAMES


def test_a_duplicated_frame_is_named_and_skipped(recordings, tmp_path):
    def edit(frames):
        return frames[:6] + [frames[2]] + frames[6:]
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "d.mcap", edit))
    assert failures(report) == {"duplicated": [2]}, "a repeat is a duplicate, not a reordering"
    assert kept == list(range(N_FRAMES)) and report["verified"] == N_FRAMES + 1
    assert report["details"] == [f"frame 2: (session {S1.session}, index 2) seen before"]


def test_a_frame_of_another_session_is_spliced(recordings, tmp_path):
    def edit(frames, donor):
        frames[6] = donor[6]
        return frames
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "s.mcap", edit, donor=recordings[1]))
    assert failures(report) == {"spliced": [6]}
    assert kept == [i for i in range(N_FRAMES) if i != 6]
    assert report["details"] == [f"frame 6: from session {S2.session}, not the recording's {S1.session} (an "
                                 "authentic frame of that session)"]


def test_a_spliced_frame_claiming_this_session_is_still_spliced(recordings, tmp_path):
    def edit(frames, donor):
        header, image = donor[8]
        frames[3] = donor[3]  # met first: its session's key is now known
        frames[8] = (header.with_header(session=S1.session), image)
        return frames
    kept, report = authenticate(recording_edit.rewrite(recordings[0], tmp_path / "s2.mcap", edit, donor=recordings[1]))
    assert failures(report) == {"spliced": [3, 8]}
    assert "frame 8: a frame of session " + S2.session in report["details"][1]
    # with only this session's key, the other session cannot be derived: the rewritten frame is tampered
    kept, report = authenticate(tmp_path / "s2.mcap", S1)
    assert failures(report) == {"spliced": [3], "tampered": [8]}


def test_a_frame_without_a_mac_is_unauthenticated(tmp_path):
    frames = [signed(i, S1, mac=i != 2) for i in range(4)]
    kept, report = authenticate(record(tmp_path / "u.mcap", S1, frames))
    assert failures(report) == {"unauthenticated": [2]} and kept == [0, 1, 3]


def test_damage_is_reported_apart_from_authentication(recordings, tmp_path):
    data = bytearray(recordings[0].read_bytes())
    data[len(data) // 3] ^= 0xA5
    bad = tmp_path / "flipped.mcap"
    bad.write_bytes(bytes(data))
    with RecordingReader(bad) as reader:
        auth = FrameAuthenticator(MASTER, reader.session, str(bad))
        kept = list(auth.filter(reader.frames()))
        assert reader.report.frames_lost > 0 and reader.report.problems
    assert auth.report.failures == 0 and auth.report.verified == len(kept) == N_FRAMES - reader.report.frames_lost


# -- the replay: summary, predictions, exit status ------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return make_world(tmp_path_factory.mktemp("auth_world"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_equals_the_live_run_and_verifies_every_frame(world, tmp_path):
    live = run_pipeline(world_config(world, 16, output={"predictions": str(tmp_path / "live.jsonl"),
                                                        "record": str(tmp_path / "live.mcap")}), progress=False)
    assert live["error"] is None
    summary = replay_recording(str(tmp_path / "live.mcap"),
                               world_config(world, 16, output={"predictions": str(tmp_path / "replay.jsonl")}),
                               progress=False)
    assert summary["error"] is None and summary["frames"] == 16
    auth = summary["replay_report"]["authentication"]
    assert auth["verified"] == 16 and auth["failures"] == 0 and auth["details"] == []
    replayed = rows(tmp_path / "replay.jsonl")
    assert [r["label"] for r in replayed] == [None] * 16, "labels are not recorded unless asked for"
    assert [{**r, "label": None} for r in rows(tmp_path / "live.jsonl")] == replayed, "bit-identical predictions"


def test_replay_skips_and_reports_manipulated_frames_and_exits_3(world, tmp_path, capsys):
    def edit(frames):
        header, image = frames[3]
        msg = RawImage.FromString(image.data)
        msg.data = bytes(len(msg.data))
        frames[3] = (header, image.with_data(msg.SerializeToString()))
        return frames[:10] + [frames[5]] + frames[10:]
    bad = recording_edit.rewrite(world / "rec.mcap", tmp_path / "bad.mcap", edit)
    good = replay_recording(str(world / "rec.mcap"), world_config(world, 24, output={
        "predictions": str(tmp_path / "good.jsonl")}), progress=False)
    code = main(["replay", str(bad), "--key", str(world / "cam.key"), *model_args(world), "--predictions",
                 str(tmp_path / "bad.jsonl"), "--json", "--quiet"])
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 3 == summary["exit_status"] and summary["error"] is None
    auth = summary["replay_report"]["authentication"]
    assert (auth["tampered"], auth["duplicated"], auth["failures"]) == ([3], [5], 2)
    assert summary["replay_report"]["frames_lost"] == 0, "manipulation is not damage"
    assert "2 frames failed authentication and were skipped (tampered [3], duplicated [5]); exit status 3" in err
    assert good["frames"] == 24 and summary["frames"] == 23
    assert rows(tmp_path / "bad.jsonl") == [r for r in rows(tmp_path / "good.jsonl") if r["frame_index"] != 3]


def test_replay_under_the_session_key_file_verifies_too(world, tmp_path):
    with RecordingReader(world / "rec.mcap") as reader:
        session = reader.session
    key = load_key_file(world / "cam.key").for_session(bytes.fromhex(session))
    assert key.session == session and len(session) == 32
    kept, report = authenticate(world / "rec.mcap", key)
    assert report["verified"] == len(kept) == 24 and report["failures"] == 0


def test_the_authenticated_header_is_every_field_but_the_mac_as_sorted_compact_json():
    """Known answer for the MAC's header: FrameMeta.to_dict (a shallow dict, no longer dataclasses.asdict)
    must give the same bytes, or every recorded tag would stop verifying."""
    import dataclasses

    from sensor.frameauth import header_bytes

    meta = FrameMeta(3, "pixel", True, "ab12", 10, "mono", 28, 28, capture_time_ns=5, label=None,
                     session="11" * 16, mac="0" * 64)
    assert meta.to_dict() == dataclasses.asdict(meta)
    assert list(meta.to_dict()) == [f.name for f in dataclasses.fields(FrameMeta)]
    assert header_bytes(meta) == (b'{"bit_depth":10,"capture_time_ns":5,"cfa":"mono","frame_index":3,"height":28,'
                                  b'"key_fingerprint":"ab12","label":null,"rotation":true,"scheme":"pixel",'
                                  b'"session":"' + b"11" * 16 + b'","width":28}')
