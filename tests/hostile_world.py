"""Shared inputs of the hostile-input tests: a small labelled dataset, keys, checkpoints, a recording.

Everything is made by the tests themselves (no downloaded file).
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_checkpoint
from models.plain import build_model
from pipeline.cli.main import main
from pipeline.resources import MONO_PROFILE, resolve
from pipeline.stream.run import RunConfig
from sensor.config import SensorConfig
from sensor.keys import write_key_file

N = 24


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def world_config(world: Path, limit: int, **sections) -> RunConfig:
    """A run config over a test world (IDX dataset, m.pt, cam.key); ``sections`` override fields."""
    data = {"source": {"dataset": "mnist", "data": str(world), "limit": limit},
            "sensor": {"profile": "configs/sensors/mono10.yaml", "seed": 3},
            "key": {"file": str(world / "cam.key"), "scheme": "pixel"},
            "model": {"checkpoint": str(world / "m.pt"), "device": "cpu"},
            "pipeline": {"batch_size": 8, "batch_timeout_s": 30.0}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return RunConfig.from_dict(data, "test")


def make_world(root: Path) -> Path:
    """IDX train/test splits of N 28x28 scenes, two keys, 1- and 4-channel compact checkpoints, a recording."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (N, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, N))
    torch.manual_seed(0)
    mono = SensorConfig.from_yaml(resolve(MONO_PROFILE)).to_dict()  # as train records it in the manifest
    for name, channels, scheme in (("m.pt", 1, "pixel"), ("m4.pt", 4, "quad")):
        arch = {"name": "compact", "in_channels": channels, "num_classes": 10}
        save_checkpoint(root / name, build_model(**arch), arch, {"scheme": scheme, "sensor": mono})
    write_key_file(root / "cam.key")
    write_key_file(root / "other.key")
    assert main(["record", *source_args(root), "--out", str(root / "rec.mcap"), "--quiet"]) == 0
    return root


def source_args(world: Path, limit: int = N) -> list[str]:
    return ["--key", str(world / "cam.key"), "--dataset", "mnist", "--data", str(world), "--limit", str(limit)]


def model_args(world: Path) -> list[str]:
    return ["--checkpoint", str(world / "m.pt"), "--set", "model.device=cpu", "--set", "pipeline.batch_size=8"]


def top_level_records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, opcode, length) of each top-level MCAP record, walked from the magic."""
    out, pos = [], 8
    while pos + 9 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        out.append((pos, data[pos], length))
        pos += 9 + length
    return out


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read() in the main thread."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


class Marker:
    """A pickled object whose unpickling would create a folder: proof that no code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))
