"""Secret keys: key files, passphrases, public fingerprints and purpose-specific subkeys.

A key is 256 random bits. It is stored as 64 hex characters in a file created with mode
0600 (``privcam keygen``), or derived from a passphrase with scrypt (salt label
``privcam/passphrase/v1``, n=2**14, r=8, p=1). Everything privcam derives from it goes
through HMAC-SHA256 with a purpose label, so the readout permutation, each network
layer's permutation and each frame's rotation are independent subkeys.

The secret never appears in any repr, log, error message, recording or checkpoint: only
the :attr:`Key.fingerprint` (a public 16-hex-digit identifier) does.

Group- or world-readable key files are refused (``KeyFileError``) unless the caller
passes ``allow_insecure_mode=True``, in which case a warning is emitted instead.
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
PASSPHRASE_SALT = b"privcam/passphrase/v1"
_FINGERPRINT_LABEL = b"privcam/fingerprint/v1"


class Key:
    """A 256-bit secret with derived subkeys. ``repr`` shows the fingerprint only."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != KEY_BYTES:
            raise KeyFileError(f"a key must be exactly {KEY_BYTES} bytes")
        self._secret = bytes(secret)

    @property
    def fingerprint(self) -> str:
        """Public identifier: 16 hex digits of a labelled SHA-256. Reveals nothing usable."""
        return hashlib.sha256(_FINGERPRINT_LABEL + self._secret).hexdigest()[:16]

    def subkey(self, purpose: str, *counters: int) -> bytes:
        """HMAC-SHA256(secret, purpose || counters): 32 bytes, one per (purpose, counters)."""
        msg = purpose.encode() + b"".join(
            b"\x00" + int(c).to_bytes(8, "little", signed=True) for c in counters
        )
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"Key(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):  # never pickle a secret into a checkpoint or a task argument
        raise TypeError("Key objects cannot be pickled; pass the key file path instead")

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_passphrase(cls, passphrase: str) -> Key:
        """scrypt(passphrase, salt=PASSPHRASE_SALT, n=2**14, r=8, p=1) -> 32 bytes."""
        if not passphrase:
            raise KeyFileError("passphrase: expected a non-empty string")
        raw = hashlib.scrypt(passphrase.encode(), salt=PASSPHRASE_SALT, n=2**14, r=8, p=1,
                             dklen=KEY_BYTES)
        return cls(raw)


def write_key_file(path: str | os.PathLike, key: Key | None = None) -> Key:
    """Create ``path`` (mode 0600, refusing to overwrite) holding a new or given key as hex.

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
            fh.write(key._secret.hex() + "\n")
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
    if st.st_mode & 0o077:
        msg = (f"{path}: key file mode is {stat.S_IMODE(st.st_mode):04o}, expected 0600 "
               f"(run: chmod 600 {path})")
        if not allow_insecure_mode:
            raise KeyFileError(msg)
        warnings.warn(msg, stacklevel=2)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"{path}: cannot read key file: {type(err).__name__}") from None
    if len(text) != 2 * KEY_BYTES:
        raise KeyFileError(
            f"{path}: expected {2 * KEY_BYTES} hex digits, got {len(text)} characters")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: expected hex digits 0-9a-f only") from None
    return Key(raw)
