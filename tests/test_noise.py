"""The in-kernel noise generator: Philox4x32-10 against Random123's known answers, the kernels
against their references (every path of the ziggurat), the normals' distribution, and Poisson
statistics over the whole range of means."""

from __future__ import annotations

import numpy as np
import pytest

from sensor.noise import (
    INVERSION_BELOW,
    M52,
    NORMAL_FROM,
    ZIG_KI,
    ZIG_R,
    normal_nb,
    philox4x32,
    philox4x32_ref,
    pixel_noise,
    pixel_noise_ref,
    poisson_nb,
    row_blocks,
    row_blocks_ref,
    row_ziggurat_fast,
    row_ziggurat_fast_ref,
    ziggurat_normal,
    ziggurat_normal_ref,
    ziggurat_tables,
)

# Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", RANDOM123_KAT)
def test_philox_matches_random123_known_answers(counter, key, want):
    got = philox4x32(*(np.uint64(v) for v in counter), *(np.uint64(v) for v in key))
    assert tuple(int(v) for v in got) == want
    ref = philox4x32_ref(np.array(counter, np.uint32), np.array(key, np.uint32))
    assert tuple(int(v) for v in ref) == want


def test_row_blocks_equal_philox_per_pixel():
    out = np.zeros((4, 40), np.uint32)
    args = (7, 2**32 - 1, 0xDEADBEEF, 0x01234567)
    row_blocks(np.uint64(2**32 - 20), 37, np.uint64(3), *(np.uint64(a) for a in args), out)
    want = row_blocks_ref(2**32 - 20, 37, 3, *args)
    assert np.array_equal(out[:, :37], want) and not out[:, 37:].any()
    one = philox4x32(np.uint64((2**32 - 20 + 5) % 2**32), np.uint64(3), *(np.uint64(a) for a in args))
    assert tuple(int(v) for v in one) == tuple(int(v) for v in want[:, 5])


def test_row_ziggurat_fast_path_equals_reference():
    words = np.random.default_rng(3).integers(0, 2**32, (4, 5000), dtype=np.uint32)
    z, fast = np.zeros((2, 5000)), np.zeros((2, 5000), bool)
    row_ziggurat_fast(words, 5000, z, fast)
    z_ref, fast_ref = row_ziggurat_fast_ref(words)
    assert np.array_equal(fast, fast_ref) and np.all((0.975 < fast.mean(1)) & (fast.mean(1) < 0.995))
    assert np.array_equal(z[fast], z_ref[fast])
    for c in np.flatnonzero(fast.all(0))[:50]:  # the fast path's value is the whole draw's
        w = [int(v) for v in words[:, c]]
        assert z[0, c] == ziggurat_normal_ref((w[0] << 32) | w[1], c, 1, 0, 0, 5, 6)
        assert z[1, c] == ziggurat_normal_ref((w[2] << 32) | w[3], c, 1, 0, 0, 5, 6)


def _word(idx: int, sign: int, rabs: int) -> int:
    return (rabs << 9) | (sign << 8) | idx


def test_ziggurat_kernel_equals_reference_on_every_path():
    """Words built to take each path: the fast return, a wedge (accepted, or rejected and restarted
    from the block's second word) and the base layer's tail beyond ZIG_R."""
    tail = [_word(0, s, M52 - k) for s in (0, 1) for k in range(40)]  # layer 0, outside its rectangle
    wedge = [_word(i, s, M52 - k) for i in (1, 2, 77, 200, 255) for s in (0, 1) for k in range(40)]
    fast = [_word(i, 0, 0) for i in range(1, 256)]
    seen_tail = 0
    for n, word in enumerate(tail + wedge + fast):
        args = (n, 3, 9, 0, 0xDEADBEEF, 0x01234567)
        got = ziggurat_normal(np.uint64(word), *(np.uint64(a) for a in args))
        want = ziggurat_normal_ref(word, *args)
        assert got == want, (hex(word), got, want)
        if word in tail:
            assert abs(got) >= ZIG_R and (got < 0) == bool((word >> 8) & 1)
            seen_tail += 1
    assert seen_tail == 80
    assert all(int(k) < 2**52 for k in ZIG_KI) and int(ZIG_KI[0]) < M52 - 40  # those words leave layer 0


