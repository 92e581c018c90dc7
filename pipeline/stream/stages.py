"""The stages of a live run under a thread budget, with micro-batches and double buffering.

    source (micro-batches of scenes) -> sensor (each scene: expose + keyed readout) -> [recorder: each
    frame, in order] -> batcher (re-cuts into model batches) -> tables (network input and per-frame
    tables of batch k + 1) -> model (keyed network on batch k) -> sink

* Micro-batches: the sensor stage takes ``micro_batch`` scenes per hand-off, so the queue cost is paid
  per list; the recorder still writes frame by frame and the batcher cuts batches of exactly
  ``batch_size`` frames, the batches a serial run makes.
* Double buffering: the ``tables`` stage prepares the next batch (:meth:`KeyedClassifier.prepare`:
  network input, per-frame readout tables, entry-layer orders) while the ``model`` stage runs the
  current one (:meth:`KeyedClassifier.predict`); the result is the one ``classifier(frames)`` gives.
* Thread budget (:mod:`pipeline.stream.budget`): the sensor stage's thread sets its numba threads, the
  tables stage the model's share; torch's intra-op count is set by the caller for the run. In
  ``turns`` mode the sensor, tables and model stages share one lock; in ``overlap`` mode (``auto``'s
  choice on more than one core unless a split wins, where a short trial ran it at least as fast as
  ``serial``: :func:`trial_modes`) they run at once, each on the serial plan's threads, oversubscribing
  the cores on purpose.
* ``serial`` mode: the stages would never run at once, so they are one thread
  (:class:`pipeline.stream.engine.Serial`), between the source's and the sink's:

      source -> serial (each scene: capture [+ record]; each full batch: ``classifier(frames)``) -> sink

  the serial loop's calls in its order (the same batches, so the same predictions), with no hand-off,
  lock or tables stage between them; numba runs on ``budget.sensor`` threads for the capture and on
  ``budget.model`` for the batch. A batch still flushes after ``batch_timeout_s`` without a scene.

Bit-identical predictions: a CPU GEMM may reassociate its sums with the thread count, so ``auto`` never
picks a split that runs the model on fewer torch threads than the process's default (what a replay
uses); it picks ``overlap`` instead, in which the model keeps that count. (An earlier guard compared the
logits of the calibration frames at both counts; other frames of the same run still differed in the
last bit, measured in CI on 2026-12-03.) A configured split is the user's choice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from sensor.frame import ProtectedFrame

from .budget import (
    StageCosts,
    ThreadBudget,
    choose_budget,
    machine_cores,
    main_thread_serial,
    measure_costs,
    numba_threads,
    replay_threads,
    thread_counts,
    torch_threads,
)
from .classifier import KeyedClassifier
from .engine import Batch, Map, PartialResult, Pipeline, Serial, chunks, each
from .workers import FrameWorkers, concurrent_numba_layer

MICRO_BATCH_PIXELS = 1 << 20  # "auto": about a megapixel of frames per hand-off
CALIBRATION_PIXELS = 1 << 22  # frames in the model's calibration batch: about 4 Mpixel, at most batch_size
TRIAL_S = 0.3  # each trial run of auto's modes: about this long at the serial estimate, at least 2 batches
TRIAL_MODES = ("serial", "overlap")


def micro_batch_size(setting: int | str, batch_size: int, height: int, width: int, at_least: int = 1) -> int:
    """Scenes per sensor hand-off: the configured number, or for "auto" about a megapixel of frames
    (28x28: the model batch; 1080p: one frame) but at least ``at_least`` (the frames the sensor stage
    captures at once), never more than the model batch."""
    if setting != "auto":
        return int(setting)
    return max(1, min(batch_size, max(at_least, MICRO_BATCH_PIXELS // max(height * width, 1))))


def auto_budget(capture_one: Callable[[], ProtectedFrame | None], classifier: KeyedClassifier,
                batch_size: int, cores: int | None = None) -> ThreadBudget:
    """Measure both stages on the first scene and choose the budget (:func:`choose_budget`).

    ``capture_one()`` captures the run's first scene (its result is thrown away: a frame depends only on
    the seed, the key and its index, so the run's own capture of it is the same). With no usable first
    scene, or one core, the stages run serially. Where the serial plan would run in ``overlap`` mode, both
    modes are tried on copies of the first scene (:func:`trial_modes`) and the faster is kept (``overlap``
    on a tie); under numba's ``workqueue`` threading layer, which aborts when two threads launch parallel
    kernels, they run serially."""
    cores = machine_cores() if cores is None else cores
    with main_thread_serial():  # called from the main thread: no OpenMP team there (main_thread_serial)
        frame = capture_one() if cores > 1 else None
    if frame is None:
        return ThreadBudget(cores, replay_threads(cores), "serial", cores, "auto")
    h, w = frame.data.shape
    k = max(1, min(batch_size, CALIBRATION_PIXELS // (h * w)))
    data, idx = np.stack([frame.data] * k), [frame.meta.frame_index] * k
    costs: StageCosts = measure_costs(lambda _: capture_one(), lambda _: classifier.logits_array(data, idx), k,
                                      cores)
    budget = choose_budget(costs)
    model = replay_threads(cores)
    notes = []
    if budget.mode == "split" and budget.model < model:
        notes.append(f"a split ({budget.sensor}+{budget.model}) was estimated faster, but it would run the model "
                     f"on fewer torch threads than a replay does, and its logits may change with the thread count: "
                     f"the model keeps torch's {model}")
        budget = choose_budget(costs, splits=False)
    if budget.mode != "split":
        budget = replace(budget, model=model)
    if budget.mode == "overlap":
        if concurrent_numba_layer():
            frames = trial_frames(budget.estimate["serial"], batch_size)
            trial = trial_modes(capture_one, classifier, budget, batch_size, frames, (h, w))
            budget = replace(budget, trial=trial, trial_frames=frames,
                             mode="overlap" if trial["overlap"] >= trial["serial"] else "serial")
            if budget.mode == "serial":
                notes.append("overlap ran slower than serial in the trial: serial")
        else:
            budget = replace(budget, mode="serial")
            notes.append("numba's workqueue threading layer cannot run the stages at once: serial")
    return replace(budget, note="; ".join(notes) or None)


def trial_frames(serial_rate: float, batch_size: int) -> int:
    """Frames of each trial run: about :data:`TRIAL_S` seconds at ``serial_rate`` frames/s, in whole model
    batches, at least 2 (the pipeline overlaps a batch's classification with the next one's capture)."""
    return batch_size * max(2, int(np.ceil(TRIAL_S * serial_rate / batch_size)))


def trial_modes(capture_one: Callable[[], ProtectedFrame | None], classifier: KeyedClassifier,
                budget: ThreadBudget, batch_size: int, frames: int, frame_hw: tuple[int, int],
                modes: tuple[str, ...] = TRIAL_MODES, rounds: int = 2) -> dict[str, float]:
    """Frames/s of ``budget``'s threads run in each of ``modes``: the real stages (:func:`live_stages`,
    the "auto" micro-batch, nothing recorded) over ``frames`` captures of the first scene, the
    predictions thrown away (a frame depends only on the seed, the key and its index). The runs go in
    the order A B B A A B ... over ``rounds`` rounds (no mode always first, when the process is coldest),
    best of each. Raises what a stage raised."""
    micro = micro_batch_size("auto", batch_size, *frame_hw, budget.sensor_frames)
    best = dict.fromkeys(modes, 0.0)
    order = [m for r in range(rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
    for mode in order:
        plan = replace(budget, mode=mode)
        stages = live_stages(lambda _: capture_one(), classifier, plan, batch_size, 30.0)
        with torch_threads(plan.model):
            result = Pipeline(chunks(range(frames), micro), stages, lambda _: None).run()
        if result.error is not None:
            raise result.error
        best[mode] = max(best[mode], frames / max(result.wall_s, 1e-9))
    return best


def live_stages(capture: Callable[[Any], ProtectedFrame | None], classifier: KeyedClassifier,
                budget: ThreadBudget, batch_size: int, batch_timeout_s: float,
                record: Callable[[ProtectedFrame], ProtectedFrame] | None = None) -> list[Map | Batch | Serial]:
    """The stages after a micro-batched source (:func:`pipeline.stream.engine.chunks`); torch's threads
    are the caller's (``budget.model`` for the run, :func:`pipeline.stream.budget.torch_threads`)."""
    if budget.mode == "serial":
        return [serial_stage(capture, classifier, budget, batch_size, batch_timeout_s, record)]
    turn = threading.Lock() if budget.mode == "turns" else None
    workers = FrameWorkers(capture, budget.sensor_frames, budget.sensor)
    stages: list[Map | Batch | Serial] = [Map("sensor", workers, setup=then_start(numba_threads(budget.sensor),
                                                                                   workers),
                                              lock=turn, teardown=workers.close)]
    if record is not None:
        stages.append(Map("recorder", each(record)))
    # one batch waits for the tables stage and one prepared batch for the model (double buffering): whole
    # batches of large frames must not pile up in the queues
    stages += [Batch("batcher", batch_size, batch_timeout_s, flatten=True, queue_size=1),
               # its torch ops (network input, per-frame tables) are exact on any thread count; one torch
               # thread keeps a second OpenMP team off the cores the model's team uses (budget.main_thread_serial)
               Map("tables", classifier.prepare, setup=thread_counts(budget.model, 1), lock=turn,
                   queue_size=1),
               Map("model", classifier.predict, setup=thread_counts(budget.model, budget.model), lock=turn)]
    return stages


