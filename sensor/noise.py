"""Temporal noise drawn inside the kernels: a counter-based generator keyed by (seed, frame, pixel).

Generator: Philox4x32-10 (Salmon et al., SC 2011; Random123), checked against Random123's
published known-answer vectors. Pixel ``p`` of frame ``n`` of a sensor with seed ``s`` draws block
``j`` as ``philox(counter=(p, j, n mod 2**32, n >> 32), key=(s mod 2**32, s >> 32))``, so every
draw depends only on (seed, frame, pixel, j): a frame is the same at any thread count and in any
order. It is a noise generator, not a cipher.

Every pixel draws block 0 (four 32-bit words ``w0..w3``). The ADC kernel works a row at a time:
block 0 of every pixel (:func:`row_blocks`), the ziggurat's fast path of both normals
(:func:`row_ziggurat_fast`), the rest of the chain in a branch-free loop LLVM vectorises, and only
then, pixel by pixel, the slow paths (further blocks: a ziggurat wedge or tail, Poisson below
``NORMAL_FROM``) through :func:`pixel_noise_words`:

* normals: the ziggurat (Marsaglia & Tsang 2000) with 256 layers, 8 index bits, a sign bit and 52
  bits of abscissa from one 64-bit word, the layout numpy's ``standard_normal`` uses; 99.3% of words
  return at once (a table lookup, a multiply, a compare: no log, no sqrt). A word that falls in a
  wedge takes a uniform from the next block of its stream and, when the wedge rejects it, restarts
  from that block's second word; the base layer's tail (beyond ``ZIG_R``) is Marsaglia's exact tail
  method with uniforms from further blocks. The read-noise normal reads the word ``w2 w3`` and the
  blocks ``READ_BLOCK``, ``READ_BLOCK + 1``, ...; the shot noise's normal approximation reads
  ``w0 w1`` and the blocks 1, 2, ...
* shot noise, ``Poisson(lam)``:

  - ``lam < 10``: inversion (sequential search of the CDF from ``exp(-lam)``), exact in
    distribution, one 53-bit uniform from ``w0 w1``, about ``lam + 1`` steps;
  - ``10 <= lam < 1000``: PTRS, Hormann's transformed rejection with squeeze (1993, the
    algorithm numpy uses above 10), exact in distribution, two 53-bit uniforms from each of blocks
    1, 2, ... (1.2 blocks on average);
  - ``lam >= 1000``: the normal approximation ``floor(lam + sqrt(lam) z + 1/2)``. Its mean and
    variance are the Poisson ones (variance + 1/12 from rounding) and its skewness error,
    ``1/sqrt(lam) <= 3%``, is far below what read noise and quantisation leave visible; it costs
    one ziggurat normal instead of a rejection loop with a log-gamma (the measured reason: most
    pixels of a lit scene sit at hundreds to thousands of electrons).

Each numba function has a plain Python/numpy twin (``*_ref``); the tests require bit-identical
results (the same IEEE operations in the same order, no fastmath). The ziggurat tables are computed
once here in numpy and shared by both.
"""

from __future__ import annotations

import math

import numba
import numpy as np

M32 = 0xFFFFFFFF
M52 = (1 << 52) - 1
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
INVERSION_BELOW = 10.0  # electrons: inversion below, PTRS above (numpy's split)
NORMAL_FROM = 1000.0  # electrons: normal approximation from here on
SHOT_BLOCK = 1  # first block of the shot noise's further draws (PTRS trials, ziggurat slow paths)
READ_BLOCK = 0x80000000  # first block of the read-noise normal's slow paths
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
_LOGGAM_COEF = (8.333333333333333e-02, -2.777777777777778e-03, 7.936507936507937e-04,
                -5.952380952380952e-04, 8.417508417508418e-04, -1.917526917526918e-03,
                6.410256410256410e-03, -2.955065359477124e-02, 1.796443723688307e-01,
                -1.39243221690590e+00)
