"""Keyed readout permutation of raw frames: the sensor's ADC reads pixels out in a secret order.

Permutation family ("three-pass"). For a grid of ``R`` rows x ``K`` columns and a 62-bit seed:

* pass seeds ``seed_a, seed_b, seed_c = _hash62(seed, 0), _hash62(seed, 1), _hash62(seed, 2)``;
* ``A`` (R, K): ``A[r] = argsort_c hash(seed_a, r*K + c)`` (stable), a permutation of each row;
* ``B`` (K, R): ``B[c] = argsort_r hash(seed_b, c*R + r)``, a permutation of each column;
* ``C`` (R, K): like ``A`` with ``seed_c``.

Pass A ``a[r, c] = x[r, A[r, c]]``, pass B ``b[r, c] = a[B[c, r], c]``, pass C
``y[r, c] = b[r, C[r, c]]``. The composed slot->item table (see :mod:`sensor.permutation`) is
``pi[r*K + c] = r'*K + A[r', c']`` with ``c' = C[r, c]`` and ``r' = B[c', r]``, so
``y.flat[s] = x.flat[pi[s]]``. Every pixel lands on a uniformly distributed slot of the whole
grid and horizontal or vertical neighbours land (almost) independently, while each pass only
permutes within rows or within columns, which keeps the readout cache friendly.

Schemes for an (H, W) mosaic (mono frames support all three; quad and plane act on 2x2 cells):

* ``pixel``: one three-pass permutation of the H x W pixel grid.
* ``quad``: 2x2 CFA cells move whole over the (H/2) x (W/2) cell grid; the result is a valid
  mosaic of the same CFA whose four packed planes are all permuted by the same table.
* ``plane``: each packed CFA plane k (order of :func:`sensor.cfa.pack`) is permuted within
  itself by its own three-pass permutation of the (H/2) x (W/2) grid, seeded
  ``_hash62(seed, 16 + k)``.

Seeds come from the key: ``key.seed("readout/<scheme>")`` (static) or
``key.seed("readout/<scheme>/frame", frame_index)`` (per-frame rotation). Tables are also built
by torch (:func:`plane_tables_torch`), bit-identical, on any device.

Implementation: frames are viewed as 5-d arrays (N, R, P, K, Q) of "units": pixel (N, H, 1, W, 1)
uint16; quad (N, h, 2, w, 1) uint32 (a unit is the horizontal pixel pair of one cell row); plane
(N, h, 2, w, 2) uint16 with one table per (p, q) lane. Kernel tables are A (T, R, K),
B (T, K, R), C (T, R, K) with T = 1, or 4 for plane (lane t = p*Q + q). Pass A is fused with a
blocked transpose into a scratch (N, K, P, R, Q), pass B is a row gather of that scratch and pass
C is fused with the blocked transpose back (measured faster than gathering column strips in
place, which is kept as ``_cols_nb`` for comparison). Each numba kernel has a plain numpy
reference (``*_ref``) next to it, bit-for-bit equal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from .keys import Key
from .permutation import _hash62, round_keys

SCHEMES: tuple[str, ...] = ("pixel", "quad", "plane")
_PASS_LABELS = (0, 1, 2)  # seed_a, seed_b, seed_c = _hash62(seed, label)
_PLANE_LABEL0 = 16  # plane k of the plane scheme is seeded _hash62(seed, 16 + k)
_SEED_LIMIT = 1 << 62
_INDEX_LIMIT = 1 << 32  # _hash62 indices (r*K + c) must stay below 2**32
_BLOCK_BYTES = 1 << 20  # row-block buffer of the transposing kernels (about one L2)
_LITTLE_ENDIAN = sys.byteorder == "little"  # the uint64 word tiles assume little-endian lanes
_TILE_BYTES = 128  # column strips of the strip kernels are this many bytes wide per sub-row

# ----------------------------------------------------------------------------------------------
# Seeds and validation
# ----------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_scheme(scheme: str) -> str:
    """Return scheme if it is one of SCHEMES, else raise ValueError naming the argument."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    return scheme


def _check_seed(seed: int, name: str = "seed") -> int:
    """Validate a 62-bit seed; the message never contains the value (it derives from the key)."""
    if not _is_int(seed):
        raise ValueError(f"{name}: expected an int in [0, 2**62), got a {type(seed).__name__}")
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"{name}: expected an int in [0, 2**62), got a value out of range")
    return int(seed)


