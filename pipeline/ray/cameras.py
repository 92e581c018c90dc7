"""Live many-camera mode on Ray: camera actors and model workers joined by bounded queues (see :mod:`pipeline.ray`)."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.util.queue import Empty, Full, Queue
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    from sensor.errors import PrivcamError as _PrivcamError

    raise _PrivcamError(f"the Ray backend needs the optional extra: pip install 'privcam[ray]' ({_err})") from None

import torch

from models.checkpoint import read_manifest
from sensor.config import SensorConfig
from sensor.errors import ConfigError, PrivcamError
from sensor.frame import ProtectedFrame
from sensor.keys import Key
from sensor.sensor import Sensor

from ..resources import resolve
from ..stream.classifier import FrameFormat
from ..stream.datasets import load_dataset
from ..stream.engine import StageStats
from ..stream.recording import (
    Recorder,
)
from ..stream.run import (
    RunConfig,
    capture_stage,
    load_key,
    open_session,
)
from ..stream.sinks import PredictionWriter
from ..stream.sources import frame_hw, scene_items
from .cluster import ensure_ray, error_text, innermost, ray_info, share_cpus
from .replay import KeyedBatchPredictor

_POLL_S = 0.1  # seconds between queue polls of the driver


# -- live cameras -------------------------------------------------------------------------------------------
def camera_shards(n: int, cameras: int, batch_size: int, offset: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, stop) item ranges, one per camera, each a multiple of ``batch_size`` long (the last may
    be shorter, trailing cameras may get none), so each camera's batches are the local run's batches."""
    per = math.ceil(math.ceil(n / batch_size) / cameras) * batch_size
    return [(offset + min(i * per, n), offset + min((i + 1) * per, n)) for i in range(cameras)]


def frame_format(cfg: RunConfig, sensor_cfg: SensorConfig, height: int, width: int) -> FrameFormat:
    return FrameFormat.from_config(sensor_cfg, scheme=cfg.key.scheme, rotation=cfg.key.rotation, height=height,
                                   width=width)


def camera_recording_path(record: str, camera: int) -> str:
    """``out.mcap`` -> ``out.cam0.mcap`` for camera 0 (each camera records on its own node)."""
    path = Path(record)
    return str(path.with_name(f"{path.stem}.cam{camera}{path.suffix}"))


def portable_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise a PrivcamError from an actor method as a plain PrivcamError with the same text: subclasses with
    their own constructor (ConfigError) do not survive Ray's pickling and would arrive without their message."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except PrivcamError as err:
            if type(err) is PrivcamError:
                raise
            raise PrivcamError(str(err)) from None
    return wrapper


class CameraStopped(Exception):
    """Raised inside a camera's capture loop when the driver asked it to stop."""