_LOGGAM = np.array(_LOGGAM_COEF)


def ziggurat_tables(layers: int = 256, r: float = 3.6541528853610088) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marsaglia & Tsang's ziggurat for the standard normal's right half: (ki, wi, fi), each (layers,).

    ``r`` is the base layer's right edge (256 layers: numpy's value); every layer, the base with its
    tail included, has the area ``v = r f(r) + integral_r^inf f``, ``f(x) = exp(-x**2 / 2)``. Layer
    ``i > 0`` spans ``[0, x_i)`` (``x_255 = r`` down to ``x_1``, the top), ``wi[i] = x_i / 2**52``,
    ``fi[i] = f(x_i)``, ``ki[i] = 2**52 x_(i-1) / x_i`` (the inner rectangle's share; ``ki[1] = 0``);
    layer 0 is the base rectangle of width ``q = v / f(r)``, ``ki[0] = 2**52 r / q``."""
    f = lambda x: math.exp(-0.5 * x * x)  # noqa: E731
    v = r * f(r) + math.sqrt(math.pi / 2.0) * math.erfc(r / math.sqrt(2.0))
    m = float(1 << 52)
    ki, wi, fi = np.zeros(layers, np.uint64), np.zeros(layers), np.zeros(layers)
    q = v / f(r)
    ki[0], ki[1] = int(r / q * m), 0
    wi[0], wi[-1] = q / m, r / m
    fi[0], fi[-1] = 1.0, f(r)
    dn = tn = r
    for i in range(layers - 2, 0, -1):
        dn = math.sqrt(-2.0 * math.log(v / dn + f(dn)))
        ki[i + 1] = int(dn / tn * m)
        tn = dn
        fi[i] = f(dn)
        wi[i] = dn / m
    return ki, wi, fi


ZIG_R = 3.6541528853610088
ZIG_INV_R = 1.0 / ZIG_R
ZIG_KI, ZIG_WI, ZIG_FI = ziggurat_tables(256, ZIG_R)


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
    for _ in range(10):  # no branch in the body: LLVM unrolls it
        p0 = np.uint64(PHILOX_M0) * c0
        p1 = np.uint64(PHILOX_M1) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m
        k0 = (k0 + np.uint64(PHILOX_W0)) & m
        k1 = (k1 + np.uint64(PHILOX_W1)) & m
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
    """Two 32-bit words -> a double in [0, 1) with 53 random bits: (a >> 5) * 2**26 + (b >> 6), scaled. Built
    from the two halves as doubles (exact: an integer below 2**53), which LLVM vectorises on AVX2."""
    return (np.float64(np.int32(a >> np.uint64(5))) * 67108864.0 + np.float64(np.int32(b >> np.uint64(6)))) * (
        1.0 / 9007199254740992.0)


def _to_unit_ref(a: int, b: int) -> float:
    return float((a >> 5) * 67108864 + (b >> 6)) * (1.0 / 9007199254740992.0)


# ----------------------------------------------------------------------------------------------
# Normals (ziggurat) and Poisson draws
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
LOG_FACTORIAL_N = 2048  # log k! from a table below this (PTRS runs below NORMAL_FROM = 1000 electrons)
_LOG_FACTORIAL = np.array([_loggam_ref(k + 1.0) for k in range(LOG_FACTORIAL_N)])


@numba.njit(nogil=True, cache=True)
def _word(hi, lo):
    """Two 32-bit words (uint64) -> one uint64."""
    return (hi << np.uint64(32)) | lo


@numba.njit(nogil=True, cache=True)
def _zig_fast(word):
    """The ziggurat's first try on a 64-bit word: (x, fast, idx, sign); x is the normal when fast."""
    idx = np.int64(word & np.uint64(0xFF))
    sign = (word >> np.uint64(8)) & np.uint64(1)
    rabs = (word >> np.uint64(9)) & np.uint64(M52)
    x = np.float64(np.int64(rabs)) * ZIG_WI[idx]
    return (-x if sign else x), rabs < ZIG_KI[idx], idx, sign


@numba.njit(nogil=True, cache=True)
def ziggurat_normal(word, pixel, block, frame_lo, frame_hi, k0, k1):
    """A standard normal from the 64-bit ``word``; slow paths draw blocks ``block``, ``block + 1``, ..."""
    while True:
        x, fast, idx, sign = _zig_fast(word)
        if fast:
            return x
        r0, r1, r2, r3 = philox4x32(pixel, block, frame_lo, frame_hi, k0, k1)
        block += np.uint64(1)
        if idx == 0:  # the tail beyond ZIG_R: Marsaglia's method, uniforms from fresh blocks
            u1, u2 = _to_unit(r0, r1), _to_unit(r2, r3)
            while True:
                xx = -ZIG_INV_R * math.log1p(-u1)
                yy = -math.log1p(-u2)
                if yy + yy > xx * xx:
                    return -(ZIG_R + xx) if sign else ZIG_R + xx
                r0, r1, r2, r3 = philox4x32(pixel, block, frame_lo, frame_hi, k0, k1)
                block += np.uint64(1)
                u1, u2 = _to_unit(r0, r1), _to_unit(r2, r3)
        if (ZIG_FI[idx - 1] - ZIG_FI[idx]) * _to_unit(r0, r1) + ZIG_FI[idx] < math.exp(-0.5 * x * x):
            return x
        word = _word(r2, r3)


def ziggurat_normal_ref(word: int, pixel: int, block: int, frame_lo: int, frame_hi: int, k0: int, k1: int
                        ) -> float:
    """Plain Python twin of :func:`ziggurat_normal`."""
    while True:
        idx = word & 0xFF
        sign = (word >> 8) & 1
        rabs = (word >> 9) & M52
        x = float(rabs) * float(ZIG_WI[idx])
        if sign:
            x = -x
        if rabs < int(ZIG_KI[idx]):
            return x
        r0, r1, r2, r3 = (int(v) for v in _block_ref(pixel, block, frame_lo, frame_hi, k0, k1))
        block += 1
        if idx == 0:
            u1, u2 = _to_unit_ref(r0, r1), _to_unit_ref(r2, r3)
            while True:
                xx = -ZIG_INV_R * math.log1p(-u1)
                yy = -math.log1p(-u2)
                if yy + yy > xx * xx:
                    return -(ZIG_R + xx) if sign else ZIG_R + xx
                r0, r1, r2, r3 = (int(v) for v in _block_ref(pixel, block, frame_lo, frame_hi, k0, k1))
                block += 1
                u1, u2 = _to_unit_ref(r0, r1), _to_unit_ref(r2, r3)
        fi_hi, fi_lo = float(ZIG_FI[idx - 1]), float(ZIG_FI[idx])
        if (fi_hi - fi_lo) * _to_unit_ref(r0, r1) + fi_lo < math.exp(-0.5 * x * x):
            return x
        word = (r2 << 32) | r3


def _block_ref(pixel: int, block: int, frame_lo: int, frame_hi: int, k0: int, k1: int) -> np.ndarray:
    return philox4x32_ref(np.array([pixel, block, frame_lo, frame_hi], np.uint32), np.array([k0, k1], np.uint32))


@numba.njit(nogil=True, cache=True, error_model="numpy")  # no ZeroDivisionError branch: vectorises
def ptrs_trial(lam, r0, r1, r2, r3):
    """One PTRS trial for ``Poisson(lam)``, 10 <= lam, from one block's words (uint64 holding 32 bits):
    (k, us, v, quick, a, b); ``quick`` is the squeeze's acceptance (about 80% of trials), without
    which the caller goes on to the log test. Branch-free, so the ADC kernel runs the first trial of a
    whole row in a vectorised loop."""
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    uu, v = _to_unit(r0, r1), _to_unit(r2, r3)
    u = uu - 0.5
    us = 0.5 - abs(u)
    k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
    return k, us, v, (us >= 0.07) & (v <= vr), a, b


def ptrs_trial_ref(lam: float, r0: int, r1: int, r2: int, r3: int) -> tuple[float, float, float, bool, float, float]:
    """Plain Python twin of :func:`ptrs_trial`."""
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    uu, v = _to_unit_ref(r0, r1), _to_unit_ref(r2, r3)
    u = uu - 0.5
    us = 0.5 - abs(u)
    k = float(math.floor((2.0 * a / us + b) * u + lam + 0.43))
    return k, us, v, us >= 0.07 and v <= vr, a, b


@numba.njit(nogil=True, cache=True)
def _log_factorial(k):
    """log k! for k >= 0 (float): the table below LOG_FACTORIAL_N, else :func:`_loggam`."""
    return _LOG_FACTORIAL[np.int64(k)] if k < LOG_FACTORIAL_N else _loggam(k + 1.0)


def _log_factorial_ref(k: float) -> float:
    return float(_LOG_FACTORIAL[int(k)]) if k < LOG_FACTORIAL_N else _loggam_ref(k + 1.0)


@numba.njit(nogil=True, cache=True)
def ptrs_accepts(lam, k, us, v, a, b):
    """PTRS's log test of a trial its squeeze did not accept (False: draw the next trial)."""
    if k < 0.0 or (us < 0.013 and v > us):
        return False
    log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    return math.log(v) + log_invalpha - math.log(a / (us * us) + b) <= -lam + k * math.log(lam) - _log_factorial(k)


@numba.njit(nogil=True, cache=True)
def ptrs_poisson(lam, k, us, v, quick, a, b, pixel, frame_lo, frame_hi, k0, k1):
    """``Poisson(lam)`` by PTRS from its first trial's result (:func:`ptrs_trial` on block ``SHOT_BLOCK``),
    further trials from blocks ``SHOT_BLOCK + 1``, ...: the ADC kernel runs first trials a row at a time
    and finishes only the ones its squeeze did not accept here."""
    block = np.uint64(SHOT_BLOCK + 1)
    while not (quick or ptrs_accepts(lam, k, us, v, a, b)):
        r0, r1, r2, r3 = philox4x32(pixel, block, frame_lo, frame_hi, k0, k1)
        block += np.uint64(1)
        k, us, v, quick, a, b = ptrs_trial(lam, r0, r1, r2, r3)
    return k


def ptrs_poisson_ref(lam: float, k: float, us: float, v: float, quick: bool, a: float, b: float, pixel: int,
                     frame_lo: int, frame_hi: int, k0: int, k1: int) -> float:
    """Plain Python twin of :func:`ptrs_poisson`."""
    block = SHOT_BLOCK + 1
    while not quick:
        if not (k < 0.0 or (us < 0.013 and v > us)):
            log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
            bound = -lam + k * math.log(lam) - _log_factorial_ref(k)
            if math.log(v) + log_invalpha - math.log(a / (us * us) + b) <= bound:
                break
        r0, r1, r2, r3 = (int(x) for x in _block_ref(pixel, block, frame_lo, frame_hi, k0, k1))
        block += 1
        k, us, v, quick, a, b = ptrs_trial_ref(lam, r0, r1, r2, r3)
    return k


@numba.njit(nogil=True, cache=True)
def pixel_noise_words(lam, w0, w1, w2, w3, pixel, frame_lo, frame_hi, k0, k1):
    """(shot-noise electrons, read-noise z) of one pixel with mean ``lam`` electrons, given its block 0
    words ``w0..w3`` (see the module docstring)."""
    z = ziggurat_normal(_word(w2, w3), pixel, np.uint64(READ_BLOCK), frame_lo, frame_hi, k0, k1)
    if lam >= NORMAL_FROM:
        z1 = ziggurat_normal(_word(w0, w1), pixel, np.uint64(SHOT_BLOCK), frame_lo, frame_hi, k0, k1)
        return max(np.floor(lam + math.sqrt(lam) * z1 + 0.5), 0.0), z
    if lam <= 0.0:
        k = 0.0
    elif lam < INVERSION_BELOW:
        u = _to_unit(w0, w1)
        p = math.exp(-lam)
        f = p
        k = 0.0
        while u > f and k < 1000.0:
            k += 1.0
            p *= lam / k
            f += p
    else:
        r0, r1, r2, r3 = philox4x32(pixel, np.uint64(SHOT_BLOCK), frame_lo, frame_hi, k0, k1)
        k, us, v, quick, a, b = ptrs_trial(lam, r0, r1, r2, r3)
        k = ptrs_poisson(lam, k, us, v, quick, a, b, pixel, frame_lo, frame_hi, k0, k1)
    return k, z


@numba.njit(nogil=True, cache=True)
def pixel_noise(lam, pixel, frame_lo, frame_hi, k0, k1):
    """:func:`pixel_noise_words` drawing the pixel's block 0 itself (one pixel at a time)."""
    w0, w1, w2, w3 = philox4x32(pixel, np.uint64(0), frame_lo, frame_hi, k0, k1)
    return pixel_noise_words(lam, w0, w1, w2, w3, pixel, frame_lo, frame_hi, k0, k1)


def pixel_noise_ref(lam: float, pixel: int, frame_lo: int, frame_hi: int, k0: int, k1: int) -> tuple[float, float]:
    """Plain Python twin of :func:`pixel_noise`."""
    w0, w1, w2, w3 = (int(v) for v in _block_ref(pixel, 0, frame_lo, frame_hi, k0, k1))
    z = ziggurat_normal_ref((w2 << 32) | w3, pixel, READ_BLOCK, frame_lo, frame_hi, k0, k1)
    if lam >= NORMAL_FROM:
        z1 = ziggurat_normal_ref((w0 << 32) | w1, pixel, SHOT_BLOCK, frame_lo, frame_hi, k0, k1)
        return float(max(math.floor(lam + math.sqrt(lam) * z1 + 0.5), 0.0)), z
    if lam <= 0.0:
        k = 0.0
    elif lam < INVERSION_BELOW:
        u = _to_unit_ref(w0, w1)
        p = math.exp(-lam)
        f, k = p, 0.0
        while u > f and k < 1000.0:
            k += 1.0
            p *= lam / k
            f += p
    else:
        r0, r1, r2, r3 = (int(x) for x in _block_ref(pixel, SHOT_BLOCK, frame_lo, frame_hi, k0, k1))
        k, us, v, quick, a, b = ptrs_trial_ref(lam, r0, r1, r2, r3)
        k = ptrs_poisson_ref(lam, k, us, v, quick, a, b, pixel, frame_lo, frame_hi, k0, k1)
    return k, z


@numba.njit(nogil=True, cache=True)
def row_blocks(row_start, width, block, frame_lo, frame_hi, k0, k1, out):
    """Block ``block`` of pixels ``row_start .. row_start + width - 1`` into ``out`` (4, >= width) uint32.

    :func:`philox4x32` with the round keys computed once for the row, so the pixel loop is straight-line
    32x32->64-bit multiplies that LLVM vectorises (3.5x the scalar function's speed, measured)."""
    m = np.uint64(M32)
    rk0, rk1 = np.empty(10, np.uint64), np.empty(10, np.uint64)
    for i in range(10):
        rk0[i], rk1[i] = k0, k1
        k0 = (k0 + np.uint64(PHILOX_W0)) & m
        k1 = (k1 + np.uint64(PHILOX_W1)) & m
    for c in range(width):
        c0, c1, c2, c3 = np.uint64(row_start + c) & m, block, frame_lo, frame_hi
        for i in range(10):
            p0 = np.uint64(PHILOX_M0) * c0
            p1 = np.uint64(PHILOX_M1) * c2
            c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ rk0[i], p1 & m, (p0 >> np.uint64(32)) ^ c3 ^ rk1[i], p0 & m
        out[0, c] = np.uint32(c0)
        out[1, c] = np.uint32(c1)
        out[2, c] = np.uint32(c2)
        out[3, c] = np.uint32(c3)


def row_blocks_ref(row_start: int, width: int, block: int, frame_lo: int, frame_hi: int, k0: int, k1: int
                   ) -> np.ndarray:
    """numpy twin of :func:`row_blocks`: (4, width) uint32."""
    counter = np.zeros((width, 4), np.uint32)
    counter[:, 0] = np.arange(row_start, row_start + width, dtype=np.uint64).astype(np.uint32)
    counter[:, 1], counter[:, 2], counter[:, 3] = block, frame_lo, frame_hi
    key = np.broadcast_to(np.array([k0, k1], np.uint32), (width, 2))
    return np.ascontiguousarray(philox4x32_ref(counter, key).T)


@numba.njit(nogil=True, cache=True)
def row_ziggurat_fast(words, width, z, fast):
    """The ziggurat's fast path for the two normals of each pixel of a row: words (4, >= width) uint32
    (block 0) -> z (2, >= width) float64 (shot ``w0 w1``, read ``w2 w3``) and fast (2, >= width) bool,
    True where that normal returned at once (98.5% of words; elsewhere z is not the normal and the pixel
    goes through :func:`pixel_noise_words`). Scalar on purpose: the table lookups are gathers, which
    kept LLVM from vectorising the loop they sat in."""
    for c in range(width):
        for i in range(2):
            z[i, c], fast[i, c], _, _ = _zig_fast(_word(np.uint64(words[2 * i, c]), np.uint64(words[2 * i + 1, c])))


def row_ziggurat_fast_ref(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of :func:`row_ziggurat_fast`: words (4, W) uint32 -> (z (2, W) float64, fast (2, W) bool)."""
    w64 = words.astype(np.uint64)
    z, fast = np.empty((2, words.shape[1])), np.empty((2, words.shape[1]), bool)
    for i, (hi, lo) in enumerate(((w64[0], w64[1]), (w64[2], w64[3]))):
        word = (hi << np.uint64(32)) | lo
        idx = (word & np.uint64(0xFF)).astype(np.intp)
        rabs = (word >> np.uint64(9)) & np.uint64(M52)
        x = rabs.astype(np.float64) * ZIG_WI[idx]
        z[i] = np.where((word >> np.uint64(8)) & np.uint64(1), -x, x)
        fast[i] = rabs < ZIG_KI[idx]
    return z, fast


@numba.njit(nogil=True, parallel=True, cache=True)
def poisson_nb(lam: np.ndarray, seed: int, frame_index: int) -> np.ndarray:
    """Shot-noise draws only (the statistics tests): (N,) float64 means -> (N,) float64 counts."""
    out = np.empty(lam.shape[0], np.float64)
    s, n = np.uint64(seed), np.uint64(frame_index)
    m = np.uint64(M32)
    for i in numba.prange(lam.shape[0]):
        out[i] = pixel_noise(lam[i], np.uint64(i), n & m, n >> np.uint64(32), s & m, s >> np.uint64(32))[0]
    return out


@numba.njit(nogil=True, parallel=True, cache=True)
def normal_nb(n: int, seed: int, frame_index: int) -> np.ndarray:
    """Read-noise normals only (the statistics tests): pixel i's z for i < n -> (n,) float64."""
    out = np.empty(n, np.float64)
    s, f = np.uint64(seed), np.uint64(frame_index)
    m = np.uint64(M32)
    for i in numba.prange(n):
        out[i] = pixel_noise(0.0, np.uint64(i), f & m, f >> np.uint64(32), s & m, s >> np.uint64(32))[1]
    return out