def _check_shape(scheme: str, height: int, width: int) -> tuple[int, int]:
    """Validate the frame size of a scheme; returns (height, width) as Python ints."""
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if scheme != "pixel" and v % 2:
            raise ValueError(f"{name}: scheme {scheme!r} moves 2x2 cells and needs an even {name}, "
                             f"got {v}")
    height, width = int(height), int(width)
    if height * width > _INDEX_LIMIT:
        raise ValueError(f"height, width: at most 2**32 pixels, got {height}x{width}")
    return height, width


def readout_seed(key: Key, scheme: str, frame_index: int | None = None) -> int:
    """Seed of the readout permutation: static (``frame_index=None``) or rotated per frame."""
    _check_scheme(scheme)
    if frame_index is None:
        return key.seed(f"readout/{scheme}")
    if not _is_int(frame_index) or frame_index < 0:
        raise ValueError(f"frame_index: expected None or a non-negative int, got {frame_index!r}")
    return key.seed(f"readout/{scheme}/frame", int(frame_index))


def pass_seeds(seed: int) -> tuple[int, int, int]:
    """(seed_a, seed_b, seed_c) of the three passes: ``_hash62(seed, 0 | 1 | 2)``."""
    seed = _check_seed(seed)
    sa, sb, sc = (int(_hash62(seed, label)) for label in _PASS_LABELS)
    return sa, sb, sc


def scheme_seeds(scheme: str, seed: int) -> list[int]:
    """Three-pass seeds of a scheme: [seed] for pixel and quad, the 4 plane seeds for plane."""
    seed = _check_seed(seed)
    if _check_scheme(scheme) == "plane":
        return [int(_hash62(seed, _PLANE_LABEL0 + k)) for k in range(4)]
    return [seed]


