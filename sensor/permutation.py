"""Keyed permutations (numpy), with bit-identical torch twins in :mod:`models.tables`.

A permutation ``pi`` of ``n`` items is stored as an int64 table in *slot order*: slot ``s``
of the protected signal holds item ``pi[s]`` of the plain one, ``x_prot[s] = x[pi[s]]``.

``random_permutation(seed, n)`` sorts the items by a keyed 62-bit hash (stable, so ties go
by index), which is a uniformly random permutation up to hash quality. The hash works on
32-bit lanes inside int64 arithmetic without ever overflowing, so :func:`hash62` gives the
same values bit for bit on a numpy array and on a torch tensor (CPU or CUDA); that lets the
network build its per-frame tables on its own device (:mod:`models.tables`) while this module
stays free of torch. It is a permutation generator, not a cipher.
"""

from __future__ import annotations

import numpy as np

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without leaving 49 bits (safe in int64)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 finaliser (Wellons): a bijective avalanche mix of a 32-bit lane."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def round_keys(seed: int) -> tuple[int, int, int, int, int, int]:
    """Six 32-bit round keys from a 62-bit seed, each depending on both seed halves."""
    s0, s1 = seed & _M32, (seed >> 32) & _M32
    k0 = _mix32(s0 ^ _mix32(s1 ^ 0x243F6A88))
    k1 = _mix32(s1 ^ _mix32(k0 ^ 0x85A308D3))
    k2 = _mix32(k0 ^ _mix32(k1 ^ 0x13198A2E))
    k3 = _mix32(k1 ^ _mix32(k2 ^ 0x03707344))
    k4 = _mix32(k2 ^ _mix32(k3 ^ 0xA4093822))
    k5 = _mix32(k3 ^ _mix32(k4 ^ 0x299F31D0))
    return k0, k1, k2, k3, k4, k5


def hash62(seed: int, idx):
    """Keyed 62-bit hash of each index (idx: int, uint64 ndarray or int64 tensor, values < 2**32).

    The one definition of the hash behind every keyed table: the numpy tables here and in
    :mod:`sensor.readout_tables`, the torch twins in :mod:`models.tables` (it is duck-typed, so
    the same code runs on tensors), and the block keys of :mod:`pipeline.protection`.

    Two independent three-round keyed bijections of the 32-bit index (key XOR, then an avalanche
    mix, three times) give the high and low 31 bits. Every round key depends on the whole seed,
    so seeds that differ in a few bits give unrelated orders (a single XOR-with-the-seed round
    would make ``seed ^ 1`` produce the order of ``idx ^ 1``).
    """
    k0, k1, k2, k3, k4, k5 = round_keys(int(seed))
    a = _mix32(_mix32(_mix32(idx ^ k0) ^ k1) ^ k2)
    b = _mix32(_mix32(_mix32(idx ^ k3) ^ k4) ^ k5)
    return ((a & 0x7FFFFFFF) << 31) | (b & 0x7FFFFFFF)


def random_permutation(seed: int, n: int) -> np.ndarray:
    """Keyed uniform permutation of ``n`` items (numpy). Returns (n,) int64 slot->item."""
    keys = hash62(int(seed), np.arange(n, dtype=np.uint64))
    return np.argsort(keys, kind="stable").astype(np.int64)


def invert(pi: np.ndarray) -> np.ndarray:
    """Inverse table: ``inv[pi[s]] = s``. Works on (..., n) batches of tables."""
    inv = np.empty_like(pi)
    np.put_along_axis(inv, pi, np.broadcast_to(np.arange(pi.shape[-1]), pi.shape), axis=-1)
    return inv
