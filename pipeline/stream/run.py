"""Assemble and run the sensor-to-classifier pipeline, and replay recordings through it.

    dataset scene -> render photons + expose + keyed readout (Sensor.capture) -> [recorder]
    -> batcher -> keyed classifier -> sinks (predictions file, metrics, progress bar)

The classifier stage only ever receives :class:`~sensor.frame.ProtectedFrame` objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.keyed import MODES
from sensor.config import SensorConfig
from sensor.configio import dataclass_from_dict, read_yaml
from sensor.errors import ConfigError, PrivcamError
from sensor.frame import FrameFormat, ProtectedFrame
from sensor.keys import Key, load_key_file
from sensor.rawio import RawFrame
from sensor.readout import SCHEMES
from sensor.scene import raw_to_photons, render_photons
from sensor.sensor import Sensor

from ..resources import DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from .classifier import KeyedClassifier
from .engine import Batch, Map, Pipeline, RunResult
from .inputs import input_shape
from .recording import Recorder, RecordingReader, check_table_format
from .sinks import PredictionWriter
from .sources import open_source


@dataclass(frozen=True)
class SourceSection:
    dataset: str = "fashion-mnist"
    split: str = "test"
    data: str | None = None
    limit: int | None = 2000
    offset: int = 0


@dataclass(frozen=True)
class SensorSection:
    profile: str = MONO_PROFILE
    seed: int = 0


@dataclass(frozen=True)
class KeySection:
    file: str | None = None
    scheme: str = "pixel"
    rotation: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError("key", "scheme", f"one of {SCHEMES}", self.scheme)


@dataclass(frozen=True)
class ModelSection:
    checkpoint: str = DEFAULT_CHECKPOINT
    mode: str = "fused"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("model", "mode", f"one of {MODES}", self.mode)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("model", "device", "auto, cpu or cuda", self.device)


@dataclass(frozen=True)
class PipelineSection:
    batch_size: int = 64
    batch_timeout_s: float = 0.5
    queue_size: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError("pipeline", name, ">= 1", getattr(self, name))
        if self.batch_timeout_s <= 0:
            raise ConfigError("pipeline", "batch_timeout_s", "> 0", self.batch_timeout_s)


@dataclass(frozen=True)
class OutputSection:
    predictions: str | None = None
    record: str | None = None

    def __post_init__(self) -> None:
        if self.predictions and Path(self.predictions).suffix not in (".jsonl", ".csv", ".parquet"):
            raise ConfigError("output", "predictions", "a .jsonl, .csv or .parquet (needs pyarrow) path",
                              self.predictions)
        if self.record and Path(self.record).suffix != ".mcap":
            raise ConfigError("output", "record", "a .mcap path", self.record)


_SECTIONS = {"source": SourceSection, "sensor": SensorSection, "key": KeySection, "model": ModelSection,
             "pipeline": PipelineSection, "output": OutputSection}


@dataclass(frozen=True)
class RunConfig:
    source: SourceSection = field(default_factory=SourceSection)
    sensor: SensorSection = field(default_factory=SensorSection)
    key: KeySection = field(default_factory=KeySection)
    model: ModelSection = field(default_factory=ModelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    output: OutputSection = field(default_factory=OutputSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ConfigError(source, sorted(unknown)[0], f"one of the sections {sorted(_SECTIONS)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            try:
                sections[name] = dataclass_from_dict(section_cls, data.get(name) or {}, f"{source} [{name}]")
            except ConfigError as err:
                raise ConfigError(err.source, f"{name}.{err.field}".replace(f"{name}.{name}.", f"{name}."),
                                  err.expected, err.got) from None
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_dict(read_yaml(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model", "device", "a CUDA device to be present (or use auto/cpu)", name)
    return torch.device(name)


def load_key(path: str | None) -> Key:
    if not path:
        raise ConfigError("key", "file", "a key file path (create one with: privcam keygen --out camera.key)")
    return load_key_file(path)


# -- stages -----------------------------------------------------------------------------------------
def capture_stage(sensor: Sensor, key: Key, scheme: str, rotation: bool):
    """Stage function: (n, scene or raw frame, label) -> ProtectedFrame. The plain frame never leaves it."""
    def capture(item: tuple[int, np.ndarray | RawFrame, int | None]) -> ProtectedFrame:
        n, scene, label = item
        cfg = sensor.config
        photons = (raw_to_photons(scene.data, scene.meta, cfg) if isinstance(scene, RawFrame)
                   else render_photons(scene, cfg))
        return sensor.capture(photons, key, frame_index=n, scheme=scheme, rotation=rotation, label=label)
    return capture


def record_stage(recorder: Recorder):
    def record(frame: ProtectedFrame) -> ProtectedFrame:
        recorder.write(frame)
        return frame
    return record


def summarise(result: RunResult, sink: PredictionWriter, extra: dict[str, Any]) -> dict[str, Any]:
    stages = [s.to_dict() for s in result.stages]
    summary = {**extra, "frames": sink.count, "labelled": sink.labelled, "accuracy": sink.accuracy,
               "wall_s": round(result.wall_s, 3),
               "frames_per_s": round(sink.count / result.wall_s, 2) if result.wall_s > 0 else None,
               "stages": stages, "interrupted": result.interrupted,
               "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"}
    if sink.path is not None:
        summary["predictions"] = str(sink.path)
    return summary


def build_classifier(cfg: RunConfig, key: Key, fmt: FrameFormat) -> tuple[KeyedClassifier, dict[str, Any]]:
    model, manifest = load_checkpoint(resolve(cfg.model.checkpoint))
    trained_scheme = manifest.get("scheme")
    representation = {"pixel": "mosaic", "quad": "packed", "plane": "packed"}
    if trained_scheme and representation[trained_scheme] != representation[fmt.scheme]:
        raise ConfigError("key", "scheme", f"a scheme whose network input matches the checkpoint's "
                          f"({trained_scheme})", fmt.scheme)
    channels = input_shape(fmt.scheme, fmt.height, fmt.width)[0]
    if manifest["arch"].get("in_channels") != channels:  # the manifest's scheme is not authenticated
        raise ConfigError("model", "checkpoint", f"a model taking the {channels}-channel input of scheme "
                          f"{fmt.scheme}", f"{cfg.model.checkpoint} ({manifest['arch'].get('in_channels')} channels)")
    device = pick_device(cfg.model.device)
    return KeyedClassifier(model, key, fmt, mode=cfg.model.mode, device=device), manifest


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Live run: dataset scenes through the keyed sensor into the keyed classifier."""
    key = load_key(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    items, total, (h, w) = open_source(cfg)
    fmt = FrameFormat.from_config(sensor_cfg, scheme=cfg.key.scheme, rotation=cfg.key.rotation, height=h, width=w)
    classifier, manifest = build_classifier(cfg, key, fmt)
    sensor = Sensor(sensor_cfg, seed=cfg.sensor.seed)
    stages: list[Map | Batch] = [Map("sensor", capture_stage(sensor, key, cfg.key.scheme, cfg.key.rotation))]
    on_close = []
    recorder = None
    if cfg.output.record:
        recorder = Recorder(cfg.output.record, sensor_cfg.to_dict(), cfg.key.scheme, cfg.key.rotation, key.fingerprint)
        stages.append(Map("recorder", record_stage(recorder)))
        on_close.append(recorder.close)
    stages += [Batch("batcher", cfg.pipeline.batch_size, cfg.pipeline.batch_timeout_s),
               Map("model", classifier)]
    sink = PredictionWriter(cfg.output.predictions, total, progress)
    on_close.append(sink.close)
    result = Pipeline(items, stages, sink, cfg.pipeline.queue_size,
                      on_close=on_close).run()
    extra = {"job": "run", "dataset": cfg.source.dataset, "split": cfg.source.split, "scheme": cfg.key.scheme,
             "rotation": cfg.key.rotation, "mode": cfg.model.mode, "device": str(classifier.device),
             "key_fingerprint": key.fingerprint, "checkpoint": cfg.model.checkpoint,
             "checkpoint_plain_accuracy": manifest.get("plain_test_accuracy")}
    if recorder is not None:
        extra["recording"] = {"path": cfg.output.record, "frames_written": recorder.frames_written}
    return summarise(result, sink, extra)


def make_recording_hint(path: str) -> str:
    """What to run when a recording is not there (every "not here" error names the command)."""
    return f"make one with privcam record --key KEY --out {path}, or privcam run --key KEY --record {path}"


def replay_recording(path: str, cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Stream a recording through the keyed classifier. Damaged parts are skipped and reported."""
    key = load_key(cfg.key.file)
    if not Path(path).exists():
        raise PrivcamError(f"{path}: recording not found ({make_recording_hint(path)})")
    reader = RecordingReader(path)
    check_table_format(path, reader.table_format)
    if reader.key_fingerprint != key.fingerprint:
        raise PrivcamError(f"{path}: recorded with key {reader.key_fingerprint}, but {cfg.key.file} has fingerprint "
                           f"{key.fingerprint}; refusing to replay with the wrong key")
    sensor_dict = reader.sensor_config() or {}
    sensor_cfg = SensorConfig.from_dict(sensor_dict, f"{path} [privcam.sensor]")
    frames = reader.frames()
    first = next(frames, None)
    if first is None:
        report = reader.report.to_dict()
        return {"job": "replay", "recording": path, "frames": 0, "replay_report": report,
                "error": "no intact frame in the recording"}
    m = first.meta
    fmt = FrameFormat.from_config(sensor_cfg, scheme=m.scheme, rotation=m.rotation, height=m.height, width=m.width)
    classifier, manifest = build_classifier(cfg, key, fmt)

    def all_frames() -> Iterator[ProtectedFrame]:
        yield first
        yield from frames

    total = reader.report.expected_frames
    sink = PredictionWriter(cfg.output.predictions, total, progress)
    stages = [Batch("batcher", cfg.pipeline.batch_size, cfg.pipeline.batch_timeout_s), Map("model", classifier)]
    result = Pipeline(all_frames(), stages, sink, cfg.pipeline.queue_size, on_close=[sink.close]).run()
    extra = {"job": "replay", "recording": path, "scheme": fmt.scheme, "rotation": fmt.rotation,
             "mode": cfg.model.mode, "device": str(classifier.device), "key_fingerprint": key.fingerprint,
             "checkpoint": cfg.model.checkpoint, "replay_report": reader.report.to_dict()}
    return summarise(result, sink, extra)


def record_frames(cfg: RunConfig, out: str, progress: bool = True) -> dict[str, Any]:
    """Sensor and recorder only: capture the source's scenes as protected frames into ``out`` (.mcap)."""
    key = load_key(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    items, total, _ = open_source(cfg)
    sensor = Sensor(sensor_cfg, seed=cfg.sensor.seed)
    recorder = Recorder(out, sensor_cfg.to_dict(), cfg.key.scheme, cfg.key.rotation, key.fingerprint)
    bar = tqdm(total=total, unit="frame", desc="recording", disable=not progress)
    stages = [Map("sensor", capture_stage(sensor, key, cfg.key.scheme, cfg.key.rotation)),
              Map("recorder", record_stage(recorder))]
    result = Pipeline(items, stages, lambda _: bar.update(1), cfg.pipeline.queue_size,
                      on_close=[recorder.close, bar.close]).run()
    return {"job": "record", "recording": out, "frames": recorder.frames_written, "scheme": cfg.key.scheme,
            "rotation": cfg.key.rotation, "key_fingerprint": key.fingerprint, "wall_s": round(result.wall_s, 3),
            "stages": [s.to_dict() for s in result.stages], "interrupted": result.interrupted,
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"}