class CameraActor:
    """One simulated camera: its own sensor, frame counter (its shard's item indices) and per-frame rotation.

    Captures with the local capture stage, batches ``batch_size`` frames, puts each batch into the object store
    and its reference into the bounded frame queue (waiting while it is full: backpressure). Runs as a threaded
    actor (``max_concurrency=2``) so :meth:`stop` reaches a camera that waits on the queue; its recording (if
    any) is finalised on every way out, as the local recorder stage is.
    """

    def __init__(self, camera: int, cfg: dict[str, Any], first: int, end: int, frames_q: Queue,
                 threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.camera, self.cfg, self.frames_q = camera, RunConfig.from_dict(cfg, f"camera {camera}"), frames_q
        self.first, self.end = first, end
        self.stats = StageStats(f"camera-{camera}")
        self._stop = threading.Event()

    @portable_errors
    def setup(self) -> str:
        """Load sensor profile, key (from its path) and the shard's scenes; returns the key fingerprint."""
        c = self.cfg
        self.sensor_cfg = SensorConfig.from_yaml(resolve(c.sensor.profile))
        key = open_session(c.key.file)  # each camera is a capture session of its own
        self.fingerprint, self.session = key.fingerprint, key.session
        self.data = load_dataset(c.source.dataset, c.source.split, c.source.data).subset(self.end - self.first,
                                                                                          self.first)
        self.labels: dict[int, int | None] | None = None if c.output.store_labels else {}
        self.capture = capture_stage(Sensor(self.sensor_cfg, seed=c.sensor.seed), key, c.key.scheme, c.key.rotation,
                                     labels=self.labels)
        return self.fingerprint

    def stop(self) -> None:
        """Ask :meth:`run` to finish after the current frame (recording finalised)."""
        self._stop.set()

    @portable_errors
    def run(self) -> dict[str, Any]:
        """Capture the shard; returns the camera's stage stats (and its recording, when recording)."""
        c = self.cfg
        fmt = asdict(frame_format(c, self.sensor_cfg, *frame_hw(self.data.images, c.source.frame_size)))
        recorder = None
        if c.output.record:
            recorder = Recorder(camera_recording_path(c.output.record, self.camera), self.sensor_cfg.to_dict(),
                                c.key.scheme, c.key.rotation, self.fingerprint, session=self.session,
                                store_labels=c.output.store_labels)
        stopped, ok = False, False
        try:
            self._capture_all(fmt, recorder)
            ok = True
        except CameraStopped:
            stopped = True
        finally:
            if recorder is not None:
                recorder.close(ok=ok)
        result = {"stats": self.stats.to_dict(), "shard": [self.first, self.end], "stopped": stopped}
        if recorder is not None:
            result["recording"] = {"path": str(recorder.final_path or recorder.path),
                                   "frames_written": recorder.frames_written}
        return result

    def _capture_all(self, fmt: dict[str, Any], recorder: Recorder | None) -> None:
        stats, batch = self.stats, []
        for item in scene_items(self.data, self.first, self.cfg.source.frame_size):
            if self._stop.is_set():
                raise CameraStopped
            t0 = time.perf_counter()
            frame = self.capture(item)
            if recorder is not None:
                recorder.write(frame)
            stats.busy_s += time.perf_counter() - t0
            stats.items_in += 1
            batch.append(frame)
            if len(batch) == self.cfg.pipeline.batch_size:
                self._put(fmt, batch)
                batch = []
        if batch:
            self._put(fmt, batch)

    def _put(self, fmt: dict[str, Any], frames: list[ProtectedFrame]) -> None:
        # the reference travels through the queue, not the pixels; labels (kept out of the frames unless
        # stored) travel beside them for the run's accuracy
        labels = [f.meta.label if self.labels is None else self.labels.pop(f.meta.frame_index, None) for f in frames]
        item = (self.camera, fmt, [ray.put(frames)], labels)
        t0 = time.perf_counter()
        while True:
            try:
                self.frames_q.put(item, timeout=_POLL_S)  # waits while the queue is full
                break
            except Full:
                if self._stop.is_set():
                    raise CameraStopped from None
        self.stats.wait_out_s += time.perf_counter() - t0
        self.stats.items_out += len(frames)


class ModelWorker:
    """One model actor of the live pool: batches from the frame queue -> :class:`KeyedBatchPredictor` -> results."""

    def __init__(self, worker: int, key_file: str, checkpoint: str, mode: str, device: str, threads: int,
                 fmt: dict[str, Any], frames_q: Queue, results_q: Queue) -> None:
        self._args = (key_file, checkpoint, mode, device, threads)
        self.fmt = FrameFormat(**fmt)
        self.frames_q, self.results_q = frames_q, results_q
        self.stats = StageStats(f"model-{worker}")

    @portable_errors
    def setup(self) -> str:
        """Load key and checkpoint from their paths and build the keyed model now (a format or checkpoint error
        surfaces before any frame); returns the device."""
        self.predictor = KeyedBatchPredictor(*self._args)
        self.predictor.classifier(self.fmt)
        return self.predictor.device

    @portable_errors
    def run(self) -> dict[str, Any]:
        """Serve until a None arrives; returns the worker's stage stats."""
        stats = self.stats
        while True:
            t0 = time.perf_counter()
            item = self.frames_q.get()
            stats.wait_in_s += time.perf_counter() - t0
            if item is None:
                return stats.to_dict()
            camera, fmt, (ref,), labels = item
            frames = ray.get(ref)
            t0 = time.perf_counter()
            preds = self.predictor.classify(FrameFormat(**fmt), frames)
            for pred, label in zip(preds, labels, strict=True):
                pred["label"] = label
            stats.busy_s += time.perf_counter() - t0
            stats.items_in += len(frames)
            t0 = time.perf_counter()
            self.results_q.put((camera, preds))  # blocks while the driver is behind
            stats.wait_out_s += time.perf_counter() - t0
            stats.items_out += len(frames)


def run_cameras_on_ray(cfg: RunConfig, cameras: int = 2, actors: int = 2, ray_address: str | None = None,
                       progress: bool = True, cpus_per_actor: float | None = None) -> dict[str, Any]:
    """Live many-camera run: ``cameras`` simulated sensors as Ray actors feeding ``actors`` model actors.

    The source items are split into contiguous per-camera shards (multiples of ``cfg.pipeline.batch_size``);
    frame queue and result queue hold ``cfg.pipeline.queue_size`` batches each. Predictions (``camera`` column
    first) go to ``cfg.output.predictions`` (.jsonl, .csv or .parquet) in arrival order; with
    ``cfg.output.record`` each camera writes ``<stem>.cam<i>.mcap`` on its node.

    Args:
        cfg: the local run's configuration (same sections and meaning as ``privcam run``).
        cameras: simulated cameras (Ray actors).
        actors: model actors.
        ray_address: existing cluster address for ``ray.init(address=...)``; None starts or reuses a local Ray.
        progress: show a progress bar.
        cpus_per_actor: logical CPUs per camera and per model actor (default: the cluster's CPUs shared).

    Returns:
        the local run's summary fields (frames, labelled, accuracy, wall_s, frames_per_s, stages, error,
        interrupted, predictions) plus ``cameras``, ``actors``, ``camera_shards``, ``recordings`` and ``ray``.
    """
    if cameras < 1:
        raise ConfigError("run", "cameras", ">= 1", cameras)
    if actors < 1:
        raise ConfigError("run", "actors", ">= 1", actors)
    key = load_key(cfg.key.file)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor.profile))
    data = load_dataset(cfg.source.dataset, cfg.source.split, cfg.source.data).subset(cfg.source.limit,
                                                                                        cfg.source.offset)
    if len(data) == 0:
        raise ConfigError("source", "limit", "at least one item in the selected range", cfg.source.limit)
    fmt = asdict(frame_format(cfg, sensor_cfg, *frame_hw(data.images, cfg.source.frame_size)))
    shards = camera_shards(len(data), cameras, cfg.pipeline.batch_size, cfg.source.offset)
    started = ensure_ray(ray_address)
    try:
        cpus = share_cpus(cameras + actors, 0.0, cpus_per_actor)
        return _serve_cameras(cfg, key, fmt, shards, actors, cpus, len(data), progress,
                              ray_info(ray_address, cameras=cameras, actors=actors, cpus_per_actor=cpus))
    finally:
        if started:
            ray.shutdown()


