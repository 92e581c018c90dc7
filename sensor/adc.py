"""The photon-to-DN chain as numba kernels, each with a plain numpy reference beside it.

Random draws are not made inside the kernels: the caller draws them from a counter-seeded
generator (see :func:`sensor.sensor.frame_rng`) so a frame depends only on (seed, frame
index), never on thread count or scheduling. Kernels and references then run the same
IEEE operations in the same order and agree bit for bit (no fastmath, so no FMA contraction).
"""

from __future__ import annotations

import numba
import numpy as np


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
def digitise_nb(electrons: np.ndarray, read_z: np.ndarray, full_well_e: float, gain_dn_per_e: float,
                read_noise_dn: float, black_level_dn: float, max_dn: float) -> np.ndarray:
    """Full-well clip -> conversion gain -> read noise -> quantise -> black level -> clip.

    Args:
        electrons: (H, W) float64 collected electrons (a Poisson draw).
        read_z: (H, W) float32 standard normal draws for the read noise.

    Returns:
        (H, W) uint16 digital numbers.
    """
    h, w = electrons.shape
    out = np.empty((h, w), np.uint16)
    for r in numba.prange(h):
        for c in range(w):
            e = min(electrons[r, c], full_well_e)
            v = e * gain_dn_per_e + read_noise_dn * np.float64(read_z[r, c])
            q = np.floor(v + 0.5) + black_level_dn
            out[r, c] = np.uint16(min(max(q, 0.0), max_dn))
    return out


def digitise_ref(electrons: np.ndarray, read_z: np.ndarray, full_well_e: float, gain_dn_per_e: float,
                 read_noise_dn: float, black_level_dn: float, max_dn: float) -> np.ndarray:
    """numpy reference of :func:`digitise_nb`."""
    e = np.minimum(electrons, full_well_e)
    v = e * gain_dn_per_e + read_noise_dn * read_z.astype(np.float64)
    q = np.floor(v + 0.5) + black_level_dn
    return np.clip(q, 0.0, max_dn).astype(np.uint16)
