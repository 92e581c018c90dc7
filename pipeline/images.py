"""Atomic PNG output for previews and figures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from sensor.errors import PrivcamError


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (temporary file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        if not cv2.imwrite(tmp, np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb)):
            raise PrivcamError(f"{path}: could not encode PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (mkstemp files are 0600; published files get the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
