"""Tables of the keyed readout (:mod:`sensor.readout`): seeds, scheme geometry, three-pass tables.

Permutation family ("three-pass"). For a grid of ``R`` rows x ``K`` columns and a 62-bit seed:

* pass seeds ``seed_a, seed_b, seed_c = hash62(seed, 0), hash62(seed, 1), hash62(seed, 2)``
  (:func:`sensor.permutation.hash62`);
* ``A`` (R, K): ``A[r] = argsort_c hash(seed_a, r*K + c)`` (stable), a permutation of each row;
* ``B`` (K, R): ``B[c] = argsort_r hash(seed_b, c*R + r)``, a permutation of each column;
* ``C`` (R, K): like ``A`` with ``seed_c``.

Pass A ``a[r, c] = x[r, A[r, c]]``, pass B ``b[r, c] = a[B[c, r], c]``, pass C
``y[r, c] = b[r, C[r, c]]``. The composed slot->item table (see :mod:`sensor.permutation`) is
``pi[r*K + c] = r'*K + A[r', c']`` with ``c' = C[r, c]`` and ``r' = B[c', r]``, so
``y.flat[s] = x.flat[pi[s]]``. Every pixel lands on a uniformly distributed slot of the whole
grid and horizontal or vertical neighbours land (almost) independently, while each pass only
permutes within rows or within columns, which keeps the readout cache friendly.

The scheme names (:data:`SCHEMES`, :data:`Scheme`) are defined here, once. The ``plane`` scheme
permutes packed CFA plane k with its own three-pass permutation seeded ``hash62(seed, 16 + k)``.

Each table builder has a plain numpy reference (``*_numpy`` or ``*_ref``) and a numba version
(bit-for-bit equal); the torch twins, built on any device, are in :mod:`models.tables`.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

import numba
import numpy as np

from .permutation import hash62, round_keys

Scheme = Literal["pixel", "quad", "plane"]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)

_PASS_LABELS = (0, 1, 2)  # seed_a, seed_b, seed_c = hash62(seed, label)
_PLANE_LABEL0 = 16  # plane k of the plane scheme is seeded hash62(seed, 16 + k)
_SEED_LIMIT = 1 << 62
_INDEX_LIMIT = 1 << 32  # hash62 indices (r*K + c) must stay below 2**32

# ----------------------------------------------------------------------------------------------
# Validation, seeds and geometry
# ----------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_scheme(scheme: str) -> Scheme:
    """Return scheme if it is one of SCHEMES, else raise ValueError naming the argument."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    return cast(Scheme, scheme)


def check_seed(seed: int, name: str = "seed") -> int:
    """Validate a 62-bit seed; the message never contains the value (it derives from the key)."""
    if not _is_int(seed):
        raise ValueError(f"{name}: expected an int in [0, 2**62), got a {type(seed).__name__}")
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"{name}: expected an int in [0, 2**62), got a value out of range")
    return int(seed)


def check_frame_index(frame_index: int) -> int:
    """Validate a frame counter (a non-negative int) of a rotated readout; returns it as an int."""
    if not _is_int(frame_index) or frame_index < 0:
        raise ValueError(f"frame_index: expected None or a non-negative int, got {frame_index!r}")
    return int(frame_index)


def check_shape(scheme: Scheme, height: int, width: int) -> tuple[int, int]:
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


def pass_seeds(seed: int) -> tuple[int, int, int]:
    """(seed_a, seed_b, seed_c) of the three passes: ``hash62(seed, 0 | 1 | 2)``."""
    seed = check_seed(seed)
    sa, sb, sc = (int(hash62(seed, label)) for label in _PASS_LABELS)
    return sa, sb, sc


def scheme_seeds(scheme: Scheme, seed: int) -> list[int]:
    """Three-pass seeds of a scheme: [seed] for pixel and quad, the 4 plane seeds for plane."""
    seed = check_seed(seed)
    if check_scheme(scheme) == "plane":
        return [int(hash62(seed, _PLANE_LABEL0 + k)) for k in range(4)]
    return [seed]


