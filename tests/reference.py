"""Independent reference constructions, written from the documented definitions only.

Nothing here imports privcam: the key derivation is recomputed with ``hmac``/``hashlib``, the keyed
hash with plain Python integers (no 32-bit-lane trick, no numba, no numpy), and the readout tables
by applying the three documented passes literally to an index grid. Tests compare the library
against these, instead of comparing the library with the very calls it makes.

Definitions (``sensor/keys.py``, ``sensor/permutation.py`` and ``sensor/readout.py`` docstrings):

* subkey = HMAC-SHA256(secret, purpose || (0x00 || int64 little-endian counter)...);
  seed = first 8 bytes of the subkey, little-endian, shifted right by 2 (62 bits);
  fingerprint = first 16 hex digits of SHA-256("privcam/fingerprint/v1" || secret);
  passphrase key = scrypt(passphrase, salt "privcam/passphrase/v1", n=2**14, r=8, p=1, 32 bytes).
* hash62(seed, i): six round keys from the seed, two three-round keyed lowbias32 chains of i,
  31 bits of each.
* three-pass table of an R x K grid: ``A[r] = argsort_c hash(seed_a, r*K + c)`` (stable),
  ``B[c] = argsort_r hash(seed_b, c*R + r)``, ``C`` like ``A`` with ``seed_c``,
  ``seed_a, seed_b, seed_c = hash62(seed, 0 | 1 | 2)``; pass A ``a[r][c] = x[r][A[r][c]]``,
  pass B ``b[r][c] = a[B[c][r]][c]``, pass C ``y[r][c] = b[r][C[r][c]]``.
* schemes: ``pixel`` permutes the H x W grid; ``quad`` moves 2x2 cells over the (H/2) x (W/2)
  cell grid; ``plane`` permutes packed plane k (``raw[k//2::2, k%2::2]``) with its own table,
  seeded ``hash62(seed, 16 + k)``. Readout seeds: ``seed("readout/<scheme>")`` (static) or
  ``seed("readout/<scheme>/frame", n)`` (rotation).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

M32 = 0xFFFFFFFF


# -- keys -------------------------------------------------------------------------------------------


def subkey(secret: bytes, purpose: str, *counters: int) -> bytes:
    msg = purpose.encode() + b"".join(b"\x00" + int(c).to_bytes(8, "little", signed=True) for c in counters)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def seed(secret: bytes, purpose: str, *counters: int) -> int:
    return int.from_bytes(subkey(secret, purpose, *counters)[:8], "little") >> 2


def fingerprint(secret: bytes) -> str:
    return hashlib.sha256(b"privcam/fingerprint/v1" + secret).hexdigest()[:16]


def passphrase_secret(passphrase: str) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=b"privcam/passphrase/v1", n=2**14, r=8, p=1, dklen=32)


def readout_seed(secret: bytes, scheme: str, frame_index: int | None = None) -> int:
    if frame_index is None:
        return seed(secret, f"readout/{scheme}")
    return seed(secret, f"readout/{scheme}/frame", frame_index)


# -- keyed hash (plain Python integers) -------------------------------------------------------------


def mix32(x: int) -> int:
    """lowbias32 (Wellons) on a 32-bit integer."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def round_keys(s: int) -> tuple[int, ...]:
    s0, s1 = s & M32, (s >> 32) & M32
    k0 = mix32(s0 ^ mix32(s1 ^ 0x243F6A88))
    k1 = mix32(s1 ^ mix32(k0 ^ 0x85A308D3))
    k2 = mix32(k0 ^ mix32(k1 ^ 0x13198A2E))
    k3 = mix32(k1 ^ mix32(k2 ^ 0x03707344))
    k4 = mix32(k2 ^ mix32(k3 ^ 0xA4093822))
    k5 = mix32(k3 ^ mix32(k4 ^ 0x299F31D0))
    return k0, k1, k2, k3, k4, k5


def hasher(s: int):
    """i -> hash62(s, i) for indices i < 2**32 (round keys computed once)."""
    k0, k1, k2, k3, k4, k5 = round_keys(s)

    def h(i: int) -> int:
        a = mix32(mix32(mix32(i ^ k0) ^ k1) ^ k2)
        b = mix32(mix32(mix32(i ^ k3) ^ k4) ^ k5)
        return ((a & 0x7FFFFFFF) << 31) | (b & 0x7FFFFFFF)

    return h


def hash62(s: int, i: int) -> int:
    return hasher(s)(i)


# -- readout tables ---------------------------------------------------------------------------------


def _row_perms(s: int, rows: int, cols: int) -> list[list[int]]:
    """Row r: the column indices sorted by (hash(s, r*cols + c), c), i.e. a stable argsort."""
    h = hasher(s)
    return [sorted(range(cols), key=lambda c, r=r: (h(r * cols + c), c)) for r in range(rows)]


def pass_tables(s: int, rows: int, cols: int) -> tuple[list[list[int]], ...]:
    """(A (rows x cols), B (cols x rows), C (rows x cols)) as nested lists."""
    sa, sb, sc = (hash62(s, label) for label in (0, 1, 2))
    return _row_perms(sa, rows, cols), _row_perms(sb, cols, rows), _row_perms(sc, rows, cols)


def grid_table(s: int, rows: int, cols: int) -> np.ndarray:
    """(rows*cols,) int64 slot -> item of one three-pass permutation: the three passes applied to an
    index grid, in order (not the composed closed form)."""
    a_tab, b_tab, c_tab = pass_tables(s, rows, cols)
    x = [[r * cols + c for c in range(cols)] for r in range(rows)]
    a = [[x[r][a_tab[r][c]] for c in range(cols)] for r in range(rows)]
    b = [[a[b_tab[c][r]][c] for c in range(cols)] for r in range(rows)]
    y = [[b[r][c_tab[r][c]] for c in range(cols)] for r in range(rows)]
    return np.array(y, np.int64).reshape(-1)


def plane_tables(scheme: str, height: int, width: int, s: int) -> np.ndarray:
    """pixel (H*W,); quad (H/2*W/2,) cell table; plane (4, H/2*W/2), one table per packed plane."""
    if scheme == "pixel":
        return grid_table(s, height, width)
    h, w = height // 2, width // 2
    if scheme == "quad":
        return grid_table(s, h, w)
    return np.stack([grid_table(hash62(s, 16 + k), h, w) for k in range(4)])


def frame_table(scheme: str, height: int, width: int, s: int) -> np.ndarray:
    """(H*W,) int64 ``pi`` with ``protected.flat[t] == frame.flat[pi[t]]`` (whole mosaic)."""
    tabs = plane_tables(scheme, height, width, s)
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
    return frame_table(scheme, height, width, readout_seed(secret, scheme, frame_index))
