"""Kernels of the keyed readout (:mod:`sensor.readout`): the three passes over unit arrays.

Frames are viewed as 5-d arrays (N, R, P, K, Q) of "units": pixel (N, H, 1, W, 1) uint16; quad
(N, h, 2, w, 1) uint32 (a unit is the horizontal pixel pair of one cell row); plane
(N, h, 2, w, 2) uint16 with one table per (p, q) lane. Kernel tables are A (T, R, K),
B (T, K, R), C (T, R, K) with T = 1, or 4 for plane (lane t = p*Q + q); they come from
:mod:`sensor.readout_tables`. Pass A is fused with a blocked transpose into a scratch
(N, K, P, R, Q), pass B is a row gather of that scratch and pass C is fused with the blocked
transpose back (:func:`forward_units`, :func:`inverse_units`).

Each numba kernel (``*_nb``) has a plain numpy reference (``*_ref``) next to it, bit-for-bit
equal. Two kernels are measured baselines only (:mod:`pipeline.bench.readout`), not used by the
readout: :func:`cols_nb` (pass B in place on column strips, slower than the transposed path)
and :func:`flat_gather_nb` (a gather through the whole composed table).
"""

from __future__ import annotations

import sys

import numba
import numpy as np

from .readout_tables import Scheme

_BLOCK_BYTES = 1 << 20  # row-block buffer of the transposing kernels (about one L2)
_LITTLE_ENDIAN = sys.byteorder == "little"  # the uint64 word tiles assume little-endian lanes
_TILE_BYTES = 128  # column strips of the strip kernels are this many bytes wide per sub-row


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


def swap_rk(a: np.ndarray) -> np.ndarray:
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


def rows_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Passes A and C (and B on the transposed layout): permute within rows.

    src (N, R, P, K, Q), tab (T, R, K) -> (N, R, P, K, Q): gather
    ``dst[n, r, p, c, q] = src[n, r, p, tab[t, r, c], q]``, or its inverse if scatter.
    """
    return _permute_ref(src, tab, 3, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def rows_nb(src, tab, dst, inplace, scatter):
    """Numba :func:`rows_ref` into dst, parallel over rows. ``inplace`` must be True if dst is
    src (each row is then copied to a buffer first)."""
    nn, rows = src.shape[0], src.shape[1]
    for i in numba.prange(nn * rows):
        n, r = i // rows, i % rows
        row = src[n, r].copy() if inplace else src[n, r]
        _permute_row(row, tab, r, dst[n, r], scatter)


@numba.njit(nogil=True, cache=True)
def tr4x16(w0, w1, w2, w3):
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
                    w0, w1, w2, w3 = tr4x16(b64[bi], b64[bi + bs], b64[bi + 2 * bs], b64[bi + 3 * bs])
                    g64[gi], g64[gi + gs], g64[gi + 2 * gs], g64[gi + 3 * gs] = w0, w1, w2, w3
                else:
                    w0, w1, w2, w3 = tr4x16(g64[gi], g64[gi + gs], g64[gi + 2 * gs], g64[gi + 3 * gs])
                    b64[bi], b64[bi + bs], b64[bi + 2 * bs], b64[bi + 3 * bs] = w0, w1, w2, w3


def rows_to_t_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Permute within rows, then transpose: (N, R, P, K, Q) -> (N, K, P, R, Q).

    Gather: ``dst[n, c, p, r, q] = src[n, r, p, tab[t, r, c], q]`` (pass A into the scratch).
    """
    return swap_rk(rows_ref(src, tab, scatter))


@numba.njit(nogil=True, cache=True, parallel=True)
def rows_to_t_nb(src, tab, dst, block, scatter):
    """Numba :func:`rows_to_t_ref` into dst: permutes ``block`` rows into an L2-sized buffer,
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


def t_to_rows_ref(src: np.ndarray, tab: np.ndarray, scatter: bool) -> np.ndarray:
    """Transpose, then permute within rows: (N, K, P, R, Q) -> (N, R, P, K, Q).

    Gather: ``dst[n, r, p, c, q] = src[n, tab[t, r, c], p, r, q]`` (pass C out of the scratch).
    """
    return rows_ref(swap_rk(src), tab, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def t_to_rows_nb(src, tab, dst, block, scatter):
    """Numba :func:`t_to_rows_ref` into dst: reads ``block`` rows from the transposed layout
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


# Measured baselines (pipeline.bench.readout), not used by the readout. Pass B without scratch (in
# place): strips of columns permuted through an L2-sized buffer, slower than the transposed path
# here. And a gather through the whole composed table.


