from __future__ import annotations

import os
import pickle
import stat

import pytest

from pipeline.cli.main import main
from sensor.errors import KeyFileError
from sensor.keys import Key, load_key_file, write_key_file
from tests import reference


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "cam.key"
    assert main(["keygen", "--out", str(path), "--json"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret_hex = path.read_text().strip()
    assert len(secret_hex) == 64
    out = capsys.readouterr()
    assert secret_hex not in out.out + out.err
    key = load_key_file(path)
    assert key.fingerprint in out.out
    assert main(["keygen", "--out", str(path)]) == 2
    assert path.read_text().strip() == secret_hex, "existing key must be untouched"


def test_secret_never_in_repr_or_errors(tmp_path):
    key = write_key_file(tmp_path / "k")
    secret_hex = (tmp_path / "k").read_text().strip()
    for text in (repr(key), str(key), f"{key}", key.fingerprint):
        assert secret_hex not in text and secret_hex[:16] not in text
    with pytest.raises(TypeError):
        pickle.dumps(key)


@pytest.mark.parametrize("content, mode, message", [
    ("ab" * 31, 0o600, "64 hex digits"),
    ("zz" * 32, 0o600, "hex digits"),
    ("ab" * 32, 0o644, "mode is 0644"),
    ("ab" * 32, 0o640, "mode is 0640"),
])
def test_bad_key_files(tmp_path, content, mode, message):
    path = tmp_path / "bad.key"
    path.write_text(content + "\n")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match=message) as err:
        load_key_file(path)
    assert "bad.key" in str(err.value)
    assert content not in str(err.value)


def test_insecure_mode_can_be_allowed_with_a_warning(tmp_path):
    path = tmp_path / "shared.key"
    path.write_text("cd" * 32)
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="0644"):
        assert load_key_file(path, allow_insecure_mode=True) == Key(bytes.fromhex("cd" * 32))


def test_missing_and_unreadable_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_key_file(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="regular file"):
        load_key_file(tmp_path)
    binary = tmp_path / "bin.key"
    binary.write_bytes(b"\xff\xfe" * 32)
    os.chmod(binary, 0o600)
    with pytest.raises(KeyFileError, match="bin.key"):
        load_key_file(binary)


def test_subkeys_are_independent_and_deterministic():
    key = Key(bytes(range(32)))
    assert key.subkey("readout/pixel") == Key(bytes(range(32))).subkey("readout/pixel")
    derived = {key.subkey("readout/pixel"), key.subkey("readout/quad"), key.subkey("layer", 0),
               key.subkey("layer", 1), key.subkey("readout/pixel/frame", 0),
               key.subkey("readout/pixel/frame", 1)}
    assert len(derived) == 6
    secret = bytes(range(32))  # the documented HMAC-SHA256 construction, recomputed with hmac
    assert key.subkey("layer", 3) == reference.subkey(secret, "layer", 3)
    assert key.subkey("readout/pixel/frame", -1) == reference.subkey(secret, "readout/pixel/frame", -1)
    assert key.fingerprint == reference.fingerprint(secret)
    assert Key(bytes(32)).fingerprint != key.fingerprint


def test_passphrase_kdf_is_stable(tmp_path):
    salt = bytes(range(16))
    a, b = Key.from_passphrase("correct horse", salt), Key.from_passphrase("correct horse", salt)
    assert a == b and a != Key.from_passphrase("correct horse!", salt)
    assert a != Key.from_passphrase("correct horse", bytes(16))  # a per-key salt: same passphrase, other key
    assert a == Key(reference.passphrase_secret("correct horse", salt))  # scrypt with the documented parameters
    write_key_file(tmp_path / "p.key", a)
    assert (tmp_path / "p.key").read_text().strip() == reference.passphrase_secret("correct horse", salt).hex()
    with pytest.raises(KeyFileError, match="passphrase"):
        Key.from_passphrase("", salt)
    with pytest.raises(KeyFileError, match="salt"):
        Key.from_passphrase("correct horse", b"short")


def test_a_session_key_opens_its_session_and_no_other(tmp_path):
    master = Key(bytes(range(32)))
    a, b = bytes(16), bytes(15) + b"\x01"
    session = master.for_session(a)
    assert session.session == a.hex() and session.fingerprint == master.fingerprint and session != master
    assert session.subkey("readout/pixel/frame", 3) == reference.subkey(reference.session_secret(bytes(range(32)), a),
                                                                       "readout/pixel/frame", 3)
    assert session.for_session(a) is session
    with pytest.raises(KeyFileError, match=f"opens session {a.hex()} only, not session {b.hex()}"):
        session.for_session(b)
    write_key_file(tmp_path / "s.key", session)
    text = (tmp_path / "s.key").read_text()
    assert bytes(range(32)).hex() not in text, "a session key file never holds the master secret"
    loaded = load_key_file(tmp_path / "s.key")
    assert loaded == session and loaded.session == a.hex() and loaded.fingerprint == master.fingerprint
    with pytest.raises(KeyFileError, match="opens session"):
        loaded.for_session(b)
    with pytest.raises(KeyFileError, match="session nonce"):
        master.for_session(b"short")
    assert a.hex() in repr(session) and bytes(range(32)).hex() not in repr(session)


def test_a_damaged_session_key_file_is_refused_by_name(tmp_path):
    path = tmp_path / "s.key"
    write_key_file(path, Key(bytes(range(32))).for_session(bytes(16)))
    lines = path.read_text().splitlines()
    path.chmod(0o600)
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # the master line is gone
    with pytest.raises(KeyFileError, match="session key file: expected the lines session, master and secret"):
        load_key_file(path)


def test_a_key_file_owned_by_another_user_is_refused(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = tmp_path / "k.key"
    write_key_file(path, Key(bytes(range(32))))
    os.chown(path, 12345, -1)
    with pytest.raises(KeyFileError, match="owned by user id 12345"):
        load_key_file(path)
    with pytest.warns(UserWarning, match="owned by user id 12345"):
        assert load_key_file(path, allow_insecure_mode=True) == Key(bytes(range(32)))
