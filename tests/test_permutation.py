from __future__ import annotations

import numpy as np
import torch

from models.tables import invert_torch, random_permutation_torch
from sensor.permutation import invert, random_permutation


def _subkey(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_numpy_and_torch_build_the_same_permutation():
    for seed in (0, 1, 2**61 + 12345, 987654321987):
        p = random_permutation(_subkey(seed), 5000)
        assert np.array_equal(np.sort(p), np.arange(5000))
        assert np.array_equal(p, random_permutation_torch(_subkey(seed), 5000).numpy())
        assert np.array_equal(invert(p)[p], np.arange(5000))
        assert np.array_equal(invert_torch(torch.from_numpy(p)).numpy(), invert(p))


def test_related_seeds_give_unrelated_permutations():
    """Subkeys one bit or one step apart must not give shifted or XOR-related orders."""
    n = 4096
    base = 0x1234_5678_9ABC_DEF
    p = random_permutation(_subkey(base), n)
    for other in (base ^ 1, base + 1, base ^ (1 << 40), base - 1):
        q = random_permutation(_subkey(other), n)
        assert (p == q).mean() < 0.01
        for delta in (1, 2, 3):
            assert (p == (q ^ delta)).mean() < 0.01
        # Relative order of neighbouring items must not carry over either.
        inv_p, inv_q = invert(p), invert(q)
        same_order = np.mean((inv_p[1:] > inv_p[:-1]) == (inv_q[1:] > inv_q[:-1]))
        assert 0.45 < same_order < 0.55


def test_a_fixed_item_lands_uniformly_over_seeds():
    n, trials = 16, 4000
    slots = [int(np.flatnonzero(random_permutation(_subkey(s * 7919 + 3), n) == 5)[0]) for s in range(trials)]
    counts = np.bincount(slots, minlength=n)
    expected = trials / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, f"chi-square {chi2:.1f} over 15 dof (critical value 37.7 at p=0.001)"
