"""Replay of many recordings on Ray: per-actor keyed model, reordering sink, the job (see :mod:`pipeline.ray`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import pyarrow as pa
    import ray
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    from sensor.errors import PrivcamError as _PrivcamError

    raise _PrivcamError(f"the Ray backend needs the optional extra: pip install 'privcam[ray]' ({_err})") from None

import torch

from sensor.errors import ConfigError, PrivcamError
from sensor.frame import ProtectedFrame
from sensor.keys import Key

from ..stream.authcheck import KINDS, session_key
from ..stream.classifier import FrameFormat, KeyedClassifier
from ..stream.recording import (
    decode_frame,
)
from ..stream.run import (
    KeySection,
    ModelSection,
    RunConfig,
    build_classifier,
    load_key,
    pick_device,
)
from ..stream.sinks import PREDICTION_FIELDS, PredictionWriter
from .cluster import DataContextFor, ensure_ray, error_text, ray_info, share_cpus
from .datasource import (
    PREDICTION_SCHEMA,
    READ_CPUS,
    RecordingDatasource,
    RecordingHeader,
    check_fingerprints,
    expand_recordings,
    scan_header,
)


# -- the per-actor model -------------------------------------------------------------------------------------
class KeyedBatchPredictor:
    """The model side of every Ray path: key and checkpoint loaded once per actor, from their paths.

    One :class:`~pipeline.stream.classifier.KeyedClassifier` per frame format, built on first use with
    :func:`pipeline.stream.run.build_classifier` (same checks as the local pipeline) and cached, errors included.
    ``__call__`` is the ``map_batches`` entry (pyarrow tables of :data:`BATCH_SCHEMA` rows in,
    :data:`PREDICTION_SCHEMA` rows out); :meth:`classify` is the plain call for the live workers.

    Args:
        key_file: key file path, read on the worker (the secret never leaves this process).
        checkpoint: plain model checkpoint path (.pt beside its .json manifest).
        mode: keyed network mode, "fused" or "fast".
        device: "auto", "cpu" or "cuda" (auto: CUDA when Ray gave this actor a GPU).
        threads: torch intra-op threads for this actor (default: leave torch's setting). Applied again after
            each model build and before each batch: the keyed build (numba kernels) resets torch to one thread
            per core, and on a shared machine that oversubscription costs several times the throughput.
    """

    def __init__(self, key_file: str, checkpoint: str, mode: str = "fused", device: str = "auto",
                 threads: int | None = None) -> None:
        self.threads = threads
        self._pin_threads()
        self._cfg = RunConfig(key=KeySection(file=key_file), model=ModelSection(checkpoint, mode, device))
        self._key = load_key(key_file)
        self.device = str(pick_device(device))
        self._classifiers: dict[tuple[FrameFormat, str], KeyedClassifier | PrivcamError] = {}

    @property
    def fingerprint(self) -> str:
        return self._key.fingerprint

    def _pin_threads(self) -> None:
        # unconditionally, in the calling thread: torch.get_num_threads() reports the process-wide setting,
        # while OpenMP's thread count is per calling thread (an actor's task thread may differ from __init__'s)
        if self.threads:
            torch.set_num_threads(self.threads)

    def classifier(self, fmt: FrameFormat, session: str = "") -> KeyedClassifier:
        """The keyed classifier for ``fmt`` frames of ``session`` (built once, under that session's key);
        raises the build error again on later calls."""
        if (fmt, session) not in self._classifiers:
            try:
                key = session_key(f"session {session}", self._key, session)
                self._classifiers[(fmt, session)] = build_classifier(self._cfg, key, fmt)[0]
            except PrivcamError as err:
                self._classifiers[(fmt, session)] = err
            self._pin_threads()
        found = self._classifiers[(fmt, session)]
        if isinstance(found, PrivcamError):
            raise found
        return found

    def classify(self, fmt: FrameFormat, frames: list[ProtectedFrame]) -> list[dict[str, Any]]:
        """Protected frames (each (H, W) uint16) -> one prediction dict per frame (the local model stage)."""
        sessions = sorted({f.meta.session for f in frames})
        if len(sessions) > 1:
            raise PrivcamError(f"one batch holds frames of {len(sessions)} sessions ({', '.join(sessions)})")
        classifier = self.classifier(fmt, sessions[0] if sessions else "")
        self._pin_threads()
        return classifier(frames)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._row(row) for row in batch.to_pylist()], schema=PREDICTION_SCHEMA)

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"rec_index": row["rec_index"], "batch_index": row["batch_index"], "frame_index": None,
               "label": None, "pred": None, "confidence": None, "note": None}
        if row["batch_index"] < 0:
            out["note"] = json.dumps({**json.loads(row["report"]), "device": self.device})
            return out
        try:
            if row["fingerprint"] != self.fingerprint:
                raise PrivcamError(f"recorded with key {row['fingerprint']}, but the worker holds key "
                                   f"{self.fingerprint}; refusing to replay with the wrong key")
            preds = self.classify(FrameFormat(**json.loads(row["fmt"])), [decode_frame(p) for p in row["frames"]])
        except PrivcamError as err:
            out["note"] = json.dumps({"kind": "error", "error": f"{type(err).__name__}: {err}"})
            return out
        for name in PREDICTION_FIELDS:
            out[name] = [p[name] for p in preds]
        return out


# -- the driver side: order, sink, summary ----------------------------------------------------------------------
@dataclass
class _RecState:
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_batch: int = 0
    note: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


class ReorderingSink:
    """Driver side of the replay: output rows in any order -> predictions in recording order, then file order.

    Holds out-of-order predictions only (a few numbers per frame). After an error row, the rest of that
    recording is dropped, as a local replay stops at its first failing batch.
    """

    def __init__(self, headers: list[RecordingHeader], writer: PredictionWriter) -> None:
        self.headers, self.writer = headers, writer
        self.states = [_RecState() for _ in headers]
        self.cursor = 0
        self.first_output_s: float | None = None

    def add(self, row: dict[str, Any]) -> None:
        st = self.states[row["rec_index"]]
        if self.first_output_s is None and row["pred"]:
            self.first_output_s = time.perf_counter()
        if row["batch_index"] < 0:
            st.note = json.loads(row["note"])
        elif st.error is None and not st.done and row["batch_index"] >= st.next_batch:  # a retried task's copy
            st.pending[row["batch_index"]] = row
        self._advance()

    def _advance(self) -> None:
        while self.cursor < len(self.states):
            st, header = self.states[self.cursor], self.headers[self.cursor]
            if st.error is None and st.next_batch in st.pending:
                row = st.pending.pop(st.next_batch)
                st.next_batch += 1
                if row["note"] is not None:
                    st.error, st.pending = json.loads(row["note"])["error"], {}
                else:
                    self.writer.write(header.path, [dict(zip(PREDICTION_FIELDS, values, strict=True)) for values in
                                                    zip(*(row[k] for k in PREDICTION_FIELDS), strict=True)])
                continue
            if st.note is not None and (st.error is not None or st.next_batch >= st.note["batches"]):
                st.done, self.cursor = True, self.cursor + 1
                continue
            return

    def recording_summaries(self) -> list[dict[str, Any]]:
        out = []
        for h, st in zip(self.headers, self.states, strict=True):
            note = st.note or {}
            fmt = note.get("fmt") or {}
            error = st.error or note.get("error") or (None if st.done else "not finished")
            out.append({"recording": h.path, "key_fingerprint": h.key_fingerprint, "fingerprint_check": "ok",
                        "scheme": fmt.get("scheme", h.scheme), "rotation": fmt.get("rotation", h.rotation),
                        **self.writer.stats(h.path), "device": note.get("device"),
                        "replay_report": note.get("replay_report"), "error": error})
        return out


def merge_authentication(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The recordings' authentication reports as one: verified and failures summed; per kind, the frames as
    {"recording", "frame_index"}; details prefixed with the recording."""
    auths = [(r["recording"], (r["replay_report"] or {}).get("authentication")) for r in reports]
    auths = [(path, a) for path, a in auths if a]
    out: dict[str, Any] = {"verified": sum(a["verified"] for _, a in auths),
                           "failures": sum(a["failures"] for _, a in auths)}
    for kind in KINDS:
        out[kind] = [{"recording": path, "frame_index": i} for path, a in auths for i in a[kind]]
    out["details"] = [f"{path}: {d}" for path, a in auths for d in a["details"]]
    return out


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One replay report for many recordings: counts summed, problems prefixed with the recording,
    authentication merged (:func:`merge_authentication`)."""
    known = [r["replay_report"] for r in reports if r["replay_report"]]
    expected = [r["expected_frames"] for r in known]
    return {"frames_read": sum(r["frames_read"] for r in known), "frames_lost": sum(r["frames_lost"] for r in known),
            "lost_is_lower_bound": any(r["lost_is_lower_bound"] for r in known) or len(known) < len(reports),
            "expected_frames": sum(expected) if expected and None not in expected and len(known) == len(reports)
            else None,
            "problems": [f"{r['recording']}: {p}" for r in reports for p in (r["replay_report"] or {}).get(
                "problems", [])],
            "authentication": merge_authentication(reports)}


# -- replay ------------------------------------------------------------------------------------------------
def prediction_dataset(source: RecordingDatasource, actors: int, cpus_per_actor: float, gpus_per_actor: float,
                       predictor_kwargs: dict[str, Any]) -> ray.data.Dataset:
    """Recordings -> batch rows -> :class:`KeyedBatchPredictor` on a fixed pool of ``actors`` (lazy Dataset).

    ``predictor_kwargs`` are the actor constructor's (paths and settings only: no key, no tensors).
    """
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    return ds.map_batches(KeyedBatchPredictor, batch_size=1, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                          num_gpus=gpus_per_actor or None, fn_constructor_kwargs=predictor_kwargs)


def replay_on_ray(paths: list[str], key_file: str, checkpoint: str, out: str | None = None, batch_size: int = 64,
                  actors: int = 2, mode: str = "fused", ray_address: str | None = None, progress: bool = True,
                  device: str = "auto", cpus_per_actor: float | None = None, gpus_per_actor: float = 0.0,
                  block_bytes: int = 256 << 10) -> dict[str, Any]:
    """Replay recordings through the keyed classifier on a Ray actor pool; predictions equal the local replay's.

    Args:
        paths: recordings, folders of ``*.mcap`` or globs (expanded, sorted, deduplicated).
        key_file: key file path; read by the driver (fingerprint check) and by every actor, never shipped.
        checkpoint: plain model checkpoint path (must exist at this path on every node).
        out: predictions file, .jsonl, .csv or .parquet (columns: recording, frame_index, label, pred,
            confidence; recording order, then file order), or None.
        batch_size: frames per model batch, cut per recording exactly as the local replay cuts them.
        actors: model actors in the fixed pool.
        mode: keyed network mode, "fused" or "fast".
        ray_address: existing cluster (``ray.init(address=...)``), e.g. ``auto`` or ``ray://head:10001``;
            None starts a local Ray unless one is already initialised.
        progress: show a progress bar (frames, accuracy).
        device: "auto", "cpu" or "cuda" inside each actor.
        cpus_per_actor: logical CPUs (and torch threads, rounded) per actor; default: the cluster's CPUs
            shared among the actors, keeping room for one read task.
        gpus_per_actor: GPUs per actor (e.g. 1, or 0.5 to pack two actors on one GPU).
        block_bytes: target size of one dataset block, whole batches only (at least one batch). A block goes to
            one actor, so small blocks balance the pool; the default gives 1-2 batches of 64 small frames.

    Returns:
        the local replay's summary fields over all recordings (frames, labelled, accuracy, wall_s, frames_per_s,
        replay_report, error, interrupted, predictions) plus ``recordings`` (per recording: fingerprint
        check, scheme, rotation, frames, accuracy, replay_report, error) and ``ray`` (version, cluster, actors).
    """
    if actors < 1:
        raise ConfigError("replay", "actors", ">= 1", actors)
    if batch_size < 1:
        raise ConfigError("replay", "batch_size", ">= 1", batch_size)
    ModelSection(checkpoint, mode, device)  # validates mode and device as the local config does
    key = load_key(key_file)
    headers = [scan_header(p, i) for i, p in enumerate(expand_recordings(list(paths)))]
    check_fingerprints(headers, key, key_file)
    started = ensure_ray(ray_address)
    try:
        cpus = share_cpus(actors, READ_CPUS, cpus_per_actor)
        threads = max(1, round(cpus))
        expected = [h.expected_frames for h in headers]
        writer = PredictionWriter(out, None if None in expected else sum(expected), progress, lead="recording")
        sink = ReorderingSink(headers, writer)
        t0 = time.perf_counter()
        err, interrupted = None, False
        try:
            with DataContextFor(block_bytes):
                source = RecordingDatasource(headers, batch_size, block_bytes, key_file=str(key_file))
                ds = prediction_dataset(source, actors, cpus,
                                        gpus_per_actor, {"key_file": str(key_file), "checkpoint": str(checkpoint),
                                                         "mode": mode, "device": device, "threads": threads})
                for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in table.to_pylist():
                        sink.add(row)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # noqa: BLE001 - reported in the summary like a local stage error
            err = error_text(exc)
        finally:
            writer.close(ok=not (err or interrupted))
        wall = time.perf_counter() - t0
        per = sink.recording_summaries()
        return _replay_summary(per, writer, sink, wall, t0, err, interrupted, key, checkpoint, mode, batch_size,
                               ray_info(ray_address, actors=actors, cpus_per_actor=cpus, threads_per_actor=threads,
                                        gpus_per_actor=gpus_per_actor))
    finally:
        if started:
            ray.shutdown()


def _replay_summary(per: list[dict[str, Any]], writer: PredictionWriter, sink: ReorderingSink, wall: float,
                    t0: float, err: str | None, interrupted: bool, key: Key, checkpoint: str, mode: str,
                    batch_size: int, info: dict[str, Any]) -> dict[str, Any]:
    errors = [f"{r['recording']}: {r['error']}" for r in per if r["error"] and r["error"] != "not finished"]
    if not err and not errors and not interrupted and any(r["error"] for r in per):
        errors = ["the Ray job ended before every recording finished"]
    schemes = {(r["scheme"], r["rotation"]) for r in per}
    devices = sorted({r["device"] for r in per if r["device"]})
    summary = {"job": "replay", "engine": "ray", "recordings": per,
               "scheme": next(iter(schemes))[0] if len(schemes) == 1 else None,
               "rotation": next(iter(schemes))[1] if len(schemes) == 1 else None,
               "mode": mode, "device": ",".join(devices) or None, "key_fingerprint": key.fingerprint,
               "checkpoint": str(checkpoint), "batch_size": batch_size, "replay_report": merge_reports(per),
               "frames": writer.count, "labelled": writer.labelled, "accuracy": writer.accuracy,
               "wall_s": round(wall, 3), "frames_per_s": round(writer.count / wall, 2) if wall > 0 else None,
               "first_prediction_s": None if sink.first_output_s is None else round(sink.first_output_s - t0, 3),
               "interrupted": interrupted, "error": err or ("; ".join(errors) if errors else None), "ray": info}
    if writer.path is not None:
        summary["predictions"] = str(writer.path)
    return summary


