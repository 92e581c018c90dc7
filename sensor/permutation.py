"""Keyed permutations from a standard keystream: AES-256-CTR (``cryptography``) + Fisher-Yates.

A permutation ``pi`` of ``n`` items is stored as an int64 table in *slot order*: slot ``s``
of the protected signal holds item ``pi[s]`` of the plain one, ``x_prot[s] = x[pi[s]]``.

Every keyed order in privcam (readout passes, EtC/ELE block orders, network layer orders) comes
from here: the keystream of AES-256-CTR under a 32-byte HMAC subkey (:meth:`sensor.keys.Key.subkey`)
with the 16-byte initial counter block ``stream (8 bytes, big-endian) || 0 (8 bytes)``, read as
little-endian uint32 words. Distinct streams of one subkey never share a counter block (a stream
would need 2**64 blocks to reach the next one).

Rows of ``cols`` items are shuffled by Durstenfeld's Fisher-Yates, ``i = cols-1 .. 1``, swapping
slot ``i`` with a uniform ``j`` in ``[0, i]`` drawn by Lemire's multiply-shift with rejection
(unbiased). A row reads ``cols - 1 + SPARE`` consecutive words of its stream (row ``r`` starts at
word ``r * (cols - 1 + SPARE)``); a rejection takes the row's next word. Only if a row needed more
than ``SPARE`` rejections (probability below 1e-13 per row of 65535 items) would its last draw keep
the biased multiply-shift value. It is a permutation, not a cipher.
"""

from __future__ import annotations

import numba
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SUBKEY_BYTES = 32
SPARE = 4  # keystream words per row kept for rejections


def check_subkey(subkey: bytes, name: str = "subkey") -> bytes:
    """Validate a 32-byte subkey; the message never contains the value."""
    if not isinstance(subkey, (bytes, bytearray)) or len(subkey) != SUBKEY_BYTES:
        got = f"{len(subkey)} bytes" if isinstance(subkey, (bytes, bytearray)) else type(subkey).__name__
        raise ValueError(f"{name}: expected {SUBKEY_BYTES} bytes (an HMAC subkey of the key), got {got}")
    return bytes(subkey)


def keystream_words(subkey: bytes, stream: int, count: int) -> np.ndarray:
    """(count,) uint32: the first ``count`` little-endian words of AES-256-CTR(subkey, stream)."""
    if not 0 <= stream < 1 << 64:
        raise ValueError(f"stream: expected an integer in [0, 2**64), got {stream}")
    nbytes = 4 * count
    out = np.empty(nbytes + 16, np.uint8)  # update_into wants room for one block
    counter_block = stream.to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(check_subkey(subkey)), modes.CTR(counter_block)).encryptor()
    encryptor.update_into(np.zeros(nbytes, np.uint8), out)
    return out[:nbytes].view("<u4").astype(np.uint32, copy=False)


def row_words(cols: int) -> int:
    """Keystream words one row of ``cols`` items reads."""
    return max(cols - 1, 0) + SPARE


def shuffle_rows_ref(words: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Fisher-Yates of each row (plain Python, the reference). words: (rows * row_words(cols),) uint32.

    Returns:
        (rows, cols) int64; row r is a uniformly random permutation of 0..cols-1.
    """
    out = np.empty((rows, cols), np.int64)
    per = row_words(cols)
    for r in range(rows):
        perm = list(range(cols))
        pos, end = r * per, (r + 1) * per
        for i in range(cols - 1, 0, -1):
            bound = i + 1
            m = int(words[pos]) * bound
            pos += 1
            if (m & 0xFFFFFFFF) < bound:
                threshold = (1 << 32) % bound
                while (m & 0xFFFFFFFF) < threshold and pos < end:
                    m = int(words[pos]) * bound
                    pos += 1
            j = m >> 32
            perm[i], perm[j] = perm[j], perm[i]
        out[r] = perm
    return out


@numba.njit(nogil=True, cache=True, parallel=True)
def shuffle_rows_nb(words, out):
    """Numba :func:`shuffle_rows_ref` written into out (rows, cols) of an integer dtype."""
    rows, cols = out.shape
    per = max(cols - 1, 0) + SPARE
    m32 = np.uint64(0xFFFFFFFF)
    for r in numba.prange(rows):
        perm = np.arange(cols)
        pos, end = r * per, (r + 1) * per
        for i in range(cols - 1, 0, -1):
            bound = np.uint64(i + 1)
            m = np.uint64(words[pos]) * bound
            pos += 1
            if (m & m32) < bound:
                threshold = (np.uint64(1) << np.uint64(32)) % bound
                while (m & m32) < threshold and pos < end:
                    m = np.uint64(words[pos]) * bound
                    pos += 1
            j = np.int64(m >> np.uint64(32))
            t = perm[i]
            perm[i] = perm[j]
            perm[j] = t
        for c in range(cols):
            out[r, c] = perm[c]


def row_permutations(subkey: bytes, stream: int, rows: int, cols: int, dtype: np.dtype | type = np.int64,
                     reference: bool = False) -> np.ndarray:
    """(rows, cols) table: an independent keyed permutation of every row, from one keystream.

    ``reference=True`` shuffles with the plain Python reference (slow; for the tests).
    """
    words = keystream_words(subkey, stream, rows * row_words(cols))
    if reference:
        return shuffle_rows_ref(words, rows, cols).astype(dtype)
    out = np.empty((rows, cols), dtype)
    shuffle_rows_nb(words, out)
    return out


def random_permutation(subkey: bytes, n: int, stream: int = 0) -> np.ndarray:
    """Keyed uniform permutation of ``n`` items. Returns (n,) int64 slot->item."""
    return row_permutations(subkey, stream, 1, n)[0]


def invert(pi: np.ndarray) -> np.ndarray:
    """Inverse table: ``inv[pi[s]] = s``. Works on (..., n) batches of tables."""
    inv = np.empty_like(pi)
    np.put_along_axis(inv, pi, np.broadcast_to(np.arange(pi.shape[-1]), pi.shape), axis=-1)
    return inv
