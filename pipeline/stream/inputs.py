"""The network input of frames: the one conversion used for training, evaluation and inference.

Element-wise, so it commutes with the readout permutation (a protected frame's input is the plain
frame's input in slot order):

* ``pixel`` scheme: the (H, W) mosaic as one channel, (1, H, W);
* ``quad`` and ``plane`` schemes: the four packed CFA planes, (4, H/2, W/2);

scaled to ``(dn - black_level) / (max_dn - black_level)``; with ``size`` then resampled to the
model's input size by the front end (:func:`models.frontend.area_resize`, INTER_AREA per channel,
k x k binning for integer factors: per CFA plane for quad/plane). The keyed classifier applies
the keyed twin of that front end to protected frames (:class:`models.frontend.KeyedResize`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sensor.cfa import check_packable, pack
from sensor.frame import FrameFormat


def input_shape(scheme: str, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the network input for frames of (height, width) under ``scheme``."""
    if scheme == "pixel":
        return (1, height, width)
    if scheme in ("quad", "plane"):
        return (4, height // 2, width // 2)
    raise ValueError(f"scheme: expected pixel, quad or plane, got {scheme!r}")


def network_input(frames: np.ndarray, fmt: FrameFormat, scheme: str | None = None,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames (B, H, W) uint16 -> network input (B, C, h, w) float32 (CPU tensor).

    ``scheme`` defaults to ``fmt.scheme``; "pixel" gives the normalised mosaic (also the U-Net input).
    ``size``: the model's input (h, w) when it is smaller than the frames' (the plain front end).
    uint16 frames go through one numba pass (:func:`_scaled_input_nb`), bit for bit
    :func:`scaled_input_numpy`; other dtypes through the numpy reference.
    """
    if frames.ndim != 3:
        raise ValueError(f"frames: expected (B, H, W), got {frames.shape}")
    scheme = scheme or fmt.scheme
    if scheme != "pixel":
        check_packable(*frames.shape[1:])
    black, scale = np.float32(fmt.black_level), input_scale(fmt)
    if frames.dtype == np.uint16:
        b, h, w = frames.shape
        y = np.empty((b, 1, h, w) if scheme == "pixel" else (b, 4, h // 2, w // 2), np.float32)
        _scaled_input_nb(np.ascontiguousarray(frames), black, scale, scheme != "pixel", y)
    else:
        y = scaled_input_numpy(frames, scheme, black, scale)
    out = torch.from_numpy(y)
    if size is not None and tuple(size) != tuple(out.shape[2:]):
        from models.frontend import area_resize

        out = area_resize(out, size)
    return out


def input_scale(fmt: FrameFormat) -> np.float32:
    """The float32 factor from DN above black to [0, 1]: 1 / (max_dn - black_level)."""
    return np.float32(1.0 / max(fmt.max_dn - fmt.black_level, 1))


def scaled_input_numpy(frames: np.ndarray, scheme: str, black: np.float32, scale: np.float32) -> np.ndarray:
    """Reference of :func:`_scaled_input_nb`: (B, H, W) -> (B, 1, H, W) for "pixel", else the packed CFA
    planes (B, 4, H/2, W/2), as float32 ``(x - black) * scale`` (each step rounded to float32)."""
    x = frames[:, None] if scheme == "pixel" else pack(frames)
    y = x.astype(np.float32)  # one frame-batch-sized array, then in place: the same float32 operations
    y -= black  # as (x - black) * scale, without two more temporaries of its size
    y *= scale
    return y


@numba.njit(nogil=True, cache=True, parallel=True)
def _scaled_input_nb(frames, black, scale, packed, out):  # pragma: no cover - numba
    """:func:`scaled_input_numpy` in one pass: frames (B, H, W) uint16 into ``out`` (B, 1, H, W) or,
    ``packed``, (B, 4, H/2, W/2) float32; black and scale float32, so every step is a float32 op."""
    b, h, w = frames.shape
    if packed:
        hh, ww = h // 2, w // 2
        for job in numba.prange(b * hh):
            i, y = job // hh, job % hh
            for dy in range(2):
                row = frames[i, 2 * y + dy]
                for x in range(ww):
                    out[i, 2 * dy, y, x] = (np.float32(row[2 * x]) - black) * scale
                    out[i, 2 * dy + 1, y, x] = (np.float32(row[2 * x + 1]) - black) * scale
    else:
        for job in numba.prange(b * h):
            i, y = job // h, job % h
            for x in range(w):
                out[i, 0, y, x] = (np.float32(frames[i, y, x]) - black) * scale
    return out


def to_dn(y: torch.Tensor, fmt: FrameFormat) -> np.ndarray:
    """(B, 1, H, W) float in [0, 1] (black to white) -> (B, H, W) uint16 DN, rounded (inverse of the
    "pixel" :func:`network_input`)."""
    dn = fmt.black_level + y[:, 0].detach().float().cpu().numpy() * (fmt.max_dn - fmt.black_level)
    return np.clip(np.rint(dn), 0, fmt.max_dn).astype(np.uint16)