def _serve_cameras(cfg: RunConfig, key: Key, fmt: dict[str, Any], shards: list[tuple[int, int]], actors: int,
                   cpus: float, total: int, progress: bool, info: dict[str, Any]) -> dict[str, Any]:
    threads = max(1, round(cpus))
    frames_q = Queue(cfg.pipeline.queue_size, actor_options={"num_cpus": 0})
    results_q = Queue(cfg.pipeline.queue_size, actor_options={"num_cpus": 0})
    camera_cls = ray.remote(CameraActor).options(num_cpus=cpus, max_concurrency=2)
    worker_cls = ray.remote(ModelWorker).options(num_cpus=cpus)
    workers = [worker_cls.remote(i, str(cfg.key.file), cfg.model.checkpoint, cfg.model.mode, cfg.model.device,
                                 threads, fmt, frames_q, results_q) for i in range(actors)]
    cams = [camera_cls.remote(i, cfg.to_dict(), first, end, frames_q, threads) for i, (first, end) in
            enumerate(shards)]
    writer = PredictionWriter(cfg.output.predictions, total, progress, lead="camera")
    err, interrupted, devices, cam_runs, setup_error = None, False, [], {}, None
    cam_results: list[dict[str, Any]] = []
    worker_stats: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        devices = _setup_actors(workers, cams)
        t0 = time.perf_counter()
        cam_runs = {c.run.remote(): i for i, c in enumerate(cams)}
        cam_results, worker_stats = _drive(dict(cam_runs), workers, frames_q, results_q, writer)
    except KeyboardInterrupt:
        interrupted = True
    except SetupError as exc:
        setup_error = exc.cause
    except Exception as exc:  # noqa: BLE001 - reported like a local stage error
        err = error_text(exc)
    finally:
        if err or interrupted:
            cam_results = _stop_cameras(cams, cam_runs, results_q, writer)
        writer.close(ok=not (err or interrupted or setup_error))
        for handle in [*workers, *cams]:
            ray.kill(handle)
        frames_q.shutdown(force=True)
        results_q.shutdown(force=True)
    if setup_error is not None:
        raise setup_error  # as the local run refuses a bad configuration before any frame
    wall = time.perf_counter() - t0
    summary = {"job": "run", "engine": "ray", "cameras": len(shards), "actors": actors,
               "dataset": cfg.source.dataset, "split": cfg.source.split, "scheme": cfg.key.scheme,
               "rotation": cfg.key.rotation, "mode": cfg.model.mode, "device": ",".join(devices) or None,
               "key_fingerprint": key.fingerprint, "checkpoint": cfg.model.checkpoint,
               "checkpoint_plain_accuracy": read_manifest(resolve(cfg.model.checkpoint)).get("plain_test_accuracy"),
               "camera_shards": [list(s) for s in shards], "frames": writer.count, "labelled": writer.labelled,
               "accuracy": writer.accuracy, "wall_s": round(wall, 3),
               "frames_per_s": round(writer.count / wall, 2) if wall > 0 else None,
               "stages": [r["stats"] for r in cam_results] + worker_stats, "interrupted": interrupted,
               "error": err, "ray": info}
    recordings = [r["recording"] for r in cam_results if "recording" in r]
    if recordings:
        summary["recordings"] = recordings
    if writer.path is not None:
        summary["predictions"] = str(writer.path)
    return summary


