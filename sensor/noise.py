"""Temporal noise drawn inside the kernels: a counter-based generator keyed by (seed, frame, pixel).

Generator: Philox4x32-10 (Salmon et al., SC 2011; Random123), checked against Random123's
published known-answer vectors. Pixel ``p`` of frame ``n`` of a sensor with seed ``s`` draws block
``j`` as ``philox(counter=(p, j, n mod 2**32, n >> 32), key=(s mod 2**32, s >> 32))``, so every
draw depends only on (seed, frame, pixel, j): a frame is the same at any thread count and in any
order. It is a noise generator, not a cipher.

Draws of one pixel (``j`` is the block number, each block gives two 53-bit uniforms):

* shot noise, ``Poisson(lam)``:

  - ``lam < 10``: inversion (sequential search of the CDF from ``exp(-lam)``), exact in
    distribution, one uniform (block 0), about ``lam + 1`` steps;
  - ``10 <= lam < 1000``: PTRS, Hormann's transformed rejection with squeeze (1993, the
    algorithm numpy uses above 10), exact in distribution, blocks 0, 1, 2, ... (1.2 on average);
  - ``lam >= 1000``: the normal approximation ``floor(lam + sqrt(lam) z + 1/2)``. Its mean and
    variance are the Poisson ones (variance + 1/12 from rounding) and its skewness error,
    ``1/sqrt(lam) <= 3%``, is far below what read noise and quantisation leave visible; it costs
    one Box-Muller pair instead of a rejection loop with a log-gamma (the measured reason: most
    pixels of a lit scene sit at hundreds to thousands of electrons).
* normals come from Marsaglia's polar method (a pair per accepted block, no sin/cos; 1.27 blocks
  on average): the shot noise's normal approximation takes the first of the pair from blocks
  0, 1, ... and the read noise the second; otherwise the read noise takes the first of the pair
  from blocks ``READ_BLOCK``, ``READ_BLOCK + 1``, ...

Each numba function has a plain Python/numpy twin (``*_ref``); the tests require bit-identical
results (the same IEEE operations in the same order, no fastmath).
"""

from __future__ import annotations

import math

import numba
import numpy as np

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
INVERSION_BELOW = 10.0  # electrons: inversion below, PTRS above (numpy's split)
NORMAL_FROM = 1000.0  # electrons: normal approximation from here on
READ_BLOCK = 0x80000000  # first block of the read-noise normals when the shot noise used blocks 0, 1, ...
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
_LOGGAM_COEF = (8.333333333333333e-02, -2.777777777777778e-03, 7.936507936507937e-04,
                -5.952380952380952e-04, 8.417508417508418e-04, -1.917526917526918e-03,
                6.410256410256410e-03, -2.955065359477124e-02, 1.796443723688307e-01,
                -1.39243221690590e+00)
_LOGGAM = np.array(_LOGGAM_COEF)