def cols_ref(src: np.ndarray, tabt: np.ndarray, scatter: bool) -> np.ndarray:
    """Pass B on the natural layout, tabt[t, r, c] = B[t, c, r] (T, R, K): gather
    ``dst[n, r, p, c, q] = src[n, tabt[t, r, c], p, c, q]``, or its inverse if scatter."""
    return _permute_ref(src, tabt, 1, scatter)


@numba.njit(nogil=True, cache=True, parallel=True)
def cols_nb(src, tabt, dst, tile, scatter):
    """Numba :func:`cols_ref` into dst (may be src): each strip of ``tile`` columns is copied
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


def flat_gather_ref(src: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Full-table gather: (N, M) units, (M,) table -> dst[n, s] = src[n, pi[s]]."""
    return src[:, pi]


@numba.njit(nogil=True, cache=True, parallel=True)
def flat_gather_nb(src, pi, dst):
    """Numba :func:`flat_gather_ref` into dst (N, M); parallel over chunks of slots."""
    nn, m = src.shape
    chunk = 16384
    chunks = (m + chunk - 1) // chunk
    for i in numba.prange(nn * chunks):
        n, j = i // chunks, i % chunks
        for s in range(j * chunk, min(m, (j + 1) * chunk)):
            dst[n, s] = src[n, pi[s]]


# ----------------------------------------------------------------------------------------------
# Unit views of frames, and the three passes composed
# ----------------------------------------------------------------------------------------------


def _layout(scheme: Scheme) -> tuple[int, int, np.dtype]:
    """(P, Q, unit dtype) of a scheme's 5-d unit view (N, R, P, K, Q)."""
    if scheme == "pixel":
        return 1, 1, np.dtype(np.uint16)
    if scheme == "quad":
        return 2, 1, np.dtype(np.uint32)
    return 2, 2, np.dtype(np.uint16)


def unit_view(frames: np.ndarray, scheme: Scheme) -> np.ndarray:
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


def tile_units(scheme: Scheme) -> int:
    """Columns per strip of :func:`cols_nb`: _TILE_BYTES of contiguous data per sub-row."""
    _, q, dt = _layout(scheme)
    return max(1, _TILE_BYTES // (q * dt.itemsize))


def aligned(frames: np.ndarray) -> np.ndarray:
    """frames if C-contiguous and 4-byte aligned (needed by the quad uint32 view), else a copy."""
    if frames.flags.c_contiguous and frames.ctypes.data % 4 == 0:
        return frames
    return frames.copy()


def scratch_for(units: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """The transposed scratch (N, K, P, R, Q) for units (N, R, P, K, Q): ``scratch`` when it fits
    (reusing one avoids faulting in a frame-sized buffer on every call), else a new one."""
    n, rows, p, cols, q = units.shape
    shape = (n, cols, p, rows, q)
    if scratch is not None and scratch.nbytes >= units.nbytes:
        return scratch.reshape(-1).view(np.uint8)[:units.nbytes].view(units.dtype).reshape(shape)
    return np.empty(shape, units.dtype)


def forward_units(x5: np.ndarray, tabs: tuple[np.ndarray, ...], y5: np.ndarray,
                  scratch: np.ndarray | None = None) -> None:
    """Three passes x5 -> y5 (N, R, P, K, Q) through a transposed scratch (N, K, P, R, Q).

    Pass A is fused with a blocked transpose into the scratch, pass B is then a row gather of
    the scratch (in place, rows of length R stay in L1), and pass C is fused with the blocked
    transpose back. y5 may be x5. ``scratch``: an optional reusable buffer (:func:`scratch_for`).
    """
    a, b, c = tabs
    block = _block_rows(x5)
    scratch = scratch_for(x5, scratch)
    rows_to_t_nb(x5, a, scratch, block, False)
    rows_nb(scratch, b, scratch, True, False)
    t_to_rows_nb(scratch, c, y5, block, False)


def inverse_units(y5: np.ndarray, tabs: tuple[np.ndarray, ...], x5: np.ndarray,
                  scratch: np.ndarray | None = None) -> None:
    """Exact inverse of :func:`forward_units` (scatters through the same tables). x5 may be y5."""
    a, b, c = tabs
    block = _block_rows(y5)
    scratch = scratch_for(y5, scratch)
    rows_to_t_nb(y5, c, scratch, block, True)
    rows_nb(scratch, b, scratch, True, True)
    t_to_rows_nb(scratch, a, x5, block, True)
