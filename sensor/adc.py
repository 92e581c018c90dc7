"""The photon-to-DN chain as numba kernels, each with a plain numpy reference beside it.

:func:`expose_nb` is the whole ADC stage with the noise drawn inside, from a counter-based
generator keyed by (seed, frame, pixel) (:mod:`sensor.noise`), so a frame depends only on
(seed, frame index), never on thread count or scheduling. Kernels and references run the same
IEEE operations in the same order and agree bit for bit (no fastmath, so no FMA contraction).
"""

from __future__ import annotations

import numba
import numpy as np

from .noise import pixel_noise, pixel_noise_ref


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


@numba.njit(nogil=True, parallel=True, cache=True)
def expose_nb(photons: np.ndarray, qe_prnu: np.ndarray, dark_e: np.ndarray, seed: int, frame_index: int,
              full_well_e: float, gain_dn_per_e: float, read_noise_dn: float, black_level_dn: float,
              max_dn: float) -> np.ndarray:
    """The whole ADC stage of one frame, noise drawn inside (see :mod:`sensor.noise`); seed and
    frame_index are np.uint64 (any value below 2**64).

    Mean electrons -> Poisson shot noise -> full-well clip -> gain -> read noise -> quantise ->
    black level -> clip. photons, qe_prnu, dark_e: (H, W) float64. Returns (H, W) uint16.
    """
    h, w = photons.shape
    out = np.empty((h, w), np.uint16)
    m = np.uint64(0xFFFFFFFF)
    s, n = np.uint64(seed), np.uint64(frame_index)
    k0, k1, f0, f1 = s & m, s >> np.uint64(32), n & m, n >> np.uint64(32)
    for r in numba.prange(h):
        for c in range(w):
            lam = photons[r, c] * qe_prnu[r, c] + dark_e[r, c]
            electrons, z = pixel_noise(lam, np.uint64(r * w + c), f0, f1, k0, k1)
            e = min(electrons, full_well_e)
            v = e * gain_dn_per_e + read_noise_dn * z
            q = np.floor(v + 0.5) + black_level_dn
            out[r, c] = np.uint16(min(max(q, 0.0), max_dn))
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
