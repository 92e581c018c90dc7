"""Shipped files (package data) by name: sensor profiles, configs, weights and the data sample.

A command-line path such as ``configs/sensors/mono10.yaml`` or ``models/weights/x.pt`` means the
user's file when it exists (relative to the working directory), else the shipped file of that
name, so the README's commands work from any folder and from a non-editable install.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

DEFAULT_CHECKPOINT = "models/weights/compact_fashion_mnist_pixel.pt"
MONO_PROFILE = "configs/sensors/mono10.yaml"
COLOUR_PROFILE = "configs/sensors/default.yaml"
RUN_CONFIG = "configs/pipeline/default.yaml"


def _shipped(package: str, parts: list[str]) -> Path:
    return Path(str(files(package).joinpath(*parts)))


def shipped_path(value: str | os.PathLike) -> Path | None:
    """The shipped file ``value`` names (``configs/...`` or ``models/weights/...``), or None."""
    parts = Path(value).as_posix().split("/")
    if len(parts) >= 2 and parts[0] == "configs":
        path = _shipped("configs", parts[1:])
    elif len(parts) == 3 and parts[:2] == ["models", "weights"]:
        path = _shipped("models", parts[1:])
    else:
        return None
    return path if path.is_file() else None


def resolve(value: str | os.PathLike) -> Path:
    """The user's file if ``value`` exists, else the shipped file of that name, else ``value`` as
    given (so the error that follows names what the user typed)."""
    path = Path(value)
    if path.exists():
        return path
    return shipped_path(value) or path


def sample_root() -> Path:
    """The shipped Fashion-MNIST sample (the first 1000 test images, IDX files)."""
    return _shipped("pipeline", ["stream", "data", "fashion_mnist_sample"])
