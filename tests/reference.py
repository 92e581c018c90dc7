"""Independent reference constructions, written from the documented definitions only.

Nothing here imports privcam: the key derivation is recomputed with ``hmac``/``hashlib``, the
keystream by encrypting the counter blocks one by one with AES-256 in ECB mode (not the library's
CTR call), the shuffles in plain Python integers, and the readout tables by applying the three
documented passes literally to an index grid. Tests compare the library against these, instead of
comparing the library with the very calls it makes.

Definitions (``sensor/keys.py``, ``sensor/permutation.py``, ``sensor/readout_tables.py`` docstrings):

* subkey = HMAC-SHA256(secret, purpose || (0x00 || int64 little-endian counter)...);
  fingerprint = first 16 hex digits of SHA-256("privcam/fingerprint/v1" || secret);
  passphrase key = scrypt(passphrase, the key's own random salt, n=2**17, r=8, p=1, 32 bytes);
  session secret = HMAC-SHA256(master secret, "privcam/session/v1" || 16-byte nonce);
  frame MAC = HMAC-SHA256(subkey(session secret, "frame-mac"), sorted compact JSON header without
  "mac" || pixels as little-endian uint16).
* keystream(subkey, stream): AES-256(subkey) of the counter blocks ``stream (8 bytes big-endian) ||
  i (8 bytes big-endian)``, i = 0, 1, ...; read as little-endian uint32 words.
* row permutations: row r reads words ``r * (cols - 1 + 4) ...``; Fisher-Yates from i = cols-1
  down to 1 swaps slot i with ``j = (w * (i+1)) >> 32``, redrawing (up to the row's 4 spare words)
  while ``(w * (i+1)) mod 2**32 < 2**32 mod (i+1)``.
* three-pass table of an R x K grid for plane t: A = row permutations (stream 3t), B = column
  permutations (K rows of R, stream 3t+1), C = row permutations (stream 3t+2); pass A
  ``a[r][c] = x[r][A[r][c]]``, pass B ``b[r][c] = a[B[c][r]][c]``, pass C ``y[r][c] = b[r][C[r][c]]``.
* schemes: ``pixel`` permutes the H x W grid; ``quad`` moves 2x2 cells over the (H/2) x (W/2)
  cell grid; ``plane`` permutes packed plane k (``raw[k//2::2, k%2::2]``) with its own table (t = k).
  Readout subkeys: ``subkey("readout/<scheme>")`` (static) or ``subkey("readout/<scheme>/frame", n)``.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

# -- keys -------------------------------------------------------------------------------------------


def subkey(secret: bytes, purpose: str, *counters: int) -> bytes:
    msg = purpose.encode() + b"".join(b"\x00" + int(c).to_bytes(8, "little", signed=True) for c in counters)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def fingerprint(secret: bytes) -> str:
    return hashlib.sha256(b"privcam/fingerprint/v1" + secret).hexdigest()[:16]


def passphrase_secret(passphrase: str, salt: bytes) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=2**17, r=8, p=1, maxmem=256 << 20, dklen=32)


def session_secret(master: bytes, nonce: bytes) -> bytes:
    return hmac.new(master, b"privcam/session/v1" + nonce, hashlib.sha256).digest()


def frame_mac(session: bytes, header: dict, pixels: np.ndarray) -> str:
    import json

    fields = {k: v for k, v in header.items() if k != "mac"}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + pixels.astype("<u2").tobytes()
    return hmac.new(subkey(session, "frame-mac"), body, hashlib.sha256).hexdigest()


def readout_subkey(secret: bytes, scheme: str, frame_index: int | None = None) -> bytes:
    if frame_index is None:
        return subkey(secret, f"readout/{scheme}")
    return subkey(secret, f"readout/{scheme}/frame", frame_index)


# -- keystream and shuffles ------------------------------------------------------------------------


def keystream_words(key: bytes, stream: int, count: int) -> list[int]:
    """AES-256 of each counter block in ECB mode, concatenated, as little-endian uint32 words."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = (count * 4 + 15) // 16
    plain = b"".join(stream.to_bytes(8, "big") + i.to_bytes(8, "big") for i in range(blocks))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    data = ecb.update(plain) + ecb.finalize()
    return [int.from_bytes(data[4 * i:4 * i + 4], "little") for i in range(count)]


