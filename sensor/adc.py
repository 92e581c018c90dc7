"""The photon-to-DN chain as numba kernels, each with a plain numpy reference beside it.

:func:`expose_nb` is the whole ADC stage with the noise drawn inside, from a counter-based
generator keyed by (seed, frame, pixel) (:mod:`sensor.noise`), so a frame depends only on
(seed, frame index), never on thread count or scheduling. Kernels and references run the same
IEEE operations in the same order and agree bit for bit (no fastmath, so no FMA contraction).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .noise import (
    INVERSION_BELOW,
    NORMAL_FROM,
    SHOT_BLOCK,
    pixel_noise_ref,
    pixel_noise_words,
    ptrs_poisson,
    ptrs_trial,
    row_blocks,
    row_ziggurat_fast,
)

ROWS_PER_TASK = 16  # rows per parallel task of expose_nb


@numba.njit(nogil=True, parallel=True, cache=True)
def electron_mean_nb(photons: np.ndarray, qe_prnu: np.ndarray, dark_e: np.ndarray) -> np.ndarray:
    """Mean electrons per pixel: photons * QE * PRNU + dark electrons. All (H, W) float64."""
    h, w = photons.shape
    out = np.empty((h, w), np.float64)
    for r in numba.prange(h):
        for c in range(w):
            out[r, c] = photons[r, c] * qe_prnu[r, c] + dark_e[r, c]
    return out


def electron_mean_ref(photons: np.ndarray, qe_prnu: np.ndarray, dark_e: np.ndarray) -> np.ndarray:
    """numpy reference of :func:`electron_mean_nb`."""
    return photons * qe_prnu + dark_e


@numba.njit(nogil=True, cache=True)
def _dn(electrons, z, full_well_e, gain_dn_per_e, read_noise_dn, black_level_dn, max_dn):
    """Shot-noise electrons and read-noise z -> DN: clip, gain, read noise, quantise, black level, clip."""
    e = electrons if electrons < full_well_e else full_well_e
    q = np.floor(e * gain_dn_per_e + read_noise_dn * z + 0.5) + black_level_dn
    q = q if q > 0.0 else 0.0
    return np.uint16(np.int32(q if q < max_dn else max_dn))


@numba.njit(nogil=True, cache=True)
def row_scratch(w):
    """The scratch arrays of :func:`expose_row` for rows of ``w`` pixels."""
    return (np.empty((4, w), np.uint32), np.empty((4, w), np.uint32), np.empty((2, w), np.float64),
            np.empty((2, w), np.bool_), np.empty(w, np.float64), np.empty((5, w), np.float64), np.empty(w, np.bool_))


@numba.njit(nogil=True, cache=True, error_model="numpy")  # no ZeroDivisionError branches: vectorises
def expose_row(photons, qe_prnu, dark_e, first_pixel, f0, f1, k0, k1, full_well_e, gain_dn_per_e, read_noise_dn,
               black_level_dn, max_dn, out, words, ptrs, z, fast, lam, trial, quick):
    """One row of :func:`expose_nb`: (W,) float64 inputs -> out (W,) uint16; its pixels are numbered
    from ``first_pixel`` (np.uint64). The rest is scratch of at least W columns: words, ptrs (4, W)
    uint32, z (2, W) float64, fast (2, W) bool, lam (W,) float64, trial (5, W) float64 (PTRS's first
    trial: k, us, v, a, b), quick (W,) bool (:func:`row_scratch`).

    Blocks 0 and 1 of every pixel (:func:`sensor.noise.row_blocks`), the ziggurat's fast path of both
    normals, then one branch-free loop that LLVM vectorises: the shot noise as the normal
    approximation (``lam >= NORMAL_FROM``) or PTRS's first trial, the rest of the chain, and whether
    that was the whole draw; last, pixel by pixel, the draws it was not (a slow ziggurat path, a
    rejected first trial, fewer than ``INVERSION_BELOW`` electrons) through
    :func:`sensor.noise.pixel_noise_words`, from block 0 as any pixel."""
    w = photons.shape[0]
    row_blocks(first_pixel, w, np.uint64(0), f0, f1, k0, k1, words)
    row_blocks(first_pixel, w, np.uint64(SHOT_BLOCK), f0, f1, k0, k1, ptrs)
    row_ziggurat_fast(words, w, z, fast)
    for c in range(w):  # branch-free: vectorised
        lam[c] = photons[c] * qe_prnu[c] + dark_e[c]
        normal = np.floor(lam[c] + math.sqrt(lam[c]) * z[0, c] + 0.5)
        normal = normal if normal > 0.0 else 0.0
        k, us, v, q, a, b = ptrs_trial(lam[c], np.uint64(ptrs[0, c]), np.uint64(ptrs[1, c]), np.uint64(ptrs[2, c]),
                                       np.uint64(ptrs[3, c]))
        trial[0, c], trial[1, c], trial[2, c], trial[3, c], trial[4, c] = k, us, v, a, b
        quick[c] = q
        out[c] = _dn(normal if lam[c] >= NORMAL_FROM else k, z[1, c], full_well_e, gain_dn_per_e, read_noise_dn,
                     black_level_dn, max_dn)
    for c in range(w):
        high = lam[c] >= NORMAL_FROM
        if fast[1, c] and ((high and fast[0, c]) or (not high and lam[c] >= INVERSION_BELOW and quick[c])):
            continue  # the vectorised loop's value is the draw
        if fast[1, c] and not high and lam[c] >= INVERSION_BELOW:  # PTRS past its first trial
            electrons = ptrs_poisson(lam[c], trial[0, c], trial[1, c], trial[2, c], False, trial[3, c], trial[4, c],
                                     first_pixel + np.uint64(c), f0, f1, k0, k1)
            zr = z[1, c]
        else:
            electrons, zr = pixel_noise_words(lam[c], np.uint64(words[0, c]), np.uint64(words[1, c]),
                                              np.uint64(words[2, c]), np.uint64(words[3, c]),
                                              first_pixel + np.uint64(c), f0, f1, k0, k1)
        out[c] = _dn(electrons, zr, full_well_e, gain_dn_per_e, read_noise_dn, black_level_dn, max_dn)


@numba.njit(nogil=True, parallel=True, cache=True)
def expose_nb(photons: np.ndarray, qe_prnu: np.ndarray, dark_e: np.ndarray, seed: int, frame_index: int,
              full_well_e: float, gain_dn_per_e: float, read_noise_dn: float, black_level_dn: float,
              max_dn: float) -> np.ndarray:
    """The whole ADC stage of one frame, noise drawn inside (see :mod:`sensor.noise`); seed and
    frame_index are np.uint64 (any value below 2**64).

    Mean electrons -> Poisson shot noise -> full-well clip -> gain -> read noise -> quantise ->
    black level -> clip. photons, qe_prnu, dark_e: (H, W) float64. Returns (H, W) uint16.

    A row at a time: block 0 of every pixel, the ziggurat's fast path, then the chain for the pixels
    at or above ``NORMAL_FROM`` electrons in a branch-free (vectorised) loop, and last the pixels it
    does not cover (a slow ziggurat path, fewer electrons) one by one, as :func:`pixel_noise_words`.
    """
    h, w = photons.shape
    out = np.empty((h, w), np.uint16)
    m = np.uint64(0xFFFFFFFF)
    s, n = np.uint64(seed), np.uint64(frame_index)
    k0, k1, f0, f1 = s & m, s >> np.uint64(32), n & m, n >> np.uint64(32)
    tasks = (h + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for i in numba.prange(tasks):  # a task's rows share one scratch (measured ~8% faster than one per row)
        words, ptrs, z, fast, lam, trial, quick = row_scratch(w)
        for r in range(i * ROWS_PER_TASK, min(h, (i + 1) * ROWS_PER_TASK)):
            expose_row(photons[r], qe_prnu[r], dark_e[r], np.uint64(r * w), f0, f1, k0, k1, full_well_e,
                       gain_dn_per_e, read_noise_dn, black_level_dn, max_dn, out[r], words, ptrs, z, fast, lam,
                       trial, quick)
    return out


def expose_ref(photons: np.ndarray, qe_prnu: np.ndarray, dark_e: np.ndarray, seed: int, frame_index: int,
               full_well_e: float, gain_dn_per_e: float, read_noise_dn: float, black_level_dn: float,
               max_dn: float) -> np.ndarray:
    """Plain Python/numpy twin of :func:`expose_nb` (a pixel loop: for small frames)."""
    h, w = photons.shape
    lam = electron_mean_ref(photons, qe_prnu, dark_e)
    draws = [pixel_noise_ref(float(lam.flat[i]), i, frame_index & 0xFFFFFFFF, frame_index >> 32,
                             seed & 0xFFFFFFFF, seed >> 32) for i in range(h * w)]
    electrons = np.array([d[0] for d in draws]).reshape(h, w)
    z = np.array([d[1] for d in draws]).reshape(h, w)
    e = np.minimum(electrons, full_well_e)
    q = np.floor(e * gain_dn_per_e + read_noise_dn * z + 0.5) + black_level_dn
    return np.clip(q, 0.0, max_dn).astype(np.uint16)
