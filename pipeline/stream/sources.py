"""Sources: dataset scenes or raw frames as (frame index, item, label), and scenes through the sensor.

:func:`expose_scenes` is the one scene-to-plain-frame path (training, evaluation, the privacy lab).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sensor.errors import ConfigError
from sensor.rawio import EXTENSIONS as RAW_EXTENSIONS
from sensor.rawio import RawFrame, read_raw
from sensor.scene import render_photons
from sensor.sensor import Sensor

from .datasets import Dataset, load_dataset


def expose_scenes(images: np.ndarray, sensor: Sensor, first_frame_index: int, progress: bool = False,
                  desc: str = "frames") -> np.ndarray:
    """Scenes (B, H, W[, 3]) uint8 -> plain sensor frames (B, H, W) uint16; frame n = first + i."""
    out = np.empty((len(images), *images.shape[1:3]), np.uint16)
    for i in tqdm(range(len(images)), desc=desc, disable=not progress, unit="frame", leave=False):
        out[i] = sensor.expose(render_photons(images[i], sensor.config), first_frame_index + i)
    return out


def scene_items(data: Dataset, first_frame_index: int = 0) -> Iterator[tuple[int, np.ndarray, int | None]]:
    """(frame index, scene image, label) for each dataset item."""
    for i in range(len(data)):
        label = None if data.labels is None else int(data.labels[i])
        yield first_frame_index + i, data.images[i], label


def raw_folder_items(files: list[Path], first_frame_index: int = 0) -> Iterator[tuple[int, RawFrame, None]]:
    """(frame index, raw frame, None) for each raw file, read lazily."""
    for i, path in enumerate(files):
        yield first_frame_index + i, read_raw(path), None


def open_source(cfg: Any) -> tuple[Iterator[tuple[int, Any, int | None]], int, tuple[int, int]]:
    """The configured source as (items, count, frame (H, W)). ``rawfolder`` reads frames lazily."""
    src = cfg.source
    if src.dataset == "rawfolder":
        if not src.data:
            raise ConfigError("source", "data", "a folder of raw frames for dataset rawfolder")
        folder = Path(src.data)
        if not folder.is_dir():
            raise ConfigError("source", "data", "a folder of raw frames", src.data)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in RAW_EXTENSIONS)
        files = files[src.offset:None if src.limit is None else src.offset + src.limit]
        if not files:
            raise ConfigError("source", "data", f"a folder with raw frames ({', '.join(RAW_EXTENSIONS)})", src.data)
        return raw_folder_items(files, src.offset), len(files), read_raw(files[0]).data.shape
    data = load_dataset(src.dataset, src.split, src.data).subset(src.limit, src.offset)
    if len(data) == 0:
        raise ConfigError("source", "limit", "at least one item in the selected range", src.limit)
    return scene_items(data, src.offset), len(data), data.images.shape[1:3]


