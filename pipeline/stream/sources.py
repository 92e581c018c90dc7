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

import cv2
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


def fit_scene(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """A scene resampled to the sensor's (height, width): OpenCV ``INTER_AREA`` when it shrinks on both
    axes, ``INTER_LINEAR`` otherwise. (H, W[, 3]) uint8 -> (height, width[, 3]) uint8; unchanged when
    ``size`` is None or already the scene's size."""
    if size is None or tuple(image.shape[:2]) == tuple(size):
        return image
    h, w = size
    shrink = h <= image.shape[0] and w <= image.shape[1]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out.reshape(h, w, *image.shape[2:])


def frame_hw(images: np.ndarray, size: tuple[int, int] | None) -> tuple[int, int]:
    """The sensor frames' (H, W) for scenes ``images`` (N, H, W[, 3]): ``size`` when given, else the scenes'."""
    return tuple(size) if size is not None else tuple(images.shape[1:3])


def expose_scenes(images: np.ndarray, sensor: Sensor, first_frame_index: int, progress: bool = False,
                  desc: str = "frames", size: tuple[int, int] | None = None) -> np.ndarray:
    """Scenes (B, H, W[, 3]) uint8 -> plain sensor frames (B, H', W') uint16; frame n = first + i.

    ``size``: the sensor's (H', W') (each scene resampled by :func:`fit_scene`); default the scenes' (H, W).
    """
    out = np.empty((len(images), *frame_hw(images, size)), np.uint16)
    for i in tqdm(range(len(images)), desc=desc, disable=not progress, unit="frame", leave=False):
        out[i] = sensor.expose(render_photons(fit_scene(images[i], size), sensor.config), first_frame_index + i)
    return out


def scene_items(data: Dataset, first_frame_index: int = 0,
                size: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray, int | None]]:
    """(frame index, scene image, label) for each dataset item; with ``size`` each scene is resampled to
    the sensor's (H, W) (:func:`fit_scene`), lazily."""
    for i in range(len(data)):
        label = None if data.labels is None else int(data.labels[i])
        yield first_frame_index + i, fit_scene(data.images[i], size), label


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
    size is the first readable file's. Datasets: the scenes' size (for a folder of images, the most common
    size), or ``source.frame_size`` when set (every scene resampled to it). Unreadable items go to ``skips``
    (when given)."""
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
    return scene_items(data, src.offset, src.frame_size), len(data), frame_hw(data.images, src.frame_size)
