"""The keyed tables a network needs, on its device: built on the CPU by the sensor's own builders
(:mod:`sensor.permutation`, :mod:`sensor.readout_tables`: AES-256-CTR keystreams and Fisher-Yates)
and copied, so the model's tables are the sensor's bit for bit on any device. (The cipher is not
ported to torch: one implementation of the key schedule, from ``cryptography``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sensor.permutation import random_permutation
from sensor.readout_tables import Scheme, composed_planes, grid_shape, plane_count, stacked_tables


def to_device(table: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A CPU int64 table as a tensor on ``device`` (pinned, non-blocking copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(table, np.int64))
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_permutation_torch(subkey: bytes, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`sensor.permutation.random_permutation` of ``n`` items on ``device``. Returns (n,) int64."""
    return to_device(random_permutation(subkey, n), device)


def invert_torch(pi: torch.Tensor) -> torch.Tensor:
    """Inverse of (..., n) tables: ``inv[pi[s]] = s``."""
    inv = torch.empty_like(pi)
    src = torch.arange(pi.shape[-1], device=pi.device).expand_as(pi)
    return inv.scatter_(-1, pi, src)


def plane_tables_torch(scheme: Scheme, height: int, width: int, subkeys: list[bytes],
                       device: torch.device | str = "cpu",
                       built: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None
                       ) -> torch.Tensor:
    """Per-frame readout tables on ``device``, one per subkey (:func:`sensor.readout.readout_subkey`).

    ``built[i]``, where given, is frame i's pass tables already built from ``subkeys[i]`` (the sensor's
    :meth:`sensor.readout.ReadoutPermutation.kernel_tables`, :mod:`pipeline.stream.handoff`): only
    composed here, not built again. The caller vouches that they belong to ``subkeys[i]``.

    Returns:
        int64: (B, n) for pixel (n = H*W) and quad (n = H/2 * W/2); (B, 4, n) for plane.
    """
    rows, cols = grid_shape(scheme, height, width)
    n = rows * cols
    if built is not None and len(built) != len(subkeys):
        raise ValueError(f"plane_tables_torch: {len(built)} built tables for {len(subkeys)} subkeys")
    out = np.empty((len(subkeys), 4, n) if scheme == "plane" else (len(subkeys), n), np.int64)
    for i, subkey in enumerate(subkeys):  # :func:`sensor.readout_tables.plane_tables`, composed in place
        tabs = built[i] if built is not None else None
        if tabs is None:
            tabs = stacked_tables(subkey, rows, cols, plane_count(scheme))
        composed_planes(scheme, *tabs, out=out[i])
    return to_device(out, device)
