"""Keyed readout permutation of raw frames: the sensor's ADC reads pixels out in a secret order.

Schemes for an (H, W) mosaic (mono frames support all three; quad and plane act on 2x2 cells):

* ``pixel``: one three-pass permutation of the H x W pixel grid.
* ``quad``: 2x2 CFA cells move whole over the (H/2) x (W/2) cell grid; the result is a valid
  mosaic of the same CFA whose four packed planes are all permuted by the same table.
* ``plane``: each packed CFA plane k (order of :func:`sensor.cfa.pack`) is permuted within
  itself by its own three-pass permutation of the (H/2) x (W/2) grid.

The three-pass permutation family and its tables (AES-256-CTR keystreams, Fisher-Yates) are in
:mod:`sensor.readout_tables`; the numba kernels that move the pixels, each beside its numpy
reference, in :mod:`sensor.readout_kernels`.

Subkeys come from the key: ``key.subkey("readout/<scheme>")`` (static) or
``key.subkey("readout/<scheme>/frame", frame_index)`` (per-frame rotation).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .keys import Key
from .permutation import check_subkey
from .readout_kernels import aligned, forward_units, inverse_units, unit_view
from .readout_tables import (
    SCHEMES,
    TABLE_FORMAT,
    Scheme,
    check_frame_index,
    check_scheme,
    check_shape,
    compose_table,
    frame_table,
    grid_shape,
    plane_count,
    stacked_tables,
)

__all__ = ["SCHEMES", "TABLE_FORMAT", "ReadoutPermutation", "Scheme", "readout_permutation", "readout_subkey"]


@dataclass(frozen=True)
class ReadoutPermutation:
    """A keyed readout permutation of (H, W) uint16 frames. ``repr`` never shows the subkey.

    Tables are built on first use (AES-256-CTR keystreams and numba shuffles) and cached.
    """

    scheme: Scheme
    height: int
    width: int
    subkey: bytes = field(repr=False, hash=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_scheme(self.scheme)
        h, w = check_shape(self.scheme, self.height, self.width)
        object.__setattr__(self, "height", h)
        object.__setattr__(self, "width", w)
        object.__setattr__(self, "subkey", check_subkey(self.subkey))

    def __reduce__(self):  # the tables are the key: never into a pickle, a checkpoint or a task argument
        raise TypeError("ReadoutPermutation holds a readout subkey and cannot be pickled; rebuild it from the "
                        "key file with sensor.readout.readout_permutation")

    # -- tables ----------------------------------------------------------------------------------

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pass tables stacked per lane: A (T, R, K), B (T, K, R), C (T, R, K); T = 4 for plane,
        else 1. Built once and cached."""
        tabs = self._cache.get("tables")
        if tabs is None:
            rows, cols = grid_shape(self.scheme, self.height, self.width)
            tabs = stacked_tables(self.subkey, rows, cols, plane_count(self.scheme))
            self._cache["tables"] = tabs
        return tabs

    def plane_tables(self) -> np.ndarray:
        """Slot->item tables of the permuted grid(s), int64.

        Returns:
            pixel (H*W,); quad (h*w,), shared by the 4 packed planes; plane (4, h*w).
        """
        a, b, c = self.kernel_tables()
        tabs = np.stack([compose_table(a[k], b[k], c[k]) for k in range(a.shape[0])])
        return tabs if self.scheme == "plane" else tabs[0]

    def table(self) -> np.ndarray:
        """(H*W,) int64 ``pi`` with ``forward(frame).flat[s] == frame.flat[pi[s]]``."""
        return frame_table(self.scheme, self.height, self.width, self.plane_tables())

    # -- frames ----------------------------------------------------------------------------------

    def _prepare(self, frame: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Validate; return src and dst as (N, H, W) C-contiguous, 4-byte aligned uint16 arrays."""
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"frame: expected a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint16:
            raise ValueError(f"frame: expected dtype uint16, got {frame.dtype}")
        h, w = self.height, self.width
        if frame.ndim not in (2, 3) or frame.shape[-2:] != (h, w):
            raise ValueError(f"frame: expected shape ({h}, {w}) or (B, {h}, {w}), got {frame.shape}")
        src = frame if frame.ndim == 3 else frame[None]
        if out is None:
            return aligned(src), np.empty(src.shape, np.uint16)
        if not isinstance(out, np.ndarray) or out.dtype != np.uint16 or out.shape != frame.shape:
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"out: expected a uint16 array of shape {frame.shape}, got {got}")
        if not out.flags.c_contiguous or out.ctypes.data % 4:
            raise ValueError("out: expected a C-contiguous array aligned to 4 bytes")
        dst = out if out.ndim == 3 else out[None]
        if out is frame:
            return dst, dst
        if np.may_share_memory(out, frame):
            raise ValueError("out: overlaps frame without being frame itself")
        return aligned(src), dst

    def forward(self, frame: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None
                ) -> np.ndarray:
        """Protect: the permuted readout of frame (H, W) or (B, H, W) uint16, same shape back.

        ``out`` (same shape, C-contiguous) receives the result; it may be ``frame`` itself.
        ``scratch``: a buffer of at least frame.size uint16 the caller owns and no other thread uses
        meanwhile (a camera reading out a new permutation every frame reuses one instead of faulting
        in a frame-sized buffer per frame); default this permutation's own.
        """
        src, dst = self._prepare(frame, out)
        if scratch is not None:
            if not isinstance(scratch, np.ndarray) or scratch.dtype != np.uint16 or scratch.size < src.size:
                raise ValueError(f"scratch: expected a uint16 array of at least {src.size} elements")
            forward_units(unit_view(src, self.scheme), self.kernel_tables(), unit_view(dst, self.scheme), scratch)
            return dst if frame.ndim == 3 else dst[0]
        with self._scratch(src) as own:
            forward_units(unit_view(src, self.scheme), self.kernel_tables(), unit_view(dst, self.scheme), own)
        return dst if frame.ndim == 3 else dst[0]

    def inverse(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Exact restore of :meth:`forward`'s output (H, W) or (B, H, W) uint16."""
        src, dst = self._prepare(frame, out)
        with self._scratch(src) as scratch:
            inverse_units(unit_view(src, self.scheme), self.kernel_tables(), unit_view(dst, self.scheme), scratch)
        return dst if frame.ndim == 3 else dst[0]

    @contextmanager
    def _scratch(self, src: np.ndarray) -> Iterator[np.ndarray | None]:
        """This permutation's reusable transposed scratch (one frame), or None (a fresh one per call)
        when another thread holds it or the batch is larger than one frame."""
        lock = self._cache.setdefault("lock", threading.Lock())
        if src.shape[0] != 1 or not lock.acquire(blocking=False):
            yield None
            return
        try:
            buf = self._cache.get("scratch")
            if buf is None:
                buf = self._cache["scratch"] = np.empty(src.size, np.uint16)
            yield buf
        finally:
            lock.release()


def readout_permutation(key: Key, scheme: Scheme, height: int, width: int,
                        frame_index: int | None = None) -> ReadoutPermutation:
    """The readout permutation of ``key`` for a scheme and frame size (rotated if frame_index)."""
    check_shape(check_scheme(scheme), height, width)
    return ReadoutPermutation(scheme, height, width, readout_subkey(key, scheme, frame_index))


def readout_subkey(key: Key, scheme: Scheme, frame_index: int | None = None) -> bytes:
    """32-byte subkey of the readout permutation: static (``frame_index=None``) or rotated per frame."""
    check_scheme(scheme)
    if frame_index is None:
        return key.subkey(f"readout/{scheme}")
    return key.subkey(f"readout/{scheme}/frame", check_frame_index(frame_index))
