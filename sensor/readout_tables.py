"""Tables of the keyed readout (:mod:`sensor.readout`): subkeys, scheme geometry, three-pass tables.

Permutation family ("three-pass"). For a grid of ``R`` rows x ``K`` columns, a 32-byte readout
subkey and a plane ``t`` (0 except for the plane scheme), each pass table is a set of keyed
row permutations (:func:`sensor.permutation.row_permutations`: AES-256-CTR keystream, Fisher-Yates)
from its own keystream, ``stream = 3 * t + p`` for pass ``p`` = 0, 1, 2:

* ``A`` (R, K): a permutation of each row (stream ``3t``);
* ``B`` (K, R): a permutation of each column (stream ``3t + 1``);
* ``C`` (R, K): a permutation of each row (stream ``3t + 2``).

Pass A ``a[r, c] = x[r, A[r, c]]``, pass B ``b[r, c] = a[B[c, r], c]``, pass C
``y[r, c] = b[r, C[r, c]]``. The composed slot->item table (see :mod:`sensor.permutation`) is
``pi[r*K + c] = r'*K + A[r', c']`` with ``c' = C[r, c]`` and ``r' = B[c', r]``, so
``y.flat[s] = x.flat[pi[s]]``. Every pixel lands on a uniformly distributed slot of the whole
grid and horizontal or vertical neighbours land (almost) independently, while each pass only
permutes within rows or within columns, which keeps the readout cache friendly.

The scheme names (:data:`SCHEMES`, :data:`Scheme`) are defined here, once. The ``plane`` scheme
permutes packed CFA plane k with its own three-pass permutation (``t = k``); pixel and quad use
``t = 0``. :data:`TABLE_FORMAT` names this derivation; recordings carry it and a reader refuses
another.

Each table builder has a plain reference (``*_numpy``) and a numba version (bit-for-bit equal).
The network builds its per-frame tables with the same functions on the CPU and copies them to
its device (:mod:`models.tables`).
"""

from __future__ import annotations

from typing import Literal, cast, get_args

import numba
import numpy as np

from .permutation import check_subkey, fill_row_permutations, row_permutations

Scheme = Literal["pixel", "quad", "plane"]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
TABLE_FORMAT = 2  # 1: keyed-hash sort keys (privcam 0.1); 2: AES-256-CTR + Fisher-Yates

_INDEX_LIMIT = 1 << 32  # pixels per frame

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


def plane_count(scheme: Scheme) -> int:
    """Independent three-pass permutations of a scheme: 4 for plane (one per CFA plane), else 1."""
    return 4 if check_scheme(scheme) == "plane" else 1


