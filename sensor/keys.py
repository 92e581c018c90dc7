"""Secret keys: key files, passphrases, public fingerprints, session keys and purpose-specific subkeys.

A master key is 256 random bits. It is stored as 64 hex characters in a file created with mode
0600 (``privcam keygen``), or derived from a passphrase with scrypt (a random 16-byte salt per
key, n=2**17, r=8, p=1: memory-hard, in Python's standard library through OpenSSL, and at the
OWASP-recommended cost; Argon2id would need another dependency for no gain here).

Key hierarchy. Every capture session (a run, a recording, a camera actor) draws a random 128-bit
session nonce (:func:`new_session_nonce`, public) and works under the session key
``HMAC-SHA256(master, "privcam/session/v1" || nonce)`` (:meth:`Key.for_session`). Everything a
session derives (the readout order, static or per frame, every network layer's order, the frame MAC
key) comes from its session key through HMAC-SHA256 with a purpose label (:meth:`Key.subkey`), so
frame ``n`` of one session and frame ``n`` of another are unrelated, and a session key file
(``privcam keygen --session-of MASTER --nonce N``) opens that one session's frames and no other.

The secret never appears in any repr, log, error message, recording or checkpoint: only the
:attr:`Key.fingerprint` (a public 16-hex-digit identifier of the master key) and the public session
nonce do. The fingerprint is a labelled SHA-256 of the 256-bit secret: useless for guessing a random
key, and for a passphrase key useless without that key's random salt, which stays in the key owner's
hands (so one recording's fingerprint cannot be used to test passphrase guesses for all users).

Key files must be regular files owned by the current user with mode 0600 (``KeyFileError``
otherwise) unless the caller passes ``allow_insecure_mode=True``, which warns instead. Python cannot
wipe a secret from memory: the key's bytes stay in the process until it exits.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import warnings
from pathlib import Path

from .errors import KeyFileError

KEY_BYTES = 32
SALT_BYTES = 16
SESSION_NONCE_BYTES = 16
SCRYPT_N = 2**17
_FINGERPRINT_LABEL = b"privcam/fingerprint/v1"
_SESSION_LABEL = b"privcam/session/v1"
_SESSION_FILE_MAGIC = "privcam-session-key v1"


def new_session_nonce() -> bytes:
    """A fresh random 128-bit session nonce (public; never repeats in practice: 2**-64 after 2**32 sessions)."""
    return secrets.token_bytes(SESSION_NONCE_BYTES)


def new_salt() -> bytes:
    """A fresh random 16-byte passphrase salt, to keep beside the passphrase key's owner (not secret)."""
    return secrets.token_bytes(SALT_BYTES)


def parse_nonce(text: str, what: str = "session nonce") -> bytes:
    """32 hex digits -> 16 bytes; KeyFileError naming ``what`` otherwise."""
    if not isinstance(text, str) or len(text) != 2 * SESSION_NONCE_BYTES:
        raise KeyFileError(f"{what}: expected {2 * SESSION_NONCE_BYTES} hex digits, got {text!r}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{what}: expected hex digits 0-9a-f only, got {text!r}") from None


class Key:
    """A 256-bit secret with derived subkeys: a master key, or the session key of one session
    (:meth:`for_session`). ``repr`` shows the public fingerprint and session nonce only."""

    __slots__ = ("_secret", "_nonce", "_master_fingerprint")

    def __init__(self, secret: bytes, *, session_nonce: bytes | None = None,
                 master_fingerprint: str | None = None) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != KEY_BYTES:
            raise KeyFileError(f"a key must be exactly {KEY_BYTES} bytes")
        if (session_nonce is None) != (master_fingerprint is None):
            raise KeyFileError("a session key needs both its session nonce and its master key's fingerprint")
        if session_nonce is not None and (not isinstance(session_nonce, bytes) or
                                          len(session_nonce) != SESSION_NONCE_BYTES):
            raise KeyFileError(f"session nonce: expected {SESSION_NONCE_BYTES} bytes")
        self._secret = bytes(secret)
        self._nonce = session_nonce
        self._master_fingerprint = master_fingerprint

    @property
    def fingerprint(self) -> str:
        """Public identifier of the master key (a session key reports its master's): 16 hex digits of a
        labelled SHA-256 of the master secret."""
        if self._master_fingerprint is not None:
            return self._master_fingerprint
        return hashlib.sha256(_FINGERPRINT_LABEL + self._secret).hexdigest()[:16]

    @property
    def session_nonce(self) -> bytes | None:
        """The session this key belongs to (None for a master key)."""
        return self._nonce

    @property
    def session(self) -> str:
        """The session nonce as 32 hex digits ("" for a master key): public, stored with every frame."""
        return "" if self._nonce is None else self._nonce.hex()

    def for_session(self, nonce: bytes) -> Key:
        """The session key of ``nonce`` (16 bytes): derived from a master key, or this key itself when it
        is already that session's key. A session key refuses any other session."""
        if not isinstance(nonce, bytes) or len(nonce) != SESSION_NONCE_BYTES:
            raise KeyFileError(f"session nonce: expected {SESSION_NONCE_BYTES} bytes, got {nonce!r:.40}")
        if self._nonce is not None:
            if hmac.compare_digest(self._nonce, nonce):
                return self
            raise KeyFileError(f"this session key opens session {self._nonce.hex()} only, not session "
                               f"{nonce.hex()}; use the master key or that session's key")
        secret = hmac.new(self._secret, _SESSION_LABEL + nonce, hashlib.sha256).digest()
        return Key(secret, session_nonce=nonce, master_fingerprint=self.fingerprint)

    def subkey(self, purpose: str, *counters: int) -> bytes:
        """HMAC-SHA256(secret, purpose || counters): 32 bytes, one per (purpose, counters)."""
        msg = purpose.encode() + b"".join(
            b"\x00" + int(c).to_bytes(8, "little", signed=True) for c in counters
        )
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def __repr__(self) -> str:
        if self._nonce is not None:
            return f"Key(fingerprint={self.fingerprint}, session={self.session})"
        return f"Key(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self._secret, other._secret) and \
            self._nonce == other._nonce

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):  # never pickle a secret into a checkpoint or a task argument
        raise TypeError("Key objects cannot be pickled; pass the key file path instead")

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_passphrase(cls, passphrase: str, salt: bytes) -> Key:
        """scrypt(passphrase, salt, n=2**17, r=8, p=1) -> 32 bytes (about 0.5 s and 128 MiB).

        ``salt``: this key's own random salt (:func:`new_salt`, at least 16 bytes), kept beside whoever
        re-derives the key; a shared salt would let one fingerprint test guesses against every user.
        """
        if not passphrase:
            raise KeyFileError("passphrase: expected a non-empty string")
        if not isinstance(salt, bytes) or len(salt) < SALT_BYTES:
            raise KeyFileError(f"salt: expected at least {SALT_BYTES} random bytes (sensor.keys.new_salt())")
        raw = hashlib.scrypt(passphrase.encode(), salt=salt, n=SCRYPT_N, r=8, p=1, maxmem=256 << 20,
                             dklen=KEY_BYTES)
        return cls(raw)