def grid_shape(scheme: Scheme, height: int, width: int) -> tuple[int, int]:
    """(R, K) of the permuted grid: (H, W) for pixel, (H/2, W/2) cells otherwise."""
    height, width = check_shape(check_scheme(scheme), height, width)
    return (height, width) if scheme == "pixel" else (height // 2, width // 2)


def table_dtype(rows: int, cols: int) -> np.dtype:
    """Storage dtype of pass tables: uint16 while indices fit (halves the bandwidth), else int32."""
    return np.dtype(np.uint16) if max(rows, cols) < 65536 else np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------
# Keyed hash in numba (bit-identical to sensor.permutation.hash62)
# ----------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _mix32_nb(x):
    """lowbias32 on a uint64 holding a 32-bit lane (the mix of sensor.permutation.hash62)."""
    m = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


@numba.njit(nogil=True, cache=True)
def _hash62_nb(k, idx):
    """hash62 of one uint64 index < 2**32; k is :func:`round_keys_nb` of the seed."""
    a = _mix32_nb(_mix32_nb(_mix32_nb(idx ^ k[0]) ^ k[1]) ^ k[2])
    b = _mix32_nb(_mix32_nb(_mix32_nb(idx ^ k[3]) ^ k[4]) ^ k[5])
    m31 = np.uint64(0x7FFFFFFF)
    return ((a & m31) << np.uint64(31)) | (b & m31)


def round_keys_nb(seed: int) -> np.ndarray:
    """Round keys of ``seed`` as the (6,) uint64 array the numba hash takes."""
    return np.array(round_keys(int(seed)), np.uint64)


@numba.njit(nogil=True, cache=True, parallel=True)
def hash62_array_nb(k, n):
    """(n,) uint64: hash62(seed, arange(n)) with k = round_keys_nb(seed). Checks the numba hash."""
    out = np.empty(n, np.uint64)
    for i in numba.prange(n):
        out[i] = _hash62_nb(k, np.uint64(i))
    return out


# ----------------------------------------------------------------------------------------------
# Stable argsort of 62-bit keys: bucket by the top bits, then insertion sort (expected O(n))
# ----------------------------------------------------------------------------------------------


def argsort62_ref(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of (n,) uint64 keys < 2**62 (ties by index). Returns (n,) int64."""
    return np.argsort(keys, kind="stable").astype(np.int64)


@numba.njit(nogil=True, cache=True)
def argsort62_nb(keys, order, counts):
    """Numba :func:`argsort62_ref` into order (n,) int64; counts is (nb + 1,) int64 scratch with
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


def argsort62_buckets(n: int) -> int:
    """Smallest power of two >= n (bucket count of :func:`argsort62_nb`)."""
    return 1 << max(0, int(n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Three-pass tables: numpy (reference) and numba (fast, same result); torch twins in models.tables
# ----------------------------------------------------------------------------------------------


def row_perms_ref(seed: int, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) int64: row r = stable argsort over c of hash62(seed, r*cols + c)."""
    keys = hash62(seed, np.arange(rows * cols, dtype=np.uint64)).reshape(rows, cols)
    return np.argsort(keys, axis=1, kind="stable")


@numba.njit(nogil=True, cache=True, parallel=True)
def row_perms_nb(k, out):
    """Numba :func:`row_perms_ref` written into out (rows, cols) of an integer dtype; k = round_keys_nb(seed)."""
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
        argsort62_nb(keys, order, counts)
        for c in range(cols):
            out[r, c] = order[c]


def three_pass_tables_numpy(seed: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables of the three passes, plain numpy (the reference definition).

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    sa, sb, sc = pass_seeds(seed)
    dt = table_dtype(rows, cols)
    return (row_perms_ref(sa, rows, cols).astype(dt), row_perms_ref(sb, cols, rows).astype(dt),
            row_perms_ref(sc, rows, cols).astype(dt))


def three_pass_tables(seed: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same tables as :func:`three_pass_tables_numpy`, built by numba (about 10x faster).

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    sa, sb, sc = pass_seeds(seed)
    dt = table_dtype(rows, cols)
    a, b, c = np.empty((rows, cols), dt), np.empty((cols, rows), dt), np.empty((rows, cols), dt)
    for s, out in ((sa, a), (sb, b), (sc, c)):
        row_perms_nb(round_keys_nb(s), out)
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



def plane_tables(scheme: Scheme, height: int, width: int, seed: int) -> np.ndarray:
    """Per-plane slot->item tables (numba), as :meth:`sensor.readout.ReadoutPermutation.plane_tables`.

    Returns:
        int64: pixel (H*W,); quad (h*w,), shared by the 4 packed planes; plane (4, h*w).
    """
    rows, cols = grid_shape(scheme, height, width)
    tabs = [compose_table(*three_pass_tables(s, rows, cols)) for s in scheme_seeds(scheme, seed)]
    return np.stack(tabs) if scheme == "plane" else tabs[0]


def frame_table(scheme: Scheme, height: int, width: int, tables: np.ndarray) -> np.ndarray:
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


