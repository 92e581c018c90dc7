"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the test machine's 2 cores are shared, and spinning OpenMP workers
    slow down badly when oversubscribed. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread(one_torch_thread):
    """Tiny frames: one torch and one numba thread is much faster on shared cores. Restored afterwards."""
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(old)