def row_perms(key: bytes, stream: int, rows: int, cols: int) -> list[list[int]]:
    return row_perms_from_words(keystream_words(key, stream, rows * (max(cols - 1, 0) + 4)), rows, cols)


def row_perms_from_words(words: list[int], rows: int, cols: int) -> list[list[int]]:
    per = max(cols - 1, 0) + 4
    out = []
    for r in range(rows):
        perm, pos = list(range(cols)), r * per
        for i in range(cols - 1, 0, -1):
            m = words[pos] * (i + 1)
            pos += 1
            while m % 2**32 < 2**32 % (i + 1) and pos < (r + 1) * per:
                m = words[pos] * (i + 1)
                pos += 1
            j = m >> 32
            perm[i], perm[j] = perm[j], perm[i]
        out.append(perm)
    return out


# -- readout tables ---------------------------------------------------------------------------------


def pass_tables(key: bytes, rows: int, cols: int, plane: int = 0) -> tuple[list[list[int]], ...]:
    """(A (rows x cols), B (cols x rows), C (rows x cols)) as nested lists."""
    return (row_perms(key, 3 * plane, rows, cols), row_perms(key, 3 * plane + 1, cols, rows),
            row_perms(key, 3 * plane + 2, rows, cols))


def grid_table(key: bytes, rows: int, cols: int, plane: int = 0) -> np.ndarray:
    """(rows*cols,) int64 slot -> item of one three-pass permutation: the three passes applied to an
    index grid, in order (not the composed closed form)."""
    a_tab, b_tab, c_tab = pass_tables(key, rows, cols, plane)
    x = [[r * cols + c for c in range(cols)] for r in range(rows)]
    a = [[x[r][a_tab[r][c]] for c in range(cols)] for r in range(rows)]
    b = [[a[b_tab[c][r]][c] for c in range(cols)] for r in range(rows)]
    y = [[b[r][c_tab[r][c]] for c in range(cols)] for r in range(rows)]
    return np.array(y, np.int64).reshape(-1)


def plane_tables(scheme: str, height: int, width: int, key: bytes) -> np.ndarray:
    """pixel (H*W,); quad (H/2*W/2,) cell table; plane (4, H/2*W/2), one table per packed plane."""
    if scheme == "pixel":
        return grid_table(key, height, width)
    h, w = height // 2, width // 2
    if scheme == "quad":
        return grid_table(key, h, w)
    return np.stack([grid_table(key, h, w, k) for k in range(4)])


def frame_table(scheme: str, height: int, width: int, key: bytes) -> np.ndarray:
    """(H*W,) int64 ``pi`` with ``protected.flat[t] == frame.flat[pi[t]]`` (whole mosaic)."""
    tabs = plane_tables(scheme, height, width, key)
    if scheme == "pixel":
        return tabs
    h, w = height // 2, width // 2
    pi = np.empty((height, width), np.int64)
    for k in range(4):
        dy, dx = k // 2, k % 2
        tab = tabs if scheme == "quad" else tabs[k]
        for slot in range(h * w):
            r, c = divmod(slot, w)  # destination cell
            sr, sc = divmod(int(tab[slot]), w)  # source cell of this plane's sample
            pi[2 * r + dy, 2 * c + dx] = (2 * sr + dy) * width + 2 * sc + dx
    return pi.reshape(-1)


def readout_table(secret: bytes, scheme: str, height: int, width: int, frame_index: int | None = None
                  ) -> np.ndarray:
    """Whole-frame table of the keyed readout, from the key bytes."""
    return frame_table(scheme, height, width, readout_subkey(secret, scheme, frame_index))
