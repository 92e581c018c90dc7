"""PNG output for previews and figures, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from sensor.atomic import atomic_path
from sensor.errors import PrivcamError


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) RGB or (H, W) grey uint8 image (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb))
        if not ok:
            raise PrivcamError(f"{Path(path)}: could not encode PNG")
        tmp.write_bytes(encoded.tobytes())
