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

import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SUBKEY_BYTES = 32
SPARE = 4  # keystream words per row kept for rejections
CHUNK_BYTES = 1 << 18  # least keystream per task of the pipelined builder (fewer, larger tasks are cut)
TASKS_PER_THREAD = 4  # tasks per table and pool thread: enough to overlap AES and shuffles, few GIL hand-offs


def check_subkey(subkey: bytes, name: str = "subkey") -> bytes:
    """Validate a 32-byte subkey; the message never contains the value."""
    if not isinstance(subkey, (bytes, bytearray)) or len(subkey) != SUBKEY_BYTES:
        got = f"{len(subkey)} bytes" if isinstance(subkey, (bytes, bytearray)) else type(subkey).__name__
        raise ValueError(f"{name}: expected {SUBKEY_BYTES} bytes (an HMAC subkey of the key), got {got}")
    return bytes(subkey)


def keystream_words(subkey: bytes, stream: int, count: int) -> np.ndarray:
    """(count,) uint32: the first ``count`` little-endian words of AES-256-CTR(subkey, stream)."""
    encryptor = _encryptor(subkey, stream)
    nbytes = 4 * count
    out = np.empty(nbytes + 16, np.uint8)  # update_into wants room for one block
    encryptor.update_into(np.zeros(nbytes, np.uint8), out)
    return out[:nbytes].view("<u4").astype(np.uint32, copy=False)


def _encryptor(subkey: bytes, stream: int):
    """AES-256-CTR encryptor of ``stream`` (counter block ``stream || 0``); its output is the keystream."""
    _check_stream(stream)
    counter_block = stream.to_bytes(8, "big") + bytes(8)
    return Cipher(algorithms.AES(check_subkey(subkey)), modes.CTR(counter_block)).encryptor()


def _check_stream(stream: int) -> None:
    if not 0 <= stream < 1 << 64:
        raise ValueError(f"stream: expected an integer in [0, 2**64), got {stream}")


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


@numba.njit(nogil=True, cache=True)
def _shuffle_row(words, pos, perm, out_row):
    """Fisher-Yates of one row from words[pos : pos + row_words(cols)] into out_row (cols,);
    perm (cols,) int64 is the working buffer."""
    cols = out_row.shape[0]
    end = pos + max(cols - 1, 0) + SPARE
    m32 = np.uint64(0xFFFFFFFF)
    for c in range(cols):
        perm[c] = c
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
        out_row[c] = perm[c]


@numba.njit(nogil=True, cache=True, parallel=True)
def shuffle_rows_nb(words, out):
    """Numba :func:`shuffle_rows_ref` written into out (rows, cols) of an integer dtype."""
    rows, cols = out.shape
    per = max(cols - 1, 0) + SPARE
    for r in numba.prange(rows):
        _shuffle_row(words, r * per, np.empty(cols, np.int64), out[r])


@numba.njit(nogil=True, cache=True)
def shuffle_block_nb(words, out):
    """Single-threaded :func:`shuffle_rows_nb` (one task of the pipelined builder: the rows of one
    keystream chunk, while other threads encrypt or shuffle other chunks)."""
    rows, cols = out.shape
    per = max(cols - 1, 0) + SPARE
    perm = np.empty(cols, np.int64)
    for r in range(rows):
        _shuffle_row(words, r * per, perm, out[r])


