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

import numpy as np
import torch

from sensor.cfa import pack
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
    """
    if frames.ndim != 3:
        raise ValueError(f"frames: expected (B, H, W), got {frames.shape}")
    scheme = scheme or fmt.scheme
    x = frames[:, None] if scheme == "pixel" else pack(frames)
    scale = np.float32(1.0 / max(fmt.max_dn - fmt.black_level, 1))
    y = x.astype(np.float32)  # one frame-batch-sized array, then in place: the same float32 operations
    y -= np.float32(fmt.black_level)  # as (x - black) * scale, without two more temporaries of its size
    y *= scale
    out = torch.from_numpy(y)
    if size is not None and tuple(size) != tuple(out.shape[2:]):
        from models.frontend import area_resize

        out = area_resize(out, size)
    return out


def to_dn(y: torch.Tensor, fmt: FrameFormat) -> np.ndarray:
    """(B, 1, H, W) float in [0, 1] (black to white) -> (B, H, W) uint16 DN, rounded (inverse of the
    "pixel" :func:`network_input`)."""
    dn = fmt.black_level + y[:, 0].detach().float().cpu().numpy() * (fmt.max_dn - fmt.black_level)
    return np.clip(np.rint(dn), 0, fmt.max_dn).astype(np.uint16)
