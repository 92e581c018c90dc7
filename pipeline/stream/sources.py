"""Sources: dataset scenes or raw frames as (frame index, item, label), and scenes through the sensor.

:func:`expose_scenes` is the one scene-to-plain-frame path (training, evaluation, the privacy lab).
Items that cannot be read (a damaged raw file in a folder, an unreadable image) are skipped and reported
in a :class:`SkipLog` instead of stopping the run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sensor.errors import ConfigError, PrivcamError
from sensor.rawio import EXTENSIONS as RAW_EXTENSIONS
from sensor.rawio import RawFrame, read_raw
from sensor.scene import render_photons
from sensor.sensor import Sensor

from .datasets import Dataset, load_dataset


class SkipLog:
    """Items a run skipped: a count and the first ``keep`` reasons (thread-safe)."""

    def __init__(self, keep: int = 20) -> None:
        self.count = 0
        self.items: list[str] = []
        self._keep = keep
        self._lock = threading.Lock()

    def add(self, why: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.items) < self._keep:
                self.items.append(why)


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


def raw_folder_items(files: list[Path], first_frame_index: int = 0,
                     skips: SkipLog | None = None) -> Iterator[tuple[int, RawFrame, None]]:
    """(frame index, raw frame, None) for each raw file, read lazily. With ``skips``, a file that cannot be
    read is reported there and skipped (its frame index is not reused)."""
    for i, path in enumerate(files):
        try:
            frame = read_raw(path)
        except PrivcamError as err:
            if skips is None:
                raise
            skips.add(str(err))
            continue
        yield first_frame_index + i, frame, None


def open_source(cfg: Any, skips: SkipLog | None = None) -> tuple[Iterator[tuple[int, Any, int | None]], int,
                                                                  tuple[int, int]]:
    """The configured source as (items, count, frame (H, W)). ``rawfolder`` reads frames lazily; the frame
    size is the first readable file's. Unreadable items go to ``skips`` (when given)."""
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
        shape, problems = None, []
        for path in files:
            try:
                shape = read_raw(path).data.shape
                break
            except PrivcamError as err:
                problems.append(str(err))
        if shape is None:
            raise ConfigError("source", "data", "a folder with at least one readable raw frame",
                              f"{len(files)} unreadable, first: {problems[0]}")
        return raw_folder_items(files, src.offset, skips), len(files), shape
    data = load_dataset(src.dataset, src.split, src.data).subset(src.limit, src.offset)
    if len(data) == 0:
        raise ConfigError("source", "limit", "at least one item in the selected range", src.limit)
    if skips is not None:
        for why in data.skipped:
            skips.add(why)
    return scene_items(data, src.offset), len(data), data.images.shape[1:3]