def row_permutations(subkey: bytes, stream: int, rows: int, cols: int, dtype: np.dtype | type = np.int64,
                     reference: bool = False) -> np.ndarray:
    """(rows, cols) table: an independent keyed permutation of every row, from one keystream.

    ``reference=True`` shuffles with the plain Python reference (slow; for the tests); else the
    pipelined builder (:func:`fill_row_permutations`), which gives the same table.
    """
    if reference:
        words = keystream_words(subkey, stream, rows * row_words(cols))
        return shuffle_rows_ref(words, rows, cols).astype(dtype)
    out = np.empty((rows, cols), dtype)
    fill_row_permutations(subkey, [(stream, out)])
    return out


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> tuple[int, ThreadPoolExecutor]:
    """(workers, executor): this process's shuffle threads, as many as numba may use at most, made on
    first use and again after a fork (a child has none of its parent's threads)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            workers = max(1, numba.config.NUMBA_NUM_THREADS)
            _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, "privcam-shuffle"))
        return _POOL[1], _POOL[2]


def fill_row_permutations(subkey: bytes, tables: Sequence[tuple[int, np.ndarray]]) -> None:
    """Fill each ``(stream, out)`` with :func:`row_permutations` ``(subkey, stream, *out.shape)``.

    out: (rows, cols) C-contiguous, an integer dtype. The rows of a table are cut into about
    :data:`TASKS_PER_THREAD` chunks per thread of the caller's numba share (``numba.get_num_threads()``
    in the calling thread: a pipeline stage's thread budget covers its tables too; 1 builds inline),
    each at least :data:`CHUNK_BYTES` of keystream
    (each task takes the GIL twice, so not many more); a chunk is one task (:func:`_chunk_task`):
    encrypt its own part of the stream (AES-CTR from the chunk's counter block; ``cryptography``
    holds the GIL for it), then shuffle its rows (:func:`shuffle_block_nb`, without the GIL), so
    one thread encrypts while the others shuffle, and no frame-sized keystream is ever stored.
    Tables of at most :data:`CHUNK_BYTES` of keystream in all are built in the calling thread.
    """
    subkey = check_subkey(subkey)
    for _, out in tables:
        if not (isinstance(out, np.ndarray) and out.ndim == 2 and out.flags.c_contiguous
                and out.dtype.kind in "iu"):
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"out: expected a C-contiguous (rows, cols) integer array, got {got}")
    for stream, _ in tables:
        _check_stream(stream)
    _, pool = _pool()
    # as many tasks at once as the calling thread's numba share (a stage's thread budget): one is inline
    workers = max(1, numba.get_num_threads())
    inline = workers == 1 or sum(4 * row_words(out.shape[1]) * out.shape[0] for _, out in tables) <= CHUNK_BYTES
    chunks = []
    for stream, out in tables:
        rows, per = out.shape[0], row_words(out.shape[1])
        step = max(1, CHUNK_BYTES // (4 * per), 0 if inline else -(-rows // (TASKS_PER_THREAD * workers)))
        chunks += [(stream, out[r0:r0 + step], r0) for r0 in range(0, rows, step)]
    if inline:  # small tables (a network layer's order), or no other thread: here, no hand-offs
        for chunk in chunks:
            _chunk_task(subkey, *chunk)
        return
    tasks = []
    try:
        tasks = [pool.submit(_chunk_task, subkey, *chunk) for chunk in chunks]
        for task in tasks:
            task.result()
    finally:  # on an error, cancel what has not started and let the rest finish before returning
        for task in tasks:
            task.cancel() or task.exception()


_LOCAL = threading.local()


def _chunk_task(subkey: bytes, stream: int, out: np.ndarray, row0: int) -> None:
    """Rows row0 .. row0 + len(out) - 1 of a table: their keystream words, then their shuffles."""
    per = row_words(out.shape[1])
    first, nbytes = 4 * per * row0, 4 * per * out.shape[0]  # byte range of the stream
    skip = first % 16
    counter = ((stream << 64) + first // 16).to_bytes(16, "big")  # the block holding byte `first`
    size = skip + nbytes + 16
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < size:
        buf = _LOCAL.buf = np.empty(size, np.uint8)
        _LOCAL.zeros = np.zeros(size, np.uint8)
    encryptor = Cipher(algorithms.AES(subkey), modes.CTR(counter)).encryptor()
    encryptor.update_into(_LOCAL.zeros[:skip + nbytes], buf)
    shuffle_block_nb(_native_words(buf[skip:skip + nbytes]), out)


def _native_words(buf: np.ndarray) -> np.ndarray:
    """Little-endian uint32 words of a byte buffer as a native uint32 array (a view when native)."""
    words = buf.view("<u4")
    return words.view(np.uint32) if sys.byteorder == "little" else words.astype(np.uint32)


def random_permutation(subkey: bytes, n: int, stream: int = 0) -> np.ndarray:
    """Keyed uniform permutation of ``n`` items. Returns (n,) int64 slot->item."""
    return row_permutations(subkey, stream, 1, n)[0]


def invert(pi: np.ndarray) -> np.ndarray:
    """Inverse table: ``inv[pi[s]] = s``. Works on (..., n) batches of tables."""
    inv = np.empty_like(pi)
    np.put_along_axis(inv, pi, np.broadcast_to(np.arange(pi.shape[-1]), pi.shape), axis=-1)
    return inv
