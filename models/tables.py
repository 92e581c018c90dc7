"""Torch twins of the sensor's keyed tables, built on any device and bit-identical to numpy.

The sensor (:mod:`sensor.permutation`, :mod:`sensor.readout_tables`) builds its tables with
numpy and numba and never imports torch; a keyed network builds the same tables here, on its
own device (per-frame tables for key rotation, without a host round trip). Both sides hash with
the one :func:`sensor.permutation.hash62`, which runs unchanged on int64 tensors, and sort
stably, so every table here equals its numpy original bit for bit.
"""

from __future__ import annotations

import torch

from sensor.permutation import hash62
from sensor.readout_tables import Scheme, grid_shape, pass_seeds, scheme_seeds

__all__ = [
    "compose_table_torch",
    "invert_torch",
    "plane_tables_torch",
    "random_permutation_torch",
    "three_pass_tables_torch",
]


def random_permutation_torch(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Same table as :func:`sensor.permutation.random_permutation`, built on ``device``.

    Returns:
        (n,) int64 slot -> item.
    """
    keys = hash62(int(seed), torch.arange(n, dtype=torch.int64, device=device))
    return torch.argsort(keys, stable=True)


def invert_torch(pi: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`sensor.permutation.invert` for (..., n) tables."""
    inv = torch.empty_like(pi)
    src = torch.arange(pi.shape[-1], device=pi.device).expand_as(pi)
    return inv.scatter_(-1, pi, src)


def three_pass_tables_torch(seed: int, rows: int, cols: int,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Torch twin of :func:`sensor.readout_tables.three_pass_tables_numpy`.

    Returns:
        A (R, K), B (K, R), C (R, K) int64.
    """
    sa, sb, sc = pass_seeds(seed)
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    a = torch.argsort(hash62(sa, idx).view(rows, cols), dim=1, stable=True)
    b = torch.argsort(hash62(sb, idx).view(cols, rows), dim=1, stable=True)
    c = torch.argsort(hash62(sc, idx).view(rows, cols), dim=1, stable=True)
    return a, b, c


def compose_table_torch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`sensor.readout_tables.compose_table_numpy`.

    Args:
        a: (R, K), b: (K, R), c: (R, K) pass tables.

    Returns:
        (R*K,) int64.
    """
    rows, cols = a.shape
    cp = c.long()
    r = torch.arange(rows, device=a.device).unsqueeze(1).expand(rows, cols)
    rp = b.long()[cp, r]
    return (rp * cols + a.long()[rp, cp]).reshape(-1)


def plane_tables_torch(scheme: Scheme, height: int, width: int, seeds: list[int],
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-frame tables built on ``device``, identical to :func:`sensor.readout_tables.plane_tables`
    for each seed.

    Args:
        seeds: one readout seed per batch item (see :func:`sensor.readout.readout_seed`).

    Returns:
        int64: (B, n) for pixel (n = H*W) and quad (n = H/2 * W/2); (B, 4, n) for plane.
    """
    rows, cols = grid_shape(scheme, height, width)
    out = []
    for seed in seeds:
        tabs = [compose_table_torch(*three_pass_tables_torch(s, rows, cols, device))
                for s in scheme_seeds(scheme, seed)]
        out.append(torch.stack(tabs) if scheme == "plane" else tabs[0])
    if not out:
        n = rows * cols
        return torch.empty((0, 4, n) if scheme == "plane" else (0, n), dtype=torch.int64, device=device)
    return torch.stack(out)
