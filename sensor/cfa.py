"""Colour filter array (Bayer) patterns: mosaic, pack into planes, unpack, demosaic.

Pattern naming convention: the four letters name the colours of the top-left 2x2 cell in
row-major order, top-left pixel first. ``RGGB`` means pixel (0, 0) is red, (0, 1) green,
(1, 0) green and (1, 1) blue. ``mono`` has no colour filter.

Packed planes are always ordered as the pattern letters: plane ``k`` holds the pixels at
offset ``(k // 2, k % 2)`` of every 2x2 cell, so ``pack`` and ``unpack`` are exact inverses.
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import ConfigError

PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG", "mono")
_CHANNEL = {"R": 0, "G": 1, "B": 2}
# OpenCV names Bayer codes by the second row's first two pixels; these are the verified
# mappings for a top-left-first pattern name.
_CV_DEMOSAIC = {
    "RGGB": cv2.COLOR_BayerRGGB2RGB,
    "BGGR": cv2.COLOR_BayerBGGR2RGB,
    "GRBG": cv2.COLOR_BayerGRBG2RGB,
    "GBRG": cv2.COLOR_BayerGBRG2RGB,
}


def check_pattern(pattern: str, source: str = "cfa") -> str:
    """Return ``pattern`` if it is a known CFA name, else raise ConfigError."""
    if pattern not in PATTERNS:
        raise ConfigError(source, "cfa", f"one of {', '.join(PATTERNS)}", pattern)
    return pattern


def colour_index_map(pattern: str, height: int, width: int) -> np.ndarray:
    """Colour of each pixel: 0 red, 1 green, 2 blue; all 1 (treated as green/luma) for mono.

    Returns:
        (H, W) uint8.
    """
    check_pattern(pattern)
    if pattern == "mono":
        return np.ones((height, width), np.uint8)
    cell = np.array([_CHANNEL[c] for c in pattern], np.uint8).reshape(2, 2)
    reps = ((height + 1) // 2, (width + 1) // 2)
    return np.tile(cell, reps)[:height, :width]


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image through a colour filter array.

    Args:
        rgb: (H, W, 3) any dtype, or (H, W) for mono.
        pattern: CFA name (see module docstring).

    Returns:
        (H, W) array of rgb's dtype.
    """
    check_pattern(pattern)
    if pattern == "mono":
        if rgb.ndim == 2:
            return rgb.copy()
        return rgb.mean(axis=2).astype(rgb.dtype)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"mosaic: expected an (H, W, 3) image for pattern {pattern}, got {rgb.shape}")
    idx = colour_index_map(pattern, rgb.shape[0], rgb.shape[1])
    return np.take_along_axis(rgb, idx[..., None].astype(np.intp), axis=2)[..., 0]


def check_packable(height: int, width: int) -> None:
    """Raise ValueError unless a (height, width) mosaic splits into whole 2x2 cells (:func:`pack`)."""
    if height % 2 or width % 2:
        raise ValueError(f"pack: height and width must be even, got {height}x{width}")


def pack(raw: np.ndarray) -> np.ndarray:
    """Split a mosaic into its four 2x2-cell planes, in pattern-letter order.

    Args:
        raw: (..., H, W) with H and W even.

    Returns:
        (..., 4, H/2, W/2), plane k = raw[..., k//2::2, k%2::2].
    """
    check_packable(*raw.shape[-2:])
    return np.stack([raw[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], axis=-3)


def unpack(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack`.

    Args:
        planes: (..., 4, h, w).

    Returns:
        (..., 2h, 2w).
    """
    if planes.shape[-3] != 4:
        raise ValueError(f"unpack: expected 4 planes on axis -3, got shape {planes.shape}")
    h, w = planes.shape[-2:]
    out = np.empty(planes.shape[:-3] + (2 * h, 2 * w), planes.dtype)
    for k in range(4):
        out[..., k // 2 :: 2, k % 2 :: 2] = planes[..., k, :, :]
    return out


def demosaic(raw: np.ndarray, pattern: str) -> np.ndarray:
    """Bilinear demosaic for previews (OpenCV). Not used on any protected path.

    Args:
        raw: (H, W) uint8 or uint16 mosaic.

    Returns:
        (H, W, 3) RGB of raw's dtype; for mono the grey value repeated.
    """
    check_pattern(pattern)
    if raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"demosaic: expected uint8 or uint16 input, got {raw.dtype}")
    if pattern == "mono":
        return np.repeat(raw[..., None], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(raw), _CV_DEMOSAIC[pattern])