def check_seed(seed: int) -> int:
    """Noise seeds are integers in [0, 2**64); raises ValueError naming ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10
# ----------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def philox4x32(c0, c1, c2, c3, k0, k1):
    """One Philox4x32-10 block: 4 counter words and 2 key words (uint64 holding 32 bits) -> 4 words."""
    m = np.uint64(M32)
    for i in range(10):
        if i > 0:
            k0 = (k0 + np.uint64(PHILOX_W0)) & m
            k1 = (k1 + np.uint64(PHILOX_W1)) & m
        p0 = np.uint64(PHILOX_M0) * c0
        p1 = np.uint64(PHILOX_M1) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m
    return c0, c1, c2, c3


def philox4x32_ref(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`philox4x32` on (..., 4) counters and (..., 2) keys (uint32). Returns (..., 4) uint32."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = (key[..., i].astype(np.uint64) for i in range(2))
    for i in range(10):
        if i > 0:
            k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
        p0, p1 = np.uint64(PHILOX_M0) * c[0], np.uint64(PHILOX_M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(M32), (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & np.uint64(M32)]
    return np.stack(c, axis=-1).astype(np.uint32)


@numba.njit(nogil=True, cache=True)
def _to_unit(a, b):
    """Two 32-bit words -> a double in [0, 1) with 53 random bits."""
    return np.float64((a >> np.uint64(5)) * np.uint64(67108864) + (b >> np.uint64(6))) * (1.0 / 9007199254740992.0)


def _to_unit_ref(a: int, b: int) -> float:
    return float((a >> 5) * 67108864 + (b >> 6)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True, cache=True)
def _uniforms(pixel, block, frame_lo, frame_hi, k0, k1):
    """The two uniforms in [0, 1) of one block."""
    r0, r1, r2, r3 = philox4x32(pixel, block, frame_lo, frame_hi, k0, k1)
    return _to_unit(r0, r1), _to_unit(r2, r3)


def _uniforms_ref(pixel: int, block: int, frame_lo: int, frame_hi: int, k0: int, k1: int) -> tuple[float, float]:
    r = philox4x32_ref(np.array([pixel, block, frame_lo, frame_hi], np.uint32), np.array([k0, k1], np.uint32))
    return _to_unit_ref(int(r[0]), int(r[1])), _to_unit_ref(int(r[2]), int(r[3]))


# ----------------------------------------------------------------------------------------------
# Poisson and normal draws
# ----------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _loggam(x):
    """log Gamma(x) for x >= 1 (Stirling series with 7-shift, as numpy's random_loggam)."""
    if x == 1.0 or x == 2.0:
        return 0.0
    x0 = x
    n = 0
    if x <= 7.0:
        n = np.int64(7.0 - x)
        x0 = x + n
    x2 = 1.0 / (x0 * x0)
    gl0 = _LOGGAM[9]
    for k in range(8, -1, -1):
        gl0 = gl0 * x2 + _LOGGAM[k]
    gl = gl0 / x0 + _HALF_LOG_TWO_PI + (x0 - 0.5) * math.log(x0) - x0
    if x <= 7.0:
        for _ in range(n):
            x0 -= 1.0
            gl -= math.log(x0)
    return gl


# The reference runs the same source in CPython: the leaf is plain arithmetic, so the tests compare
# what LLVM made of it with the interpreter's IEEE results.
_loggam_ref = _loggam.py_func


@numba.njit(nogil=True, cache=True)
def _polar(pixel, block, frame_lo, frame_hi, k0, k1):
    """A pair of independent standard normals from blocks block, block + 1, ... (polar method)."""
    while True:
        u1, u2 = _uniforms(pixel, block, frame_lo, frame_hi, k0, k1)
        block += np.uint64(1)
        u, v = 2.0 * u1 - 1.0, 2.0 * u2 - 1.0
        s = u * u + v * v
        if 0.0 < s < 1.0:
            f = math.sqrt(-2.0 * math.log(s) / s)
            return u * f, v * f


@numba.njit(nogil=True, cache=True)
def pixel_noise(lam, pixel, frame_lo, frame_hi, k0, k1):
    """(shot-noise electrons, read-noise z) of one pixel with mean ``lam`` electrons (see module docstring)."""
    if lam >= NORMAL_FROM:
        z1, z2 = _polar(pixel, np.uint64(0), frame_lo, frame_hi, k0, k1)
        return max(np.floor(lam + math.sqrt(lam) * z1 + 0.5), 0.0), z2
    if lam <= 0.0:
        k = 0.0
    elif lam < INVERSION_BELOW:
        u, _ = _uniforms(pixel, np.uint64(0), frame_lo, frame_hi, k0, k1)
        p = math.exp(-lam)
        f = p
        k = 0.0
        while u > f and k < 1000.0:
            k += 1.0
            p *= lam / k
            f += p
    else:
        b = 0.931 + 2.53 * math.sqrt(lam)
        a = -0.059 + 0.02483 * b
        vr = 0.9277 - 3.6224 / (b - 2.0)
        block = np.uint64(0)
        while True:
            uu, v = _uniforms(pixel, block, frame_lo, frame_hi, k0, k1)
            block += np.uint64(1)
            u = uu - 0.5
            us = 0.5 - abs(u)
            k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
            if us >= 0.07 and v <= vr:
                break
            if k < 0.0 or (us < 0.013 and v > us):
                continue
            log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
            if math.log(v) + log_invalpha - math.log(a / (us * us) + b) <= -lam + k * math.log(lam) - _loggam(k + 1.0):
                break
    return k, _polar(pixel, np.uint64(READ_BLOCK), frame_lo, frame_hi, k0, k1)[0]


def _polar_ref(pixel: int, block: int, frame_lo: int, frame_hi: int, k0: int, k1: int) -> tuple[float, float]:
    while True:
        u1, u2 = _uniforms_ref(pixel, block, frame_lo, frame_hi, k0, k1)
        block += 1
        u, v = 2.0 * u1 - 1.0, 2.0 * u2 - 1.0
        s = u * u + v * v
        if 0.0 < s < 1.0:
            f = math.sqrt(-2.0 * math.log(s) / s)
            return u * f, v * f


def pixel_noise_ref(lam: float, pixel: int, frame_lo: int, frame_hi: int, k0: int, k1: int) -> tuple[float, float]:
    """Plain Python twin of :func:`pixel_noise`."""
    if lam >= NORMAL_FROM:
        z1, z2 = _polar_ref(pixel, 0, frame_lo, frame_hi, k0, k1)
        return float(max(math.floor(lam + math.sqrt(lam) * z1 + 0.5), 0.0)), z2
    if lam <= 0.0:
        k = 0.0
    elif lam < INVERSION_BELOW:
        u, _ = _uniforms_ref(pixel, 0, frame_lo, frame_hi, k0, k1)
        p = math.exp(-lam)
        f, k = p, 0.0
        while u > f and k < 1000.0:
            k += 1.0
            p *= lam / k
            f += p
    else:
        b = 0.931 + 2.53 * math.sqrt(lam)
        a = -0.059 + 0.02483 * b
        vr = 0.9277 - 3.6224 / (b - 2.0)
        block = 0
        while True:
            uu, v = _uniforms_ref(pixel, block, frame_lo, frame_hi, k0, k1)
            block += 1
            u = uu - 0.5
            us = 0.5 - abs(u)
            k = float(math.floor((2.0 * a / us + b) * u + lam + 0.43))
            if us >= 0.07 and v <= vr:
                break
            if k < 0.0 or (us < 0.013 and v > us):
                continue
            log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
            bound = -lam + k * math.log(lam) - _loggam_ref(k + 1.0)
            if math.log(v) + log_invalpha - math.log(a / (us * us) + b) <= bound:
                break
    return k, _polar_ref(pixel, READ_BLOCK, frame_lo, frame_hi, k0, k1)[0]


@numba.njit(nogil=True, parallel=True, cache=True)
def poisson_nb(lam: np.ndarray, seed: int, frame_index: int) -> np.ndarray:
    """Shot-noise draws only (the statistics tests): (N,) float64 means -> (N,) float64 counts."""
    out = np.empty(lam.shape[0], np.float64)
    s, n = np.uint64(seed), np.uint64(frame_index)
    m = np.uint64(M32)
    for i in numba.prange(lam.shape[0]):
        out[i] = pixel_noise(lam[i], np.uint64(i), n & m, n >> np.uint64(32), s & m, s >> np.uint64(32))[0]
    return out
