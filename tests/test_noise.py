"""The in-kernel noise generator: Philox4x32-10 against Random123's known answers, the kernels
against their references, and Poisson statistics over the whole range of means."""

from __future__ import annotations

import numpy as np
import pytest

from sensor.noise import (
    INVERSION_BELOW,
    NORMAL_FROM,
    philox4x32,
    philox4x32_ref,
    pixel_noise,
    pixel_noise_ref,
    poisson_nb,
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