def key_file_text(key: Key) -> str:
    """A master key: its 64 hex digits. A session key: a magic line, the public session nonce and master
    fingerprint, then its own 64 hex digits (it never holds the master secret)."""
    if key.session_nonce is None:
        return key._secret.hex() + "\n"
    return (f"{_SESSION_FILE_MAGIC}\nsession {key.session}\nmaster {key.fingerprint}\n"
            f"secret {key._secret.hex()}\n")


def parse_key_text(text: str, path: Path) -> Key:
    """Inverse of :func:`key_file_text`; errors name the file and the problem, never the content."""
    lines = text.strip().splitlines()
    if lines and lines[0].strip() == _SESSION_FILE_MAGIC:
        fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
        if set(fields) != {"session", "master", "secret"} or len(lines) != 4:
            raise KeyFileError(f"{path}: session key file: expected the lines session, master and secret")
        nonce = parse_nonce(fields["session"].strip(), f"{path}: session")
        master = fields["master"].strip()
        if len(master) != 16 or any(c not in "0123456789abcdef" for c in master):
            raise KeyFileError(f"{path}: session key file: master: expected 16 hex digits")
        return Key(_hex_secret(fields["secret"].strip(), path), session_nonce=nonce, master_fingerprint=master)
    return Key(_hex_secret(text.strip(), path))


def _hex_secret(text: str, path: Path) -> bytes:
    if len(text) != 2 * KEY_BYTES:
        raise KeyFileError(f"{path}: expected {2 * KEY_BYTES} hex digits, got {len(text)} characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: expected hex digits 0-9a-f only") from None


def write_key_file(path: str | os.PathLike, key: Key | None = None) -> Key:
    """Create ``path`` (mode 0600, refusing to overwrite) holding a new or given key (:func:`key_file_text`).

    On any error while writing, the new file is removed, so a failed keygen can simply be run again.
    """
    key = key or Key.generate()
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: refusing to overwrite an existing key file") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot create key file: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key_file_text(key))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o600)
        _fsync_dir(path.parent)  # the new directory entry too: a crash must not lose the key
    except BaseException as err:  # a full disk or Ctrl-C: leave no empty or partial key file behind
        path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise KeyFileError(f"{path}: cannot write key file: {err.strerror or type(err).__name__}; "
                               "nothing was left behind") from None
        raise
    return key


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a file just created in it survives a crash (where the OS allows it)."""
    try:
        fd = os.open(folder or Path("."), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def load_key_file(path: str | os.PathLike, allow_insecure_mode: bool = False) -> Key:
    """Read a hex key file. Errors name the file and the problem, never the content."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found (create one with privcam keygen)") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read key file: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: expected a regular file")
    if st.st_size > 1024:
        raise KeyFileError(f"{path}: expected {2 * KEY_BYTES} hex digits, got a file of {st.st_size} bytes")
    problems = []
    if st.st_mode & 0o077:
        problems.append(f"{path}: key file mode is {stat.S_IMODE(st.st_mode):04o}, expected 0600 "
                        f"(run: chmod 600 {path})")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        problems.append(f"{path}: key file is owned by user id {st.st_uid}, not by you ({os.getuid()}); "
                        "another account could replace it")
    for msg in problems:
        if not allow_insecure_mode:
            raise KeyFileError(msg)
        warnings.warn(msg, stacklevel=2)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"{path}: cannot read key file: {type(err).__name__}") from None
    return parse_key_text(text, path)