def grid_shape(scheme: Scheme, height: int, width: int) -> tuple[int, int]:
    """(R, K) of the permuted grid: (H, W) for pixel, (H/2, W/2) cells otherwise."""
    height, width = check_shape(check_scheme(scheme), height, width)
    return (height, width) if scheme == "pixel" else (height // 2, width // 2)


def table_dtype(rows: int, cols: int) -> np.dtype:
    """Storage dtype of pass tables: uint16 while indices fit (halves the bandwidth), else int32."""
    return np.dtype(np.uint16) if max(rows, cols) < 65536 else np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------
# Three-pass tables: plain reference and numba (same result); the network copies them to its device
# ----------------------------------------------------------------------------------------------


def three_pass_tables_numpy(subkey: bytes, rows: int, cols: int, plane: int = 0
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables of the three passes of ``plane``, shuffled by the plain Python reference.

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    return _three_pass(subkey, rows, cols, plane, reference=True)


def three_pass_tables(subkey: bytes, rows: int, cols: int, plane: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same tables as :func:`three_pass_tables_numpy`, shuffled by numba.

    Returns:
        A (rows, cols), B (cols, rows), C (rows, cols); uint16 if rows, cols < 65536 else int32.
    """
    return _three_pass(subkey, rows, cols, plane, reference=False)


def _three_pass(subkey: bytes, rows: int, cols: int, plane: int, reference: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    subkey = check_subkey(subkey)
    dt = table_dtype(rows, cols)
    shapes = ((rows, cols), (cols, rows), (rows, cols))
    if reference:
        a, b, c = (row_permutations(subkey, 3 * plane + p, n_rows, n_cols, dt, reference=True)
                   for p, (n_rows, n_cols) in enumerate(shapes))
        return a, b, c
    a, b, c = (np.empty(shape, dt) for shape in shapes)
    fill_row_permutations(subkey, [(3 * plane, a), (3 * plane + 1, b), (3 * plane + 2, c)])
    return a, b, c


def stacked_tables(subkey: bytes, rows: int, cols: int, planes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`three_pass_tables` of planes 0 .. planes-1 stacked, built in one pipelined call.

    Returns:
        A (planes, rows, cols), B (planes, cols, rows), C (planes, rows, cols); A[t], B[t], C[t]
        are ``three_pass_tables(subkey, rows, cols, t)``.
    """
    subkey = check_subkey(subkey)
    dt = table_dtype(rows, cols)
    a, b, c = (np.empty((planes, *shape), dt) for shape in ((rows, cols), (cols, rows), (rows, cols)))
    fill_row_permutations(subkey, [(3 * t + p, tab[t]) for t in range(planes) for p, tab in enumerate((a, b, c))])
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
def _compose_nb(a, b, c, out):
    """Numba :func:`compose_table_numpy` into ``out`` (R*K,) int64."""
    rows, cols = a.shape
    for r in numba.prange(rows):
        for k in range(cols):
            cp = np.int64(c[r, k])
            rp = np.int64(b[cp, r])
            out[r * cols + k] = rp * cols + np.int64(a[rp, cp])
    return out


def compose_table(a: np.ndarray, b: np.ndarray, c: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Numba twin of :func:`compose_table_numpy`: (R, K), (K, R), (R, K) -> (R*K,) int64, written into
    ``out`` when given (a C-contiguous (R*K,) int64 array, e.g. a row of a batch's tables)."""
    rows, cols = a.shape
    if out is None:
        out = np.empty(rows * cols, np.int64)
    elif out.dtype != np.int64 or out.shape != (rows * cols,) or not out.flags.c_contiguous:
        raise ValueError(f"compose_table: out: expected a C-contiguous ({rows * cols},) int64 array, got "
                         f"{out.dtype} {out.shape}")
    return _compose_nb(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(c), out)


def plane_tables(scheme: Scheme, height: int, width: int, subkey: bytes) -> np.ndarray:
    """Per-plane slot->item tables (numba), as :meth:`sensor.readout.ReadoutPermutation.plane_tables`.

    Returns:
        int64: pixel (H*W,); quad (h*w,), shared by the 4 packed planes; plane (4, h*w).
    """
    rows, cols = grid_shape(scheme, height, width)
    return composed_planes(scheme, *stacked_tables(subkey, rows, cols, plane_count(scheme)))


def composed_planes(scheme: Scheme, a: np.ndarray, b: np.ndarray, c: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """:func:`plane_tables` from pass tables already built (:func:`stacked_tables`; the sensor's
    :meth:`sensor.readout.ReadoutPermutation.kernel_tables`): A (T, R, K), B (T, K, R), C (T, R, K).

    Returns:
        int64: (R*K,) for pixel and quad, (4, R*K) for plane; ``out`` (that shape) when given.
    """
    planes, rows, cols = a.shape
    shape = (4, rows * cols) if scheme == "plane" else (rows * cols,)
    if out is None:
        out = np.empty(shape, np.int64)
    elif out.shape != shape:
        raise ValueError(f"composed_planes: out: expected shape {shape}, got {out.shape}")
    rows_out = out.reshape(planes, rows * cols)  # a view: out is C-contiguous (compose_table checks)
    for t in range(planes):
        compose_table(a[t], b[t], c[t], rows_out[t])
    return out


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


