"""Assemble and run the sensor-to-classifier pipeline, and replay recordings through it.

    dataset scene -> render photons + expose + keyed readout (Sensor.capture) -> [recorder]
    -> batcher -> keyed classifier -> sinks (predictions file, metrics, progress bar)

The classifier stage only ever receives :class:`~sensor.frame.ProtectedFrame` objects.

Hostile input: every output path is checked before any work (:func:`check_run_outputs`); an item that
cannot be used (an unreadable raw file, a frame of another size or key) is skipped and reported in the
summary's ``skipped`` / ``skipped_items`` instead of stopping the run; outputs are placed only when the
run succeeded (:class:`sensor.atomic.StagedOutput`), so a failed or interrupted run never replaces an
existing recording or prediction file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_checkpoint, model_input_hw, read_manifest
from models.keyed import MODES
from sensor.atomic import check_output_path
from sensor.config import SensorConfig
from sensor.configio import check_range, check_size, dataclass_from_dict, read_yaml
from sensor.errors import ConfigError, PrivcamError
from sensor.frame import FrameFormat, FrameMeta, ProtectedFrame
from sensor.keys import Key, load_key_file, new_session_nonce
from sensor.rawio import RawFrame
from sensor.readout import SCHEMES
from sensor.scene import raw_to_photons, render_photons
from sensor.sensor import Sensor

from ..resources import DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from .authcheck import FrameAuthenticator, session_key  # noqa: F401 - session_key: re-exported
from .budget import ThreadBudget, machine_cores, main_thread_serial, parse_threads, replay_threads, torch_threads
from .classifier import KeyedClassifier
from .engine import Batch, Map, Pipeline, RunResult, chunks
from .handoff import ReadoutHandoff, handoff_capacity, order_nbytes
from .inputs import input_shape
from .recording import Recorder, RecordingReader, check_recording_format, check_table_format, stream_mismatch
from .sinks import OUTPUT_SUFFIXES, PredictionWriter
from .sources import SkipLog, open_source
from .stages import auto_budget, live_stages, micro_batch_size


@dataclass(frozen=True)
class SourceSection:
    dataset: str = "fashion-mnist"
    split: str = "test"
    data: str | None = None
    limit: int | None = 2000
    offset: int = 0
    frame_size: tuple[int, int] | None = None  # [H, W]: scenes resampled to this sensor resolution

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError("source", "split", "train or test", self.split)
        object.__setattr__(self, "frame_size", check_size("source", "frame_size", self.frame_size))
        if self.frame_size is not None and self.dataset == "rawfolder":
            raise ConfigError("source", "frame_size", "null for dataset rawfolder (raw frames are read at their "
                              "own size)", list(self.frame_size))
        if self.limit is not None:
            check_range("source", "limit", self.limit, 1)
        check_range("source", "offset", self.offset, 0)


@dataclass(frozen=True)
class SensorSection:
    profile: str = MONO_PROFILE
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("sensor", "seed", self.seed, 0, 2**63 - 1)


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
    micro_batch: Any = "auto"  # scenes per sensor hand-off: "auto" (about a megapixel) or 1..batch_size
    # "auto" (measured at start-up) or {sensor: N, model: M[, mode: split|serial|turns|overlap][, sensor_frames: K]}
    threads: Any = "auto"

    def __post_init__(self) -> None:
        check_range("pipeline", "batch_size", self.batch_size, 1, 1 << 16)
        check_range("pipeline", "queue_size", self.queue_size, 1, 1 << 16)
        check_range("pipeline", "batch_timeout_s", self.batch_timeout_s, 0, 3600, low_open=True)
        if self.micro_batch != "auto":
            if isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int):
                raise ConfigError("pipeline", "micro_batch", "auto or an integer", self.micro_batch)
            check_range("pipeline", "micro_batch", self.micro_batch, 1, self.batch_size)
        parse_threads(self.threads)  # validated here, resolved at the start of a run


@dataclass(frozen=True)
class OutputSection:
    predictions: str | None = None
    record: str | None = None
    store_labels: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.store_labels, bool):
            raise ConfigError("output", "store_labels", "true or false", self.store_labels)
        if self.predictions and Path(self.predictions).suffix not in OUTPUT_SUFFIXES:
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
                section = data.get(name)
                sections[name] = dataclass_from_dict(section_cls, {} if section is None else section,
                                                     f"{source} [{name}]")
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


def open_session(path: str | None) -> Key:
    """The master key in ``path`` and a fresh session under it: the session key of a new random nonce.

    Live capture (run, record, each camera) always starts a new session, so frame ``n``'s orders never
    repeat across runs. A session key file is refused here: it may only open its recorded session.
    """
    key = load_key(path)
    if key.session_nonce is not None:
        raise ConfigError("key", "file", "a master key for live capture (a session key file only opens the "
                          f"recording of session {key.session})", str(path))
    return key.for_session(new_session_nonce())


# -- stages -----------------------------------------------------------------------------------------
def capture_stage(sensor: Sensor, key: Key, scheme: str, rotation: bool, shape: tuple[int, int] | None = None,
                  skips: SkipLog | None = None, labels: dict[int, int | None] | None = None,
                  readouts: ReadoutHandoff | None = None):
    """Stage function: (n, scene or raw frame, label) -> ProtectedFrame. The plain frame never leaves it.

    With ``skips``, an item that cannot be captured (another size than ``shape``, a raw frame whose
    CFA differs from the sensor's) is reported there and dropped instead of stopping the run.
    With ``labels``, class labels stay out of the protected frames: frame n's label is put in
    ``labels[n]`` for the run's own accuracy (see :func:`labelled_sink`); without it they travel in the
    frame's (authenticated) header, for recordings made with ``--store-labels``. With ``readouts`` (and
    rotation), each frame's readout order is left there for the run's classifier
    (:mod:`pipeline.stream.handoff`).
    """
    on_readout = None if readouts is None else readouts.put

    def capture(item: tuple[int, np.ndarray | RawFrame, int | None]) -> ProtectedFrame | None:
        n, scene, label = item
        cfg = sensor.config
        data = scene.data if isinstance(scene, RawFrame) else scene
        try:
            if shape is not None and tuple(data.shape[:2]) != tuple(shape):
                raise PrivcamError(f"item {n}: expected a frame of {shape[1]}x{shape[0]} like the first, got "
                                   f"{data.shape[1]}x{data.shape[0]}")
            photons = (raw_to_photons(scene.data, scene.meta, cfg) if isinstance(scene, RawFrame)
                       else render_photons(scene, cfg))
        except PrivcamError as err:
            if skips is None:
                raise
            skips.add(str(err))
            return None
        if labels is not None:
            labels[n], label = label, None
        return sensor.capture(photons, key, frame_index=n, scheme=scheme, rotation=rotation, label=label,
                              on_readout=on_readout)
    return capture


def labelled_sink(sink: Any, labels: dict[int, int | None]):
    """The sink with each prediction's label taken from ``labels`` (filled by the capture stage)."""
    def write(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["label"] is None:
                row["label"] = labels.pop(row["frame_index"], None)
        sink(rows)
    return write


def plan_threads(section: PipelineSection, items: Iterator[Any], probe, classifier: KeyedClassifier
                 ) -> tuple[Iterator[Any], ThreadBudget]:
    """The run's thread budget: the configured one, or for "auto" one measured on the first scene
    (:func:`pipeline.stream.stages.auto_budget`; ``probe`` is a capture function that raises on an
    unusable scene instead of logging a skip). Returns the items (the first one put back) and the budget."""
    budget = parse_threads(section.threads)
    if budget is not None:
        return items, budget
    first = next(items, None)
    if first is None:
        return iter(()), serial_budget("no scene to measure")
    try:
        budget = auto_budget(lambda: probe(first), classifier, section.batch_size)
    except PrivcamError:  # the first scene is unusable: the run skips and reports it
        budget = serial_budget("the first scene could not be measured")
    except Exception as err:  # noqa: BLE001 - the sensor failed while timed: the run meets (and reports) it
        budget = serial_budget(f"the stages could not be measured ({type(err).__name__}: {err}); the run "
                               "reports it if it happens again")
    return itertools.chain([first], items), budget


def serial_budget(note: str) -> ThreadBudget:
    """The stages one after the other, the sensor on every core and the model on a replay's torch threads
    (the fallback when nothing could be measured)."""
    cores = machine_cores()
    return ThreadBudget(cores, replay_threads(cores), "serial", cores, "auto", note=note)


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
        summary["predictions"] = None if sink.final_path is None else str(sink.final_path)
    return summary


def build_classifier(cfg: RunConfig, key: Key, fmt: FrameFormat) -> tuple[KeyedClassifier, dict[str, Any]]:
    """The keyed classifier of ``cfg.model`` for frames of ``fmt``, and the checkpoint's manifest.

    The network runs at the model's input size (the manifest's ``input_shape``): frames whose network
    input is larger are resampled by the keyed front end (:func:`models.checkpoint.model_input_hw`).
    """
    model, manifest = load_checkpoint(resolve(cfg.model.checkpoint))
    trained_scheme = manifest.get("scheme")
    representation = {"pixel": "mosaic", "quad": "packed", "plane": "packed"}
    if trained_scheme and representation[trained_scheme] != representation[fmt.scheme]:
        raise ConfigError("key", "scheme", f"a scheme whose network input matches the checkpoint's "
                          f"({trained_scheme})", fmt.scheme)
    model_hw = model_input_hw(model, manifest, input_shape(fmt.scheme, fmt.height, fmt.width),
                              f"the {fmt.scheme} scheme on {fmt.height}x{fmt.width} {fmt.cfa} frames",
                              cfg.model.checkpoint)
    device = pick_device(cfg.model.device)
    with main_thread_serial():  # the twin's tables are built here; the network runs in the stage threads
        return KeyedClassifier(model, key, fmt, mode=cfg.model.mode, device=device, model_hw=model_hw), manifest


def check_run_outputs(cfg: RunConfig, record: str | None = None, inputs: tuple[str | None, ...] = ()) -> None:
    """Every output of a run, checked before any work: writable, the right extension, distinct from each
    other and from the inputs (key file, checkpoint, data, recordings)."""
    ins = [p for p in (cfg.key.file, str(resolve(cfg.model.checkpoint)), cfg.source.data, *inputs) if p]
    outs = []
    if cfg.output.predictions:
        outs.append(check_output_path(cfg.output.predictions, "output.predictions (--predictions)", OUTPUT_SUFFIXES,
                                      inputs=ins))
    if record:
        outs.append(check_output_path(record, "output.record (--record/--out)", (".mcap",), inputs=ins))
    if len(outs) == 2 and os.path.abspath(outs[0]) == os.path.abspath(outs[1]):
        raise ConfigError("output", "record", "a path other than output.predictions", record)


def _outcome(result: RunResult | None) -> bool:
    return result is not None and result.error is None and not result.interrupted


def _close_outputs(ok: bool, *outputs: Recorder | PredictionWriter | None) -> tuple[list[str], list[str]]:
    """Close (and place) every output; returns (errors, notes) as text, raising nothing."""
    errors, notes = [], []
    for out in outputs:
        if out is None:
            continue
        try:
            out.close(ok=ok)
        except PrivcamError as err:
            errors.append(str(err))
        except OSError as err:
            errors.append(f"{getattr(out, 'path', '?')}: {type(err).__name__}: {err}")
        if out.note and out.note not in errors:
            notes.append(out.note)
    return errors, notes


def _error_text(result: RunResult | None, close_errors: list[str], skips: SkipLog) -> str | None:
    if result is not None and result.error is not None:
        return f"{type(result.error).__name__}: {result.error}"
    if close_errors:
        return "; ".join(close_errors)
    if skips.count and result is not None and result.items_out == 0 and not result.interrupted:
        return f"no item could be used ({skips.count} skipped; first: {skips.items[0]})"
    return None


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Live run: dataset scenes through the keyed sensor into the keyed classifier."""
    check_run_outputs(cfg, cfg.output.record)
    key = open_session(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    skips = SkipLog()
    items, total, (h, w) = open_source(cfg, skips)
    fmt = FrameFormat.from_config(sensor_cfg, scheme=cfg.key.scheme, rotation=cfg.key.rotation, height=h, width=w)
    classifier, manifest = build_classifier(cfg, key, fmt)
    sensor = Sensor(sensor_cfg, seed=cfg.sensor.seed)
    labels: dict[int, int | None] | None = None if cfg.output.store_labels else {}
    probe = capture_stage(sensor, key, cfg.key.scheme, cfg.key.rotation, (h, w))  # raises instead of skipping
    items, budget = plan_threads(cfg.pipeline, items, probe, classifier)
    micro = micro_batch_size(cfg.pipeline.micro_batch, cfg.pipeline.batch_size, h, w, budget.sensor_frames)
    # rotation: the sensor stage's per-frame readout orders go to the classifier (pipeline.stream.handoff)
    readouts = ReadoutHandoff(handoff_capacity(cfg.pipeline.batch_size, micro, cfg.pipeline.queue_size,
                                               order_nbytes(cfg.key.scheme, h, w))) if cfg.key.rotation else None
    classifier.readouts = readouts
    capture = capture_stage(sensor, key, cfg.key.scheme, cfg.key.rotation, (h, w), skips, labels, readouts)
    recorder = sink = result = None
    try:
        if cfg.output.record:
            recorder = Recorder(cfg.output.record, sensor_cfg.to_dict(), cfg.key.scheme, cfg.key.rotation,
                                key.fingerprint, session=key.session, store_labels=cfg.output.store_labels)
        stages = live_stages(capture, classifier, budget, cfg.pipeline.batch_size, cfg.pipeline.batch_timeout_s,
                             None if recorder is None else record_stage(recorder))
        sink = PredictionWriter(cfg.output.predictions, total, progress)
        with torch_threads(budget.model):
            result = Pipeline(chunks(items, micro), stages, sink if labels is None else labelled_sink(sink, labels),
                              cfg.pipeline.queue_size).run()
    finally:
        close_errors, notes = _close_outputs(_outcome(result), recorder, sink)
    extra = {"job": "run", "dataset": cfg.source.dataset, "split": cfg.source.split, "scheme": cfg.key.scheme,
             "rotation": cfg.key.rotation, "mode": cfg.model.mode, "device": str(classifier.device),
             "key_fingerprint": key.fingerprint, "session": key.session, "checkpoint": cfg.model.checkpoint,
             "checkpoint_plain_accuracy": manifest.get("plain_test_accuracy"),
             "threads": budget.to_dict(), "micro_batch": micro}
    if readouts is not None:
        extra["readout_handoff"] = readouts.to_dict()
    if recorder is not None:
        extra["recording"] = {"path": None if recorder.final_path is None else str(recorder.final_path),
                              "frames_written": recorder.frames_written}
    summary = summarise(result, sink, extra)
    summary["error"] = _error_text(result, close_errors, skips)
    return _with_skips(summary, skips, notes)


def _with_skips(summary: dict[str, Any], skips: SkipLog, notes: list[str]) -> dict[str, Any]:
    summary["skipped"] = skips.count
    if skips.count:
        summary["skipped_items"] = list(skips.items)
    if notes:
        summary["notes"] = notes
    return summary


def _replay_sensor(path: str, reader: RecordingReader, cfg: RunConfig, first: FrameMeta,
                   problems: list[str]) -> SensorConfig:
    """The recorded sensor configuration; when it is missing or damaged, the checkpoint's training sensor if
    its bit depth and CFA match the frames (the network input needs the sensor's levels)."""
    recorded = reader.sensor_config()
    if recorded is not None:
        try:
            sensor_cfg = SensorConfig.from_dict(recorded, f"{path} [privcam.sensor]")
        except ConfigError as err:
            problems.append(f"damaged privcam.sensor metadata skipped: {err}")
        else:
            if (sensor_cfg.bit_depth, sensor_cfg.cfa) == (first.bit_depth, first.cfa):
                return sensor_cfg
            problems.append(f"privcam.sensor metadata ({sensor_cfg.bit_depth}-bit {sensor_cfg.cfa}) disagrees with "
                            f"the frames ({first.bit_depth}-bit {first.cfa}); skipped as damaged")
    else:
        problems.append("privcam.sensor metadata missing or damaged")
    trained = read_manifest(resolve(cfg.model.checkpoint)).get("sensor")
    try:
        fallback = SensorConfig.from_dict(trained, f"{cfg.model.checkpoint} [sensor]") if trained else None
    except ConfigError:
        fallback = None
    if fallback is None or (fallback.bit_depth, fallback.cfa) != (first.bit_depth, first.cfa):
        raise PrivcamError(f"{path}: the recording's sensor metadata is missing or damaged and the checkpoint's "
                           f"sensor does not match its {first.bit_depth}-bit {first.cfa} frames; cannot normalise "
                           "the frames without the sensor's black level")
    problems.append(f"using the checkpoint's sensor profile {fallback.name!r} (same bit depth and CFA as the frames) "
                    "for the black and white levels")
    return fallback


def make_recording_hint(path: str) -> str:
    """What to run when a recording is not there (every "not here" error names the command)."""
    return f"make one with privcam record --key KEY --out {path}, or privcam run --key KEY --record {path}"


def replay_recording(path: str, cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Stream a recording through the keyed classifier. Damaged parts are skipped and reported, and so are
    frames that do not belong to the stream (another key, size, scheme). Every frame's MAC is checked under
    the recording's session key first (:mod:`pipeline.stream.authcheck`); the summary's
    ``replay_report["authentication"]`` lists the frames skipped as tampered, spliced, duplicated or
    unauthenticated, and the reordered ones (classified)."""
    check_run_outputs(cfg, inputs=(path,))
    key = load_key(cfg.key.file)
    if not Path(path).exists():
        raise PrivcamError(f"{path}: recording not found ({make_recording_hint(path)})")
    reader = RecordingReader(path)
    try:
        return _replay(path, reader, key, cfg, progress)
    finally:
        reader.close()


def _replay(path: str, reader: RecordingReader, key: Key, cfg: RunConfig, progress: bool) -> dict[str, Any]:
    if reader.recording_format is not None:  # None: the privcam.recording record is damaged
        check_recording_format(path, reader.recording_format)
    if reader.table_format is not None:  # None: the privcam.recording record is damaged (checked per frame)
        check_table_format(path, reader.table_format)
    recorded = reader.key_fingerprint
    if recorded is not None and recorded != key.fingerprint:
        raise PrivcamError(f"{path}: recorded with key {recorded}, but {cfg.key.file} has fingerprint "
                           f"{key.fingerprint}; refusing to replay with the wrong key")
    problems: list[str] = []
    read = reader.frames()
    first = next(read, None)
    if first is None:
        report = reader.report.to_dict()
        return {"job": "replay", "recording": path, "frames": 0, "replay_report": report, "skipped": 0,
                "error": "no intact frame in the recording"}
    # the recording's session; with its metadata record damaged, the first frame's (a wrong guess fails every MAC)
    auth = FrameAuthenticator(key, reader.session if reader.session is not None else first.meta.session, path)
    frames = auth.filter(itertools.chain([first], read))
    first = next(frames, None)
    if first is None:
        report = {**reader.report.to_dict(), "authentication": auth.report.to_dict()}
        return {"job": "replay", "recording": path, "frames": 0, "replay_report": report, "skipped": 0,
                "error": "no authentic frame in the recording"}
    if recorded is None:
        if first.meta.key_fingerprint != key.fingerprint:
            raise PrivcamError(f"{path}: recorded with key {first.meta.key_fingerprint}, but {cfg.key.file} has "
                               f"fingerprint {key.fingerprint}; refusing to replay with the wrong key")
        problems.append("privcam.recording metadata missing or damaged: the key is checked frame by frame")
    m = first.meta
    key = auth.session_key
    sensor_cfg = _replay_sensor(path, reader, cfg, m, problems)
    fmt = FrameFormat.from_config(sensor_cfg, scheme=m.scheme, rotation=m.rotation, height=m.height, width=m.width)
    classifier, manifest = build_classifier(cfg, key, fmt)
    skips = SkipLog()

    def all_frames() -> Iterator[ProtectedFrame]:
        yield first
        for frame in frames:
            why = stream_mismatch(m, frame.meta, key.fingerprint)
            if why is None:
                yield frame
            else:
                skips.add(why)

    total = reader.report.expected_frames
    stages = [Batch("batcher", cfg.pipeline.batch_size, cfg.pipeline.batch_timeout_s), Map("model", classifier)]
    sink = result = None
    try:
        sink = PredictionWriter(cfg.output.predictions, total, progress)
        result = Pipeline(all_frames(), stages, sink, cfg.pipeline.queue_size).run()
    finally:
        close_errors, notes = _close_outputs(_outcome(result), sink)
    report = reader.report.to_dict()
    report["problems"] = problems + report["problems"] + [f"skipped {t}" for t in skips.items]
    if skips.count > len(skips.items):
        report["problems"].append(f"... {skips.count - len(skips.items)} more frames skipped")
    report["authentication"] = auth.report.to_dict()
    extra = {"job": "replay", "recording": path, "scheme": fmt.scheme, "rotation": fmt.rotation,
             "mode": cfg.model.mode, "device": str(classifier.device), "key_fingerprint": key.fingerprint,
             "checkpoint": cfg.model.checkpoint, "replay_report": report}
    summary = summarise(result, sink, extra)
    summary["error"] = _error_text(result, close_errors, skips)
    return _with_skips(summary, skips, notes)


def record_frames(cfg: RunConfig, out: str, progress: bool = True) -> dict[str, Any]:
    """Sensor and recorder only: capture the source's scenes as protected frames into ``out`` (.mcap)."""
    check_run_outputs(replace_outputs(cfg), out)
    key = open_session(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    skips = SkipLog()
    items, total, shape = open_source(cfg, skips)
    sensor = Sensor(sensor_cfg, seed=cfg.sensor.seed)
    bar = tqdm(total=total, unit="frame", desc="recording", disable=not progress)
    recorder = result = None
    try:
        store = cfg.output.store_labels
        recorder = Recorder(out, sensor_cfg.to_dict(), cfg.key.scheme, cfg.key.rotation, key.fingerprint,
                            session=key.session, store_labels=store)
        stages = [Map("sensor", capture_stage(sensor, key, cfg.key.scheme, cfg.key.rotation, shape, skips,
                                              None if store else {})),
                  Map("recorder", record_stage(recorder))]
        result = Pipeline(items, stages, lambda _: bar.update(1), cfg.pipeline.queue_size,
                          on_close=[bar.close]).run()
    finally:
        bar.close()
        close_errors, notes = _close_outputs(_outcome(result), recorder)
    summary = {"job": "record",
               "recording": None if recorder is None or recorder.final_path is None else str(recorder.final_path),
               "frames": 0 if recorder is None else recorder.frames_written, "scheme": cfg.key.scheme,
               "rotation": cfg.key.rotation, "key_fingerprint": key.fingerprint, "session": key.session,
               "labels_stored": cfg.output.store_labels,
               "wall_s": None if result is None else round(result.wall_s, 3),
               "stages": [] if result is None else [s.to_dict() for s in result.stages],
               "interrupted": result is not None and result.interrupted,
               "error": _error_text(result, close_errors, skips)}
    return _with_skips(summary, skips, notes)


def replace_outputs(cfg: RunConfig, **changes: Any) -> RunConfig:
    """``cfg`` with output fields changed (default: no predictions, no recording)."""
    from dataclasses import replace

    values = {"predictions": None, "record": None, **changes}
    return replace(cfg, output=replace(cfg.output, **values))