def test_ziggurat_tables_are_numpys():
    """The 256-layer tables agree with numpy's published ki_double (first entries, to rounding of v)."""
    ki, wi, fi = ziggurat_tables()
    assert abs(int(ki[0]) - 0x000EF33D8025EF6A) < 2**14 and ki[1] == 0
    assert abs(int(ki[2]) - 0x000C08BE98FBC6A8) < 2**14
    assert fi[0] == 1.0 and np.all(np.diff(fi) < 0) and np.all(np.diff(wi[1:]) > 0)


def test_normals_are_standard_normal():
    from scipy import stats

    n = 2_000_000
    z = normal_nb(n, 5, 8)
    assert abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert stats.kstest(z[:400_000], "norm").pvalue > 1e-4
    # the tail beyond the base layer (drawn by the tail method): P(|z| > r) = 2 sf(r), about 2.6e-4
    expected = 2 * stats.norm.sf(ZIG_R) * n
    assert abs(np.sum(np.abs(z) > ZIG_R) - expected) < 5 * np.sqrt(expected)
    # a fine histogram against the normal's probabilities (chi-square over 200 bins in [-4, 4])
    edges = np.linspace(-4, 4, 201)
    obs = np.histogram(z, edges)[0]
    exp = n * np.diff(stats.norm.cdf(edges))
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert stats.chi2.sf(chi2, 199) > 1e-4, chi2


@pytest.mark.parametrize("lam", [0.0, 0.02, 1.5, INVERSION_BELOW - 1e-9, INVERSION_BELOW, 37.5, 640.0,
                                 NORMAL_FROM - 1e-6, NORMAL_FROM, 2.5e4, 1e6])
def test_pixel_noise_kernel_equals_reference(lam):
    for pixel, frame in ((0, 0), (12345, 3), (2**32 - 1, 2**33 + 1)):
        args = (pixel, frame & 0xFFFFFFFF, frame >> 32, 0xDEADBEEF, 0x01234567)
        got = pixel_noise(lam, *(np.uint64(a) for a in args))
        assert (float(got[0]), float(got[1])) == pixel_noise_ref(lam, *args)


@pytest.mark.parametrize("lam", [0.01, 0.3, 4.0, 9.5, 10.0, 120.0, 999.0, 1000.0, 3.3e4, 1e6])
def test_poisson_mean_and_variance_within_one_percent(lam):
    # Enough draws that 1% is over 4 standard errors of both estimates (var of the sample variance
    # of a Poisson is about 2 lam**2 + lam / n).
    n = int(max(2e5, 16 * 1e4 / lam, 16 * 1e4 * (2 + 1 / lam)))
    x = poisson_nb(np.full(n, lam), 11, 4)
    assert np.all(x >= 0) and np.all(x == np.floor(x))
    assert abs(x.mean() / lam - 1) < 0.01, x.mean()
    assert abs(x.var() / lam - 1) < 0.01, x.var()


@pytest.mark.parametrize("lam", [0.7, 6.0, 25.0, 300.0])
def test_small_means_are_poisson_in_distribution(lam):
    """Exact algorithms below NORMAL_FROM: the histogram matches the Poisson pmf (chi-square)."""
    from scipy import stats

    n = 400_000
    x = poisson_nb(np.full(n, lam), 3, 1).astype(np.int64)
    lo, hi = int(stats.poisson.ppf(1e-4, lam)), int(stats.poisson.ppf(1 - 1e-4, lam))
    edges = np.arange(lo, hi + 2)
    observed = np.array([np.sum(x < lo)] + list(np.histogram(x, edges)[0][:-1]) + [np.sum(x >= hi)])
    probs = np.array([stats.poisson.cdf(lo - 1, lam)] + [stats.poisson.pmf(k, lam) for k in range(lo, hi)]
                     + [stats.poisson.sf(hi - 1, lam)])
    keep = probs * n >= 5
    expected = probs[keep] * n
    obs = observed[keep].astype(float)
    obs[-1] += observed[~keep].sum()
    expected[-1] += (probs[~keep] * n).sum()
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, chi2


def test_draws_do_not_depend_on_thread_count():
    import numba

    lam = np.linspace(0, 5e3, 50_000)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = poisson_nb(lam, 1, 2)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = poisson_nb(lam, 1, 2)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, many)