def serial_stage(capture: Callable[[Any], ProtectedFrame | None], classifier: Callable[[list[ProtectedFrame]], Any],
                 budget: ThreadBudget, batch_size: int, batch_timeout_s: float,
                 record: Callable[[ProtectedFrame], ProtectedFrame] | None = None) -> Serial:
    """The ``serial`` mode's one stage: the scenes of a micro-batch captured (None: skipped) on
    ``budget.sensor`` numba threads, ``budget.sensor_frames`` at once (:class:`FrameWorkers`), then
    recorded one by one in order; each batch of exactly ``batch_size`` frames (shorter after
    ``batch_timeout_s`` without a scene, and at the end) classified by ``classifier(frames)`` on
    ``budget.model`` numba threads, in the stage's thread."""
    workers = FrameWorkers(capture, budget.sensor_frames, budget.sensor)
    item_fn: Callable[[list[Any]], list[Any]] = workers if record is None else recorded(workers, record)
    batch_fn = classifier
    own = budget.sensor if budget.sensor_frames == 1 else budget.model  # numba threads of the stage's thread
    if own != budget.model:  # numba's count is per thread: switch it between the two halves
        item_fn = with_setup(numba_threads(budget.sensor), item_fn)
        batch_fn = with_setup(numba_threads(budget.model), batch_fn)
    return Serial("serial", item_fn, batch_size, batch_fn, batch_timeout_s,
                  setup=then_start(thread_counts(own, budget.model), workers), parts=("sensor", "model"),
                  teardown=workers.close)


def recorded(capture_many: Callable[[list[Any]], list[Any]], record: Callable[[Any], Any]
             ) -> Callable[[list[Any]], list[Any]]:
    """A micro-batch captured by ``capture_many``, then each frame recorded in order. A capture failure
    part-way (:class:`PartialResult`) still records the frames finished before it, then re-raises with the
    recorded ones."""
    record_each = each(record)

    def run(items: list[Any]) -> list[Any]:
        try:
            frames = capture_many(items)
        except PartialResult as partial:
            done = partial.results
            try:
                done = record_each(done)
            except PartialResult as rec:
                raise PartialResult(rec.results, rec.cause) from rec.cause
            raise PartialResult(done, partial.cause) from partial.cause
        return record_each(frames)
    return run


def then_start(setup: Callable[[], None], workers: FrameWorkers) -> Callable[[], None]:
    """A stage setup hook: ``setup()``, then the stage's frame workers started."""
    def run() -> None:
        setup()
        workers.start()
    return run


def with_setup(setup: Callable[[], None], fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` with ``setup()`` run before each call (e.g. this thread's numba thread count)."""
    def call(item: Any) -> Any:
        setup()
        return fn(item)
    return call