class SetupError(Exception):
    """An actor's setup failed with a PrivcamError (``cause``): refuse the run like the local pipeline does."""

    def __init__(self, cause: PrivcamError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _setup_actors(workers: list, cams: list) -> list[str]:
    """Run every actor's setup; returns the model devices. A PrivcamError in any setup becomes SetupError."""
    try:
        devices = ray.get([w.setup.remote() for w in workers])
        ray.get([c.setup.remote() for c in cams])
    except Exception as exc:  # noqa: BLE001
        cause = innermost(exc)
        if isinstance(cause, PrivcamError):
            raise SetupError(PrivcamError(str(cause))) from None
        raise
    return sorted(set(devices))


def _stop_cameras(cams: list, cam_runs: dict, results_q: Queue, writer: PredictionWriter,
                  grace_s: float = 10.0) -> list[dict[str, Any]]:
    """After an error or Ctrl-C: keep the predictions already made, stop the cameras (recordings finalised)."""
    _drain(results_q, writer)
    for cam in cams:
        cam.stop.remote()
    if not cam_runs:
        return []
    done, _ = ray.wait(list(cam_runs), num_returns=len(cam_runs), timeout=grace_s)
    results = []
    for ref in done:
        try:
            results.append(ray.get(ref))
        except Exception:  # noqa: BLE001 - the first error is already reported
            continue
    return results


def _drain(results_q: Queue, writer: PredictionWriter) -> None:
    """Write whatever predictions already wait in the result queue."""
    while True:
        try:
            camera, preds = results_q.get_nowait()
        except Empty:
            return
        writer.write(camera, preds)


def _drive(cam_refs: dict, workers: list, frames_q: Queue, results_q: Queue,
           writer: PredictionWriter) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drain results while cameras run; then stop the workers with one None each. Raises the first actor error.

    ``cam_refs`` maps each camera's ``run`` reference to its index (entries are removed as cameras finish).
    """
    worker_refs = [w.run.remote() for w in workers]
    cam_results: list[dict[str, Any] | None] = [None] * len(cam_refs)
    stops_left = len(workers)
    while True:
        try:
            camera, preds = results_q.get(timeout=_POLL_S / 2)
            writer.write(camera, preds)
            continue
        except Empty:
            pass
        done, _ = ray.wait(list(cam_refs) + worker_refs, num_returns=len(cam_refs) + len(worker_refs), timeout=0)
        for ref in done:  # an actor that failed raises here
            result = ray.get(ref)
            if ref in cam_refs:
                cam_results[cam_refs.pop(ref)] = result
        if not cam_refs:
            while stops_left:
                try:
                    frames_q.put_nowait(None)
                    stops_left -= 1
                except Full:
                    break
        if not cam_refs and not stops_left and all(r in done for r in worker_refs) and results_q.empty():
            return [r for r in cam_results if r is not None], ray.get(worker_refs)

