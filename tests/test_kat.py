"""Known-answer tests: every key derivation, readout table and layer order pinned for a public test key,
and a committed recording that must replay to committed predictions.

The vectors live in ``tests/data/kat_v1.json``, the recording in ``tests/data/kat_recording_v1.mcap`` and its
predictions in ``tests/data/kat_predictions_v1.json``. A failure here means a derivation changed: every
existing key file, recording and keyed deployment would silently read differently. If the change is on
purpose, bump ``FORMAT_VERSION`` and regenerate with ``python tests/data/make_kat.py`` (which also
re-records the recording), and say so in the commit.

TEST_KEY_HEX is a public test constant (SHA-256 of a fixed sentence), never a real key; the JSON files hold
nothing derived from any other secret. The values are also checked against ``tests/reference.py`` (the
documented definitions, recomputed without privcam), so the pinned numbers are the documented ones and not
merely whatever the code produced when they were generated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.keyed import keyed, layer_perm
from models.tables import plane_tables_torch
from pipeline.lab.protection import ELE, MONO10, EtC, ReadoutProtection, block_subkey
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.inputs import network_input
from pipeline.stream.recording import RecordingReader, check_table_format
from pipeline.stream.run import RunConfig, replay_recording
from sensor.config import SensorConfig
from sensor.errors import PrivcamError
from sensor.frame import FrameFormat
from sensor.keys import Key, load_key_file, write_key_file
from sensor.readout import SCHEMES, TABLE_FORMAT, readout_permutation, readout_subkey
from sensor.readout_tables import frame_table
from sensor.sensor import Sensor
from tests import reference

FORMAT_VERSION = 4  # 2: AES-256-CTR + Fisher-Yates tables (sensor.readout.TABLE_FORMAT); 3: session keys, frame
#                      MACs, per-key passphrase salt (scrypt n=2**17), recording format 2 (Foxglove RawImage);
#                      4: the sensor's noise draws (ziggurat normals, PTRS from block 1: sensor.noise) change the
#                      pixels of the signed frame and of the recording; no key derivation changed
REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
KAT_FILE = DATA / f"kat_v{FORMAT_VERSION}.json"
RECORDING_FILE = DATA / f"kat_recording_v{FORMAT_VERSION}.mcap"
PREDICTIONS_FILE = DATA / f"kat_predictions_v{FORMAT_VERSION}.json"
V1_RECORDING = DATA / "kat_recording_v1.mcap"  # made by privcam 0.1 (keyed-hash tables): must be refused
V2_RECORDING = DATA / "kat_recording_v2.mcap"  # table format 2, recording format 1 (no sessions, no MACs): refused
REGENERATE = "bump the format version and regenerate with tests/data/make_kat.py"

TEST_KEY_SENTENCE = b"privcam public known-answer test key v1 - never a real key"
TEST_KEY_HEX = "7fd535ea68d4255143b428ec96cd019dc0964cca1ea9ed27bf78de079e03b573"  # sha256(TEST_KEY_SENTENCE)
TEST_PASSPHRASE = "privcam known-answer passphrase v1"
TEST_SALT = bytes.fromhex("00112233445566778899aabbccddeeff")  # public test salt
TEST_NONCE = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")  # public test session nonce
KEY = Key(bytes.fromhex(TEST_KEY_HEX))

FRAME_HW = (8, 12)  # small frame of the readout and block tables
FRAME_INDICES = (0, 5)  # rotated frames pinned next to the static order
WIDE_FRAME_INDEX = 2**40 + 3  # a counter that needs more than 4 bytes
CHECKPOINTS = ("compact_fashion_mnist_pixel", "preresnet20_fashion_mnist_pixel")
CHECKPOINT = REPO / "models" / "weights" / "compact_fashion_mnist_pixel.pt"
MONO_PROFILE = REPO / "configs" / "sensors" / "mono10.yaml"
LOGITS_ATOL = 1e-4
RGGB10 = FrameFormat(64, 1023, "RGGB")

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# What is pinned (also used by tests/data/make_kat.py to write the file)
# ----------------------------------------------------------------------------------------------


def summary(values: Any) -> dict[str, Any]:
    """A table in a few entries: first 8, last 8, about 12 strided, and SHA-256 of the int64 LE bytes."""
    a = np.asarray(values).astype("<i8").reshape(-1)
    stride = max(1, a.size // 12)
    return {"n": int(a.size), "first": a[:8].tolist(), "last": a[-8:].tolist(), "stride": stride,
            "strided": a[::stride].tolist(), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def derivation_labels() -> list[tuple[str, tuple[int, ...]]]:
    """(purpose, counters) of every HMAC subkey the code derives (see sensor/readout.py, models/keyed.py,
    pipeline/protection.py, benchmarks/model.py)."""
    labels: list[tuple[str, tuple[int, ...]]] = []
    for scheme in SCHEMES:
        labels.append((f"readout/{scheme}", ()))
        labels += [(f"readout/{scheme}/frame", (n,)) for n in (*FRAME_INDICES, WIDE_FRAME_INDEX)]
    for name in ("features.0", "features.3", "features.4", "features.7", "features.8", "features.11", "conv1",
                 "layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv1"):
        labels.append((f"layer:{name}", ()))
    for family in ("etc", "ele"):
        for block in (2, 4):
            labels.append((f"{family}/b{block}", ()))
            labels += [(f"{family}/b{block}/frame", (n,)) for n in FRAME_INDICES]
    labels += [("bench/input", ()), ("bench/pool/in", ()), ("bench/pool/out", ())]
    return labels


def label_name(purpose: str, counters: tuple[int, ...]) -> str:
    return " ".join([purpose, *map(str, counters)])


def frame_name(n: int | None) -> str:
    return "static" if n is None else f"frame {n}"


def compute_fingerprint() -> str:
    return KEY.fingerprint


def compute_subkeys() -> dict[str, dict[str, Any]]:
    return {label_name(p, c): {"subkey": KEY.subkey(p, *c).hex()} for p, c in derivation_labels()}


def compute_passphrase(tmp_dir: Path) -> dict[str, str]:
    """The passphrase KDF's 32 bytes, read back from a key file (the public way to see a key's bytes)."""
    key = Key.from_passphrase(TEST_PASSPHRASE, TEST_SALT)
    path = tmp_dir / "passphrase.key"
    write_key_file(path, key)
    return {"passphrase": TEST_PASSPHRASE, "key_hex": path.read_text().strip(), "fingerprint": key.fingerprint,
            "subkey readout/pixel": key.subkey("readout/pixel").hex()}


def compute_session(tmp_dir: Path) -> dict[str, Any]:
    """A session key of the test key: its bytes read back from a session key file, a few of its subkeys,
    a rotated readout table and the MAC of a frame captured under it (its pixels also pin the sensor's
    noise draws, :mod:`sensor.noise`)."""
    session = KEY.for_session(TEST_NONCE)
    path = tmp_dir / "session.key"
    write_key_file(path, session)
    h, w = FRAME_HW
    frame = Sensor(SensorConfig.from_yaml(REPO / "configs" / "sensors" / "mono10.yaml"), seed=3).capture(
        np.full((h, w), 500.0), session, frame_index=5, scheme="pixel", rotation=True, capture_time_ns=1)
    return {"nonce": TEST_NONCE.hex(), "key_file": path.read_text(),
            "subkey readout/pixel/frame 5": session.subkey("readout/pixel/frame", 5).hex(),
            "subkey frame-mac": session.subkey("frame-mac").hex(),
            f"pixel {h}x{w} frame 5": summary(readout_permutation(session, "pixel", h, w, 5).table()),
            "frame 5 header": frame.meta.to_dict(), "frame 5 pixels": summary(frame.data)}


def compute_readout_subkeys() -> dict[str, str]:
    return {f"{scheme} {frame_name(n)}": readout_subkey(KEY, scheme, n).hex()
            for scheme in SCHEMES for n in (None, *FRAME_INDICES, WIDE_FRAME_INDEX)}


def compute_readout_tables() -> dict[str, dict[str, Any]]:
    h, w = FRAME_HW
    out = {}
    for scheme in SCHEMES:
        for n in (None, *FRAME_INDICES):
            perm = readout_permutation(KEY, scheme, h, w, n)
            out[f"{scheme} {h}x{w} {frame_name(n)}"] = summary(perm.table())
            out[f"{scheme} {h}x{w} {frame_name(n)} planes"] = summary(perm.plane_tables())
    return out


def compute_block_subkeys() -> dict[str, str]:
    out = {}
    for family in ("etc", "ele"):
        for block in (2, 4):
            for n in (None, *FRAME_INDICES):
                out[f"{family}/b{block} {frame_name(n)}"] = block_subkey(KEY, f"{family}/b{block}", n).hex()
    return out


def block_stages() -> dict[str, tuple[type, int, FrameFormat]]:
    return {"etc mono b4": (EtC, 4, MONO10), "ele mono b4": (ELE, 4, MONO10), "etc RGGB b2": (EtC, 2, RGGB10),
            "ele RGGB b2": (ELE, 2, RGGB10)}


def compute_block_tables() -> dict[str, dict[str, Any]]:
    h, w = FRAME_HW
    out = {}
    for name, (cls, block, spec) in block_stages().items():
        for n in (None, *FRAME_INDICES):
            table, mask = cls(KEY, block, rotation=n is not None, spec=spec).tables(h, w, [0 if n is None else n])
            out[f"{name} {h}x{w} {frame_name(n)}"] = {"table": summary(table[0]), "mask": summary(mask[0])}
    return out


def compute_layer_perm() -> dict[str, Any]:
    return {"name": "features.0", **summary(layer_perm(KEY, "features.0", 28 * 28))}


def compute_keyed_twin_layers() -> dict[str, dict[str, Any]]:
    """Output order of every keyed layer of the keyed twins of the shipped checkpoints (pins the layer
    names, which layers get a fresh order, and which share their shortcut's)."""
    out = {}
    for name in CHECKPOINTS:
        model, manifest = load_checkpoint(REPO / "models" / "weights" / f"{name}.pt")
        c, h, w = manifest["input_shape"]
        static = readout_permutation(KEY, manifest["scheme"], h, w).plane_tables()
        twin = keyed(model, KEY, (c, h, w), torch.from_numpy(static), mode="fused")
        out[name] = {layer: {"out_hw": list(m.out_hw), **summary(m.out_perm.cpu())}
                     for layer, m in twin.named_modules() if isinstance(getattr(m, "out_perm", None), torch.Tensor)}
    return out


SECTIONS = {
    "fingerprint": lambda tmp: compute_fingerprint(),
    "subkeys": lambda tmp: compute_subkeys(),
    "passphrase": compute_passphrase,
    "session": compute_session,
    "readout_subkeys": lambda tmp: compute_readout_subkeys(),
    "readout_tables": lambda tmp: compute_readout_tables(),
    "block_subkeys": lambda tmp: compute_block_subkeys(),
    "block_tables": lambda tmp: compute_block_tables(),
    "layer_perm": lambda tmp: compute_layer_perm(),
    "keyed_twin_layers": lambda tmp: compute_keyed_twin_layers(),
}


def kat_vectors(tmp_dir: Path) -> dict[str, Any]:
    """The whole known-answer file."""
    return {"format_version": FORMAT_VERSION, "test_key_hex": TEST_KEY_HEX,
            "about": "privcam known-answer vectors for a PUBLIC test key (sha256 of "
                     f"{TEST_KEY_SENTENCE.decode()!r}); regenerate only with tests/data/make_kat.py",
            "frame_hw": list(FRAME_HW), **{name: fn(tmp_dir) for name, fn in SECTIONS.items()}}


def changed_fields(expected: Any, actual: Any, path: str) -> list[str]:
    """Dotted paths where ``actual`` differs from ``expected`` (missing and extra keys included)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if "sha256" in expected and "sha256" in actual:  # a table summary counts as one field
            return [] if expected == actual else [path]
        out = []
        for k in sorted(set(expected) | set(actual), key=str):
            sub = f"{path}[{k}]"
            if k not in expected or k not in actual:
                out.append(f"{sub} ({'new' if k not in expected else 'gone'})")
            else:
                out += changed_fields(expected[k], actual[k], sub)
        return out
    return [] if expected == actual else [path]


def assert_unchanged(expected: Any, actual: Any, section: str) -> None:
    changed = changed_fields(expected, actual, section)
    assert not changed, f"key derivation changed: {', '.join(changed[:12])}" + (
        f" (+{len(changed) - 12} more)" if len(changed) > 12 else "") + f"; {REGENERATE}"


# ----------------------------------------------------------------------------------------------
# The vectors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kat() -> dict[str, Any]:
    return json.loads(KAT_FILE.read_text())


def test_the_file_is_this_format_and_key(kat):
    assert kat["format_version"] == FORMAT_VERSION, f"{KAT_FILE.name}: format version differs; {REGENERATE}"
    assert kat["test_key_hex"] == TEST_KEY_HEX == hashlib.sha256(TEST_KEY_SENTENCE).hexdigest()
    assert kat["frame_hw"] == list(FRAME_HW)
    assert set(SECTIONS) <= set(kat), f"sections missing from {KAT_FILE.name}; {REGENERATE}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_known_answers(kat, section, tmp_path):
    assert_unchanged(kat[section], SECTIONS[section](tmp_path), section)


def test_the_pinned_derivations_are_the_documented_ones(kat):
    """The committed values equal tests/reference.py (hmac, hashlib.scrypt, plain-integer hash and the
    three passes applied literally), so they are the documented definition."""
    secret = bytes.fromhex(TEST_KEY_HEX)
    assert kat["fingerprint"] == reference.fingerprint(secret)
    for purpose, counters in derivation_labels():
        entry = kat["subkeys"][label_name(purpose, counters)]
        assert entry["subkey"] == reference.subkey(secret, purpose, *counters).hex(), (purpose, counters)
    assert kat["passphrase"]["key_hex"] == reference.passphrase_secret(TEST_PASSPHRASE, TEST_SALT).hex()
    passphrase_secret = reference.passphrase_secret(TEST_PASSPHRASE, TEST_SALT)
    assert kat["passphrase"]["fingerprint"] == reference.fingerprint(passphrase_secret)
    session = reference.session_secret(secret, TEST_NONCE)
    assert f"secret {session.hex()}" in kat["session"]["key_file"].splitlines()
    assert kat["session"]["subkey frame-mac"] == reference.subkey(session, "frame-mac").hex()
    h, w = FRAME_HW
    assert kat["session"][f"pixel {h}x{w} frame 5"] == summary(reference.readout_table(session, "pixel", h, w, 5))
    header = kat["session"]["frame 5 header"]
    assert header["session"] == TEST_NONCE.hex() and header["key_fingerprint"] == kat["fingerprint"]
    for scheme in SCHEMES:
        for n in (None, *FRAME_INDICES):
            name = f"{scheme} {h}x{w} {frame_name(n)}"
            assert kat["readout_tables"][name] == summary(reference.readout_table(secret, scheme, h, w, n)), name
            planes = reference.plane_tables(scheme, h, w, reference.readout_subkey(secret, scheme, n))
            assert kat["readout_tables"][f"{name} planes"] == summary(planes), name


def test_every_readout_path_gives_the_pinned_tables(kat):
    """The torch tables (built on the classifier's device) and the protection stage must
    reproduce the same pinned tables as the numba kernels."""
    h, w = FRAME_HW
    for scheme in SCHEMES:
        subkeys = [readout_subkey(KEY, scheme, n) for n in FRAME_INDICES]
        torch_planes = plane_tables_torch(scheme, h, w, subkeys).numpy()
        stage_tables = ReadoutProtection(KEY, scheme, rotation=True).position_tables(h, w, list(FRAME_INDICES))
        for i, n in enumerate(FRAME_INDICES):
            name = f"{scheme} {h}x{w} {frame_name(n)}"
            assert summary(frame_table(scheme, h, w, torch_planes[i])) == kat["readout_tables"][name], name
            assert summary(stage_tables[i]) == kat["readout_tables"][name], name
        static = ReadoutProtection(KEY, scheme).position_tables(h, w, [7])[0]
        assert summary(static) == kat["readout_tables"][f"{scheme} {h}x{w} static"], scheme


def test_the_change_message_names_the_field_and_the_fix():
    with pytest.raises(AssertionError, match=r"key derivation changed: subkeys\[readout/pixel\]\[subkey\]; bump "
                                             r"the format version and regenerate with tests/data/make_kat.py"):
        assert_unchanged({"readout/pixel": {"subkey": "01"}}, {"readout/pixel": {"subkey": "02"}}, "subkeys")


# ----------------------------------------------------------------------------------------------
# The committed recording
# ----------------------------------------------------------------------------------------------


def recording_config(key_file: Path, predictions: Path | None = None) -> RunConfig:
    """The run that made the recording (make_kat.py) and replays it here: the shipped 1000-image
    Fashion-MNIST sample, the mono sensor, a rotating pixel readout, the shipped compact checkpoint."""
    return RunConfig.from_dict({
        "source": {"dataset": "fashion-mnist-sample", "limit": 16},
        "sensor": {"profile": str(MONO_PROFILE), "seed": 0},
        "key": {"file": str(key_file), "scheme": "pixel", "rotation": True},
        "model": {"checkpoint": str(CHECKPOINT), "mode": "fused", "device": "cpu"},
        "pipeline": {"batch_size": 8},
        "output": {"predictions": None if predictions is None else str(predictions), "store_labels": True}}, "kat")


def make_key_file(folder: Path) -> Path:
    """The public test key as a key file (mode 0600, as load_key_file requires)."""
    path = folder / "kat.key"
    write_key_file(path, KEY)
    return path


def recording_session(reader: RecordingReader) -> Key:
    """The session key of the committed recording (the test key's, for the recording's public nonce)."""
    return KEY.for_session(bytes.fromhex(reader.session))


def frame_format(reader: RecordingReader, first) -> FrameFormat:
    cfg = SensorConfig.from_dict(reader.sensor_config(), "recording")
    m = first.meta
    return FrameFormat.from_config(cfg, scheme=m.scheme, rotation=m.rotation, height=m.height, width=m.width)


def recorded_logits(mode: str) -> tuple[list, torch.Tensor]:
    """(frames, logits) of the committed recording through the keyed twin in ``mode``."""
    reader = RecordingReader(RECORDING_FILE)
    frames = list(reader.frames())
    model, _ = load_checkpoint(CHECKPOINT)
    clf = KeyedClassifier(model, recording_session(reader), frame_format(reader, frames[0]), mode=mode, device="cpu")
    return frames, clf.logits(frames).float()


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    return json.loads(PREDICTIONS_FILE.read_text())


def test_the_committed_recording_is_the_one_the_predictions_belong_to(committed):
    assert committed["format_version"] == FORMAT_VERSION
    assert RECORDING_FILE.stat().st_size < 100_000
    digest = hashlib.sha256(RECORDING_FILE.read_bytes()).hexdigest()
    assert digest == committed["recording_sha256"], f"{RECORDING_FILE.name} changed; {REGENERATE}"
    reader = RecordingReader(RECORDING_FILE)
    assert reader.key_fingerprint == KEY.fingerprint == committed["key_fingerprint"]
    assert (reader.scheme, reader.rotation) == ("pixel", True)
    frames = list(reader.frames())
    assert reader.report.frames_lost == 0 and not reader.report.problems
    assert [f.meta.frame_index for f in frames] == [row["frame_index"] for row in committed["frames"]]
    assert [f.meta.label for f in frames] == [row["label"] for row in committed["frames"]]
    assert len(frames) == 16


def test_the_recording_replays_to_the_committed_predictions(committed, tmp_path):
    out = tmp_path / "replay.jsonl"
    summary_ = replay_recording(str(RECORDING_FILE), recording_config(make_key_file(tmp_path), out), progress=False)
    assert summary_["error"] is None and summary_["frames"] == 16, summary_
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["frame_index"], r["label"], r["pred"]) for r in rows]
    want = [(r["frame_index"], r["label"], r["pred"]) for r in committed["frames"]]
    assert got == want, f"replayed predictions differ from {PREDICTIONS_FILE.name}"


@pytest.mark.parametrize("mode", ["fused", "fast"])
def test_the_recording_gives_the_committed_logits(committed, mode):
    frames, logits = recorded_logits(mode)
    want = torch.tensor([row["logits"] for row in committed["frames"]])
    err = float((logits - want).abs().max())
    assert err <= LOGITS_ATOL, f"{mode}: logits differ from {PREDICTIONS_FILE.name} by up to {err:.2e}"
    assert logits.argmax(1).tolist() == [row["pred"] for row in committed["frames"]]


def test_the_committed_logits_are_the_plain_model_on_the_unscrambled_frames(committed):
    """Independent of the keyed network: undo each frame's rotated readout with the key, run the plain model."""
    reader = RecordingReader(RECORDING_FILE)
    frames = list(reader.frames())
    fmt = frame_format(reader, frames[0])
    session = recording_session(reader)
    plain = np.stack([readout_permutation(session, "pixel", fmt.height, fmt.width, f.meta.frame_index).inverse(
        f.data) for f in frames])
    model, _ = load_checkpoint(CHECKPOINT)
    with torch.inference_mode():
        logits = model(network_input(plain, fmt, "pixel"))
    want = torch.tensor([row["logits"] for row in committed["frames"]])
    assert float((logits - want).abs().max()) <= LOGITS_ATOL


def test_the_recording_refuses_another_key(tmp_path):
    other = tmp_path / "other.key"
    write_key_file(other, Key(bytes(32)))
    assert load_key_file(other) != KEY
    with pytest.raises(PrivcamError, match="refusing to replay with the wrong key"):
        replay_recording(str(RECORDING_FILE), recording_config(other), progress=False)


def test_a_recording_of_the_old_table_format_is_refused_by_name(tmp_path):
    assert TABLE_FORMAT == 2
    reader = RecordingReader(V1_RECORDING)
    assert reader.table_format == 1 and reader.key_fingerprint == KEY.fingerprint
    with pytest.raises(PrivcamError, match=r"kat_recording_v1.mcap: recording format 1 .*reads recording format 2"):
        replay_recording(str(V1_RECORDING), recording_config(make_key_file(tmp_path)), progress=False)
    # a recording of the current layout whose tables are of another derivation is refused by its table format
    with pytest.raises(PrivcamError, match=r"old.mcap: its frames were read out with table format 1 .*this privcam "
                                           r"rebuilds format 2"):
        check_table_format("old.mcap", 1)


def test_a_recording_without_sessions_and_macs_is_refused_by_name(tmp_path):
    """privcam 0.2's recordings (table format 2, recording format 1: no session nonce, no frame MACs)."""
    reader = RecordingReader(V2_RECORDING)
    assert reader.table_format == TABLE_FORMAT and reader.key_fingerprint == KEY.fingerprint
    with pytest.raises(PrivcamError, match=r"kat_recording_v2.mcap: recording format 1 .*no frame MACs.*reads "
                                           r"recording format 2"):
        replay_recording(str(V2_RECORDING), recording_config(make_key_file(tmp_path)), progress=False)