def grid_shape(scheme: str, height: int, width: int) -> tuple[int, int]:
    """(R, K) of the permuted grid: (H, W) for pixel, (H/2, W/2) cells otherwise."""
    height, width = _check_shape(_check_scheme(scheme), height, width)
    return (height, width) if scheme == "pixel" else (height // 2, width // 2)


def _table_dtype(rows: int, cols: int) -> np.dtype:
    """Storage dtype of pass tables: uint16 while indices fit (halves the bandwidth), else int32."""
    return np.dtype(np.uint16) if max(rows, cols) < 65536 else np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------
# Keyed hash in numba (bit-identical to sensor.permutation._hash62)
# ----------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _mix32_nb(x):
    """lowbias32 on a uint64 holding a 32-bit lane (same as permutation._mix32)."""
    m = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


@numba.njit(nogil=True, cache=True)
def _hash62_nb(k, idx):
    """_hash62 of one uint64 index < 2**32; k is the (6,) uint64 array of :func:`round_keys`."""
    a = _mix32_nb(_mix32_nb(_mix32_nb(idx ^ k[0]) ^ k[1]) ^ k[2])
    b = _mix32_nb(_mix32_nb(_mix32_nb(idx ^ k[3]) ^ k[4]) ^ k[5])
    m31 = np.uint64(0x7FFFFFFF)
    return ((a & m31) << np.uint64(31)) | (b & m31)


def _keys_nb(seed: int) -> np.ndarray:
    """Round keys of ``seed`` as the (6,) uint64 array the numba hash takes."""
    return np.array(round_keys(int(seed)), np.uint64)


@numba.njit(nogil=True, cache=True, parallel=True)
def _hash62_array_nb(k, n):
    """(n,) uint64: _hash62(seed, arange(n)) with k = _keys_nb(seed). Checks the numba hash."""
    out = np.empty(n, np.uint64)
    for i in numba.prange(n):
        out[i] = _hash62_nb(k, np.uint64(i))
    return out


# ----------------------------------------------------------------------------------------------
# Stable argsort of 62-bit keys: bucket by the top bits, then insertion sort (expected O(n))
# ----------------------------------------------------------------------------------------------


def _argsort62_ref(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of (n,) uint64 keys < 2**62 (ties by index). Returns (n,) int64."""
    return np.argsort(keys, kind="stable").astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _argsort62_nb(keys, order, counts):
    """Numba :func:`_argsort62_ref` into order (n,) int64; counts is (nb + 1,) int64 scratch with
    nb a power of two (about n). A stable counting sort on the top log2(nb) bits puts the keys
    in buckets in index order; insertion sort by the full key then only moves items inside a
    bucket (a few each for hashed keys), and being stable it keeps ties in index order."""
    n = keys.shape[0]
    nb = counts.shape[0] - 1
    bits = 0
    while (1 << bits) < nb:
        bits += 1
    shift = np.uint64(62 - bits)
    counts[:] = 0
    for i in range(n):
        counts[np.int64(keys[i] >> shift) + 1] += 1
    for b in range(nb):
        counts[b + 1] += counts[b]
    for i in range(n):
        b = np.int64(keys[i] >> shift)
        order[counts[b]] = i
        counts[b] += 1
    for i in range(1, n):
        item = order[i]
        key = keys[item]
        j = i - 1
        while j >= 0 and keys[order[j]] > key:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = item


def _buckets(n: int) -> int:
    """Smallest power of two >= n (bucket count of :func:`_argsort62_nb`)."""
    return 1 << max(0, int(n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Three-pass tables: numpy (reference), numba (fast, same result) and torch (any device)
# ----------------------------------------------------------------------------------------------


def _row_perms_ref(seed: int, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) int64: row r = stable argsort over c of _hash62(seed, r*cols + c)."""
    keys = _hash62(seed, np.arange(rows * cols, dtype=np.uint64)).reshape(rows, cols)
    return np.argsort(keys, axis=1, kind="stable")


@numba.njit(nogil=True, cache=True, parallel=True)
def _row_perms_nb(k, out):
    """Numba :func:`_row_perms_ref` written into out (rows, cols) of an integer dtype; k = _keys_nb(seed)."""
    rows, cols = out.shape
    nb = 1
    while nb < cols:
        nb *= 2
    for r in numba.prange(rows):
        keys = np.empty(cols, np.uint64)
        order = np.empty(cols, np.int64)
        counts = np.empty(nb + 1, np.int64)
        base = np.uint64(r) * np.uint64(cols)
        for c in range(cols):
            keys[c] = _hash62_nb(k, base + np.uint64(c))
        _argsort62_nb(keys, order, counts)
        for c in range(cols):
            out[r, c] = order[c]


def three_pass_tables_numpy(seed: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables of the three passes, plain numpy (the reference definition).

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    sa, sb, sc = pass_seeds(seed)
    dt = _table_dtype(rows, cols)
    return (_row_perms_ref(sa, rows, cols).astype(dt), _row_perms_ref(sb, cols, rows).astype(dt),
            _row_perms_ref(sc, rows, cols).astype(dt))


def three_pass_tables(seed: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same tables as :func:`three_pass_tables_numpy`, built by numba (about 10x faster).

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    sa, sb, sc = pass_seeds(seed)
    dt = _table_dtype(rows, cols)
    a, b, c = np.empty((rows, cols), dt), np.empty((cols, rows), dt), np.empty((rows, cols), dt)
    for s, out in ((sa, a), (sb, b), (sc, c)):
        _row_perms_nb(_keys_nb(s), out)
    return a, b, c


def compose_table_numpy(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Composed slot->item table of the three passes (numpy reference).

    Args:
        a: (R, K), b: (K, R), c: (R, K) pass tables.

    Returns:
        (R*K,) int64 ``pi`` with ``y.flat[s] = x.flat[pi[s]]``.
    """
    rows, cols = a.shape
    cp = c.astype(np.int64)
    rp = b[cp, np.arange(rows)[:, None]].astype(np.int64)
    return (rp * cols + a[rp, cp]).reshape(-1)


@numba.njit(nogil=True, cache=True, parallel=True)
def _compose_nb(a, b, c):
    """Numba :func:`compose_table_numpy`. Returns (R*K,) int64."""
    rows, cols = a.shape
    out = np.empty(rows * cols, np.int64)
    for r in numba.prange(rows):
        for k in range(cols):
            cp = np.int64(c[r, k])
            rp = np.int64(b[cp, r])
            out[r * cols + k] = rp * cols + np.int64(a[rp, cp])
    return out


def compose_table(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Numba twin of :func:`compose_table_numpy`: (R, K), (K, R), (R, K) -> (R*K,) int64."""
    return _compose_nb(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(c))


def three_pass_tables_torch(seed: int, rows: int, cols: int,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Torch twin of :func:`three_pass_tables_numpy`: A (R, K), B (K, R), C (R, K) int64."""
    sa, sb, sc = pass_seeds(seed)
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    a = torch.argsort(_hash62(sa, idx).view(rows, cols), dim=1, stable=True)
    b = torch.argsort(_hash62(sb, idx).view(cols, rows), dim=1, stable=True)
    c = torch.argsort(_hash62(sc, idx).view(rows, cols), dim=1, stable=True)
    return a, b, c


def compose_table_torch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`compose_table_numpy`: (R, K), (K, R), (R, K) -> (R*K,) int64."""
    rows, cols = a.shape
    cp = c.long()
    r = torch.arange(rows, device=a.device).unsqueeze(1).expand(rows, cols)
    rp = b.long()[cp, r]
    return (rp * cols + a.long()[rp, cp]).reshape(-1)


def plane_tables(scheme: str, height: int, width: int, seed: int) -> np.ndarray:
    """Per-plane slot->item tables (numba), as :meth:`ReadoutPermutation.plane_tables`.

    Returns:
        int64: pixel (H*W,); quad (h*w,), shared by the 4 packed planes; plane (4, h*w).
    """
    rows, cols = grid_shape(scheme, height, width)
    tabs = [compose_table(*three_pass_tables(s, rows, cols)) for s in scheme_seeds(scheme, seed)]
    return np.stack(tabs) if scheme == "plane" else tabs[0]


def plane_tables_torch(scheme: str, height: int, width: int, seeds: list[int],
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-frame tables built on ``device``, identical to :func:`plane_tables` for each seed.

    Args:
        seeds: one readout seed per batch item (see :func:`readout_seed`).

    Returns:
        int64: (B, n) for pixel (n = H*W) and quad (n = H/2 * W/2); (B, 4, n) for plane.
    """
    rows, cols = grid_shape(scheme, height, width)
    out = []
    for seed in seeds:
        tabs = [compose_table_torch(*three_pass_tables_torch(s, rows, cols, device))
                for s in scheme_seeds(scheme, seed)]
        out.append(torch.stack(tabs) if scheme == "plane" else tabs[0])
    if not out:
        n = rows * cols
        return torch.empty((0, 4, n) if scheme == "plane" else (0, n), dtype=torch.int64, device=device)
    return torch.stack(out)


def frame_table(scheme: str, height: int, width: int, tables: np.ndarray) -> np.ndarray:
    """Whole-frame slot->pixel table from per-plane tables (see :func:`plane_tables`).

    Returns:
        (H*W,) int64 with ``frame_prot.flat[s] = frame.flat[pi[s]]``.
    """
    if scheme == "pixel":
        return np.asarray(tables, np.int64).reshape(-1)
    h, w = height // 2, width // 2
    tabs = np.broadcast_to(np.asarray(tables, np.int64).reshape(-1, h * w), (4, h * w))
    out = np.empty((h, 2, w, 2), np.int64)
    for k in range(4):
        dy, dx = divmod(k, 2)
        src_r, src_c = np.divmod(tabs[k], w)
        out[:, dy, :, dx] = ((2 * src_r + dy) * width + 2 * src_c + dx).reshape(h, w)
    return out.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Pass kernels on 5-d unit arrays (N, R, P, K, Q) with tables (T, R, K), lane t = p*Q + q if T > 1.
# Each moves units within rows: gather dst[.., c, ..] = src[.., tab[t, r, c], ..] or, with
# scatter=True, its inverse dst[.., tab[t, r, c], ..] = src[.., c, ..].
# ----------------------------------------------------------------------------------------------


def _index5(tab: np.ndarray, p: int, q: int) -> np.ndarray:
    """(T, R, K) table -> (1, R, P, K, Q) intp index broadcastable against a unit array."""
    t, rows, cols = tab.shape
    if t == 1:
        return tab[0].astype(np.intp)[None, :, None, :, None]
    return tab.astype(np.intp).reshape(p, q, rows, cols).transpose(2, 0, 3, 1)[None]


def _permute_ref(src: np.ndarray, tab: np.ndarray, axis: int, scatter: bool) -> np.ndarray:
    """Gather (or scatter) along ``axis`` of a unit array with a broadcast (T, ., .) table."""
    idx = _index5(tab, src.shape[2], src.shape[4])
    if not scatter:
        return np.take_along_axis(src, idx, axis=axis)
    dst = np.empty_like(src)
    np.put_along_axis(dst, np.broadcast_to(idx, src.shape), src, axis=axis)
    return dst


def _swap_rk(a: np.ndarray) -> np.ndarray:
    """(N, R, P, K, Q) <-> (N, K, P, R, Q), contiguous copy (the transposed scratch layout)."""
    return np.ascontiguousarray(a.transpose(0, 3, 2, 1, 4))


@numba.njit(nogil=True, cache=True)
def _permute_row(row, tab, r, dst_row, scatter):
    """One row: dst_row[p, c, q] = row[p, tab[t, r, c], q], or dst_row[p, tab[t, r, c], q] =
    row[p, c, q] if scatter. row, dst_row: (P, K, Q); tab (T, R, K)."""
    pp, cols, qq = row.shape
    nt = tab.shape[0]
    for p in range(pp):
        for q in range(qq):
            t = p * qq + q if nt > 1 else 0
            if scatter:
                for c in range(cols):
                    dst_row[p, tab[t, r, c], q] = row[p, c, q]
            else:
                for c in range(cols):
                    dst_row[p, c, q] = row[p, tab[t, r, c], q]


def _rows_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Passes A and C (and B on the transposed layout): permute within rows.

    src (N, R, P, K, Q), tab (T, R, K) -> (N, R, P, K, Q): gather
    ``dst[n, r, p, c, q] = src[n, r, p, tab[t, r, c], q]``, or its inverse if scatter.
    """
    return _permute_ref(src, tab, 3, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def _rows_nb(src, tab, dst, inplace, scatter):
    """Numba :func:`_rows_ref` into dst, parallel over rows. ``inplace`` must be True if dst is
    src (each row is then copied to a buffer first)."""
    nn, rows = src.shape[0], src.shape[1]
    for i in numba.prange(nn * rows):
        n, r = i // rows, i % rows
        row = src[n, r].copy() if inplace else src[n, r]
        _permute_row(row, tab, r, dst[n, r], scatter)


@numba.njit(nogil=True, cache=True)
def _tr4x16(w0, w1, w2, w3):
    """Transpose a 4 x 4 tile of uint16 lanes held in 4 uint64 words (lane j of word i -> lane i
    of word j; lane j is bits 16j..16j+15, little-endian)."""
    lo16, hi16 = np.uint64(0x0000FFFF0000FFFF), np.uint64(0xFFFF0000FFFF0000)
    lo32, hi32 = np.uint64(0x00000000FFFFFFFF), np.uint64(0xFFFFFFFF00000000)
    s16, s32 = np.uint64(16), np.uint64(32)
    t0 = (w0 & lo16) | ((w1 & lo16) << s16)
    t1 = ((w0 >> s16) & lo16) | (w1 & hi16)
    t2 = (w2 & lo16) | ((w3 & lo16) << s16)
    t3 = ((w2 >> s16) & lo16) | (w3 & hi16)
    return (t0 & lo32) | (t2 << s32), (t1 & lo32) | (t3 << s32), (t0 >> s32) | (t2 & hi32), \
        (t1 >> s32) | (t3 & hi32)


@numba.njit(nogil=True, cache=True)
def _word_tiles(buf, big, r0):
    """True if the block transpose between buf (h, P, K, Q) and big (N, K, P, R, Q) can move 4 x 4
    tiles of uint16 units as uint64 words (2-byte units, K, R, h and r0 multiples of 4). Only
    2-byte units gain from it (measured: 4-byte units in 2 x 2 tiles were not faster)."""
    h, cols, qq = buf.shape[0], buf.shape[2], buf.shape[3]
    return (_LITTLE_ENDIAN and qq * buf.itemsize == 2 and cols % 4 == 0 and big.shape[3] % 4 == 0
            and h % 4 == 0 and r0 % 4 == 0)


@numba.njit(nogil=True, cache=True)
def _move_units(buf, big, n, r0, store):
    """:func:`_move_t` one unit at a time."""
    h, pp, cols, qq = buf.shape
    for p in range(pp):
        for q in range(qq):
            for c in range(cols):
                for k in range(h):
                    if store:
                        big[n, c, p, r0 + k, q] = buf[k, p, c, q]
                    else:
                        buf[k, p, c, q] = big[n, c, p, r0 + k, q]


@numba.njit(nogil=True, cache=True)
def _move_t(buf, big, n, r0, store):
    """Blocked transpose between a row block and the transposed layout:
    store: big[n, c, p, r0 + k, q] = buf[k, p, c, q]; else buf[k, p, c, q] = big[n, c, p, r0 + k, q].
    buf (h, P, K, Q), big (N, K, P, R, Q). Moves 4 x 4 tiles of uint16 as uint64 words when
    :func:`_word_tiles` allows it (about 30% faster for the pixel scheme), else single units
    (the two uint16 lanes of a plane-scheme unit as one uint32)."""
    h, pp, cols, qq = buf.shape
    if not _word_tiles(buf, big, r0):
        if qq == 2 and buf.itemsize == 2:  # plane: move the 2 lanes of a unit as one uint32
            _move_units(buf.view(np.uint32), big.view(np.uint32), n, r0, store)
        else:
            _move_units(buf, big, n, r0, store)
        return
    b64 = buf.reshape(buf.size).view(np.uint64)
    g64 = big.reshape(big.size).view(np.uint64)
    cw, rw = cols // 4, big.shape[3] // 4  # words per sub-row of buf and of big
    bs, gs = pp * cw, pp * rw  # word strides between rows k of buf and between rows c of big
    for p in range(pp):
        for cj in range(cw):
            for k in range(0, h, 4):
                bi = (k * pp + p) * cw + cj  # the word holding buf[k, p, 4cj : 4cj + 4]
                gi = ((n * cols + 4 * cj) * pp + p) * rw + (r0 + k) // 4  # big[n, 4cj, p, r0 + k : +4]
                if store:
                    w0, w1, w2, w3 = _tr4x16(b64[bi], b64[bi + bs], b64[bi + 2 * bs], b64[bi + 3 * bs])
                    g64[gi], g64[gi + gs], g64[gi + 2 * gs], g64[gi + 3 * gs] = w0, w1, w2, w3
                else:
                    w0, w1, w2, w3 = _tr4x16(g64[gi], g64[gi + gs], g64[gi + 2 * gs], g64[gi + 3 * gs])
                    b64[bi], b64[bi + bs], b64[bi + 2 * bs], b64[bi + 3 * bs] = w0, w1, w2, w3


def _rows_to_t_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Permute within rows, then transpose: (N, R, P, K, Q) -> (N, K, P, R, Q).

    Gather: ``dst[n, c, p, r, q] = src[n, r, p, tab[t, r, c], q]`` (pass A into the scratch).
    """
    return _swap_rk(_rows_ref(src, tab, scatter))


@numba.njit(nogil=True, cache=True, parallel=True)
def _rows_to_t_nb(src, tab, dst, block, scatter):
    """Numba :func:`_rows_to_t_ref` into dst: permutes ``block`` rows into an L2-sized buffer,
    then writes the buffer out transposed (a blocked transpose fused with the row pass)."""
    nn, rows, pp, cols, qq = src.shape
    nb = (rows + block - 1) // block
    for i in numba.prange(nn * nb):
        n, r0 = i // nb, (i % nb) * block
        h = min(block, rows - r0)
        buf = np.empty((h, pp, cols, qq), src.dtype)
        for k in range(h):
            _permute_row(src[n, r0 + k], tab, r0 + k, buf[k], scatter)
        _move_t(buf, dst, n, r0, True)


def _t_to_rows_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Transpose, then permute within rows: (N, K, P, R, Q) -> (N, R, P, K, Q).

    Gather: ``dst[n, r, p, c, q] = src[n, tab[t, r, c], p, r, q]`` (pass C out of the scratch).
    """
    return _rows_ref(_swap_rk(src), tab, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def _t_to_rows_nb(src, tab, dst, block, scatter):
    """Numba :func:`_t_to_rows_ref` into dst: reads ``block`` rows from the transposed layout
    into a buffer, then permutes each buffered row into dst."""
    nn, cols, pp, rows, qq = src.shape
    nb = (rows + block - 1) // block
    for i in numba.prange(nn * nb):
        n, r0 = i // nb, (i % nb) * block
        h = min(block, rows - r0)
        buf = np.empty((h, pp, cols, qq), src.dtype)
        _move_t(buf, src, n, r0, False)
        for k in range(h):
            _permute_row(buf[k], tab, r0 + k, dst[n, r0 + k], scatter)


# Pass B without scratch (in place): strips of columns permuted through an L2-sized buffer.
# Slower than the transposed path here (see pipeline.bench.readout); kept for comparison.


def _cols_ref(src: np.ndarray, tabt: np.ndarray, scatter: bool) -> np.ndarray:
    """Pass B on the natural layout, tabt[t, r, c] = B[t, c, r] (T, R, K): gather
    ``dst[n, r, p, c, q] = src[n, tabt[t, r, c], p, c, q]``, or its inverse if scatter."""
    return _permute_ref(src, tabt, 1, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def _cols_nb(src, tabt, dst, tile, scatter):
    """Numba :func:`_cols_ref` into dst (may be src): each strip of ``tile`` columns is copied
    into a buffer (R x tile units) and permuted from there."""
    nn, rows, pp, cols, qq = src.shape
    nt = tabt.shape[0]
    strips = (cols + tile - 1) // tile
    for i in numba.prange(nn * strips):
        n, c0 = i // strips, (i % strips) * tile
        w = min(tile, cols - c0)
        buf = src[n, :, :, c0:c0 + w, :].copy()
        for r in range(rows):
            for p in range(pp):
                for q in range(qq):
                    t = p * qq + q if nt > 1 else 0
                    if scatter:
                        for c in range(w):
                            dst[n, tabt[t, r, c0 + c], p, c0 + c, q] = buf[r, p, c, q]
                    else:
                        for c in range(w):
                            dst[n, r, p, c0 + c, q] = buf[tabt[t, r, c0 + c], p, c, q]


def _flat_gather_ref(src: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Full-table gather: (N, M) units, (M,) table -> dst[n, s] = src[n, pi[s]]."""
    return src[:, pi]


@numba.njit(nogil=True, cache=True, parallel=True)
def _flat_gather_nb(src, pi, dst):
    """Numba :func:`_flat_gather_ref` into dst (N, M); parallel over chunks of slots."""
    nn, m = src.shape
    chunk = 16384
    chunks = (m + chunk - 1) // chunk
    for i in numba.prange(nn * chunks):
        n, j = i // chunks, i % chunks
        for s in range(j * chunk, min(m, (j + 1) * chunk)):
            dst[n, s] = src[n, pi[s]]


# ----------------------------------------------------------------------------------------------
# Schemes
# ----------------------------------------------------------------------------------------------


def _layout(scheme: str) -> tuple[int, int, np.dtype]:
    """(P, Q, unit dtype) of a scheme's 5-d unit view (N, R, P, K, Q)."""
    if scheme == "pixel":
        return 1, 1, np.dtype(np.uint16)
    if scheme == "quad":
        return 2, 1, np.dtype(np.uint32)
    return 2, 2, np.dtype(np.uint16)


def _units(frames: np.ndarray, scheme: str) -> np.ndarray:
    """(N, H, W) C-contiguous uint16 (4-byte aligned for quad) -> (N, R, P, K, Q) view."""
    n, height, width = frames.shape
    p, q, dt = _layout(scheme)
    if scheme == "pixel":
        return frames.reshape(n, height, 1, width, 1)
    return frames.view(dt).reshape(n, height // 2, p, width // 2, q)


def _block_rows(units: np.ndarray) -> int:
    """Rows per block of the transposing kernels: up to _BLOCK_BYTES of buffer, 8 to 64 rows, a
    multiple of 4 (for the word tiles of :func:`_move_t`). 64 measured best for 12 MP frames."""
    row_bytes = units[0, 0].nbytes
    return int(max(8, min(64, _BLOCK_BYTES // max(1, row_bytes))) // 4 * 4)


def _tile_units(scheme: str) -> int:
    """Columns per strip of the strip kernels: _TILE_BYTES of contiguous data per sub-row."""
    _, q, dt = _layout(scheme)
    return max(1, _TILE_BYTES // (q * dt.itemsize))


def _aligned(frames: np.ndarray) -> np.ndarray:
    """frames if C-contiguous and 4-byte aligned (needed by the quad uint32 view), else a copy."""
    if frames.flags.c_contiguous and frames.ctypes.data % 4 == 0:
        return frames
    return frames.copy()


def _forward_units(x5: np.ndarray, tabs: tuple[np.ndarray, ...], y5: np.ndarray) -> None:
    """Three passes x5 -> y5 (N, R, P, K, Q) through a transposed scratch (N, K, P, R, Q).

    Pass A is fused with a blocked transpose into the scratch, pass B is then a row gather of
    the scratch (in place, rows of length R stay in L1), and pass C is fused with the blocked
    transpose back. y5 may be x5.
    """
    a, b, c = tabs
    n, rows, p, cols, q = x5.shape
    block = _block_rows(x5)
    scratch = np.empty((n, cols, p, rows, q), x5.dtype)
    _rows_to_t_nb(x5, a, scratch, block, False)
    _rows_nb(scratch, b, scratch, True, False)
    _t_to_rows_nb(scratch, c, y5, block, False)


def _inverse_units(y5: np.ndarray, tabs: tuple[np.ndarray, ...], x5: np.ndarray) -> None:
    """Exact inverse of :func:`_forward_units` (scatters through the same tables). x5 may be y5."""
    a, b, c = tabs
    n, rows, p, cols, q = y5.shape
    block = _block_rows(y5)
    scratch = np.empty((n, cols, p, rows, q), y5.dtype)
    _rows_to_t_nb(y5, c, scratch, block, True)
    _rows_nb(scratch, b, scratch, True, True)
    _t_to_rows_nb(scratch, a, x5, block, True)


@dataclass(frozen=True)
class ReadoutPermutation:
    """A keyed readout permutation of (H, W) uint16 frames. ``repr`` never shows the seed.

    Tables are built on first use (numba; about 0.1-0.2 s for a 12 MP frame) and cached.
    """

    scheme: str
    height: int
    width: int
    seed: int = field(repr=False, hash=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        h, w = _check_shape(self.scheme, self.height, self.width)
        object.__setattr__(self, "height", h)
        object.__setattr__(self, "width", w)
        object.__setattr__(self, "seed", _check_seed(self.seed))

    # -- tables ----------------------------------------------------------------------------------

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pass tables stacked per lane: A (T, R, K), B (T, K, R), C (T, R, K); T = 4 for plane,
        else 1. Built once and cached."""
        tabs = self._cache.get("tables")
        if tabs is None:
            rows, cols = grid_shape(self.scheme, self.height, self.width)
            per_seed = [three_pass_tables(s, rows, cols) for s in scheme_seeds(self.scheme, self.seed)]
            tabs = tuple(np.stack([t[i] for t in per_seed]) for i in range(3))
            self._cache["tables"] = tabs
        return tabs

    def plane_tables(self) -> np.ndarray:
        """Slot->item tables of the permuted grid(s), int64.

        Returns:
            pixel (H*W,); quad (h*w,), shared by the 4 packed planes; plane (4, h*w).
        """
        a, b, c = self.kernel_tables()
        tabs = np.stack([_compose_nb(a[k], b[k], c[k]) for k in range(a.shape[0])])
        return tabs if self.scheme == "plane" else tabs[0]

    def table(self) -> np.ndarray:
        """(H*W,) int64 ``pi`` with ``forward(frame).flat[s] == frame.flat[pi[s]]``."""
        return frame_table(self.scheme, self.height, self.width, self.plane_tables())

    # -- frames ----------------------------------------------------------------------------------

    def _prepare(self, frame: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Validate; return src and dst as (N, H, W) C-contiguous, 4-byte aligned uint16 arrays."""
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"frame: expected a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint16:
            raise ValueError(f"frame: expected dtype uint16, got {frame.dtype}")
        h, w = self.height, self.width
        if frame.ndim not in (2, 3) or frame.shape[-2:] != (h, w):
            raise ValueError(f"frame: expected shape ({h}, {w}) or (B, {h}, {w}), got {frame.shape}")
        src = frame if frame.ndim == 3 else frame[None]
        if out is None:
            return _aligned(src), np.empty(src.shape, np.uint16)
        if not isinstance(out, np.ndarray) or out.dtype != np.uint16 or out.shape != frame.shape:
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"out: expected a uint16 array of shape {frame.shape}, got {got}")
        if not out.flags.c_contiguous or out.ctypes.data % 4:
            raise ValueError("out: expected a C-contiguous array aligned to 4 bytes")
        dst = out if out.ndim == 3 else out[None]
        if out is frame:
            return dst, dst
        if np.may_share_memory(out, frame):
            raise ValueError("out: overlaps frame without being frame itself")
        return _aligned(src), dst

    def forward(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Protect: the permuted readout of frame (H, W) or (B, H, W) uint16, same shape back.

        ``out`` (same shape, C-contiguous) receives the result; it may be ``frame`` itself.
        """
        src, dst = self._prepare(frame, out)
        _forward_units(_units(src, self.scheme), self.kernel_tables(), _units(dst, self.scheme))
        return dst if frame.ndim == 3 else dst[0]

    def inverse(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Exact restore of :meth:`forward`'s output (H, W) or (B, H, W) uint16."""
        src, dst = self._prepare(frame, out)
        _inverse_units(_units(src, self.scheme), self.kernel_tables(), _units(dst, self.scheme))
        return dst if frame.ndim == 3 else dst[0]


def readout_permutation(key: Key, scheme: str, height: int, width: int,
                        frame_index: int | None = None) -> ReadoutPermutation:
    """The readout permutation of ``key`` for a scheme and frame size (rotated if frame_index)."""
    _check_shape(_check_scheme(scheme), height, width)
    return ReadoutPermutation(scheme, height, width, readout_seed(key, scheme, frame_index))
