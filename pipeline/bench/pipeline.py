"""End-to-end pipeline throughput: each stage alone, the same work serially, and the pipeline, in one run.

Run: ``privcam bench pipeline --out pipeline.json [-- --cases 28-pixel-compact,1080-quad-compact
--rotation both --frames N --rounds 2]``

Cases (``--cases``, default all): the 28x28 mono10 pixel case (random 8-bit scenes rendered in the
sensor stage, as a live run does) and 1920x1080 RGGB 12-bit frames, quad and pixel readout, through the
keyed front end (INTER_AREA to the model's input: compact 1x28x28 / 4x14x14, PreResNet-20 1x32x32 /
4x16x16) into a randomly initialised model (throughput does not depend on the weights). At 1080p the
scenes are photon maps rendered before timing (a pool of 4, cycled): the world, not the sensor; the
sensor stage is the exposure (ADC kernel, noise drawn inside) and the keyed readout.

For each case and rotation setting, timed interleaved over ``--rounds`` rounds (best of each):

* ``sensor_alone``: the sensor stage on every frame, one after another, numba on every core;
* ``sensor_stage_alone``: the sensor stage as the chosen budget runs it (micro-batches, ``sensor_frames``
  frames captured at once, :class:`pipeline.stream.workers.FrameWorkers`); the slowest-stage ratio uses
  the faster of the two;
* ``model_alone``: the model stage (network input, per-frame tables, keyed net) on the captured frames
  in batches, torch on every core; with rotation, each frame's readout order is handed over as the
  sensor stage leaves it in a run (:mod:`pipeline.stream.handoff`; built before timing);
* ``serial``: capture a batch, classify it, in one thread (every core for each);
* ``pipeline``: :func:`pipeline.stream.stages.live_stages` (micro-batches, the thread budget; the tables
  stage, or in ``serial`` mode one stage for the sensor and the model) with the budget that ``auto``
  chooses (measured once per case, before the rounds);
* ``pipeline_<mode>`` for each mode ``auto`` did not choose (:func:`other_budgets`): ``split`` (sensor 1
  thread, model the rest), ``serial``, ``turns`` and ``overlap`` (the chosen budget's threads, or every
  core for the model): what each would give in the same rounds, and whether its predictions still equal
  the serial ones (``turns`` is what ``auto`` chose before the ``serial`` mode existed, ``serial`` what it
  chose before ``overlap``).

The alone and serial runs each run in a fresh thread, as the pipeline's stages do (numba and torch
parallel regions launched from the main thread were much slower on a loaded machine: see
:func:`pipeline.stream.budget.in_fresh_thread`).

Each round runs them in another order (rotated by one), so that no run always follows the same one.
Ratios: pipeline / serial (of the bests, and the median over the rounds of each round's ratio), and
pipeline / the slower stage alone. ``predictions_equal_serial`` says whether the pipeline's predictions
equal the serial ones bit for bit (same batches; the same torch thread count unless the budget splits
the cores).

Peak RSS (``--rss``, default on): the pipeline alone over N and over 10N frames, each in a fresh
subprocess with the case's budget. After the setup (imports, scenes, model) and a 2-frame warm-up, the
child resets its peak RSS (Linux ``/proc/self/clear_refs``), so ``peak_rss_bytes`` is the run's own peak
(``VmHWM``: the frames in flight, queues, tables) and not the setup's; where the reset is refused it is
the whole process's ``ru_maxrss``. Flat memory: the 10N / N ratio stays near 1 once N exceeds what the
pipeline holds in flight (queues of 8 items before the batcher, one batch and one prepared batch after
it: about 40 frames at 1080p with batch 8): ``--rss-frames`` (default 6 model batches). At 1080p the
RSS runs take most of the time (48 + 480 frames a case): ``--no-rss`` for throughput alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.plain import build_model
from pipeline.bench.common import write_json
from pipeline.memory import keep_freed_memory
from pipeline.resources import resolve
from pipeline.stream.budget import (
    MODES,
    ThreadBudget,
    in_fresh_thread,
    machine_cores,
    main_thread_serial,
    numba_threads,
    torch_threads,
)
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.engine import Pipeline, chunks
from pipeline.stream.handoff import ReadoutHandoff, handoff_capacity, order_nbytes
from pipeline.stream.inputs import input_shape
from pipeline.stream.run import capture_stage
from pipeline.stream.stages import auto_budget, live_stages, micro_batch_size
from pipeline.stream.workers import FrameWorkers
from sensor.config import SensorConfig
from sensor.frame import FrameFormat, ProtectedFrame
from sensor.keys import Key
from sensor.readout import ReadoutPermutation, readout_permutation
from sensor.sensor import Sensor

MONO, RGGB = "configs/sensors/mono10.yaml", "configs/sensors/default.yaml"
SCENE_POOL = 4  # 1080p photon maps, cycled
SMALL_POOL = 256  # 28x28 scenes, cycled
QUEUE_SIZE = 8  # the pipeline's stage queues, in items (micro-batches)
RSS_BATCHES = 6  # default N of the RSS runs, in model batches: more than the pipeline holds in flight


@dataclass(frozen=True)
class Case:
    profile: str
    hw: tuple[int, int]
    scheme: str
    model: str
    model_hw: tuple[int, int] | None  # None: the model takes the frames' own size
    batch: int
    frames: int  # default N

    @property
    def rendered_in_stage(self) -> bool:
        return self.model_hw is None  # the small case renders its 8-bit scenes in the sensor stage


CASES = {
    "28-pixel-compact": Case(MONO, (28, 28), "pixel", "compact", None, 64, 2000),
    "1080-quad-compact": Case(RGGB, (1080, 1920), "quad", "compact", (14, 14), 8, 16),
    "1080-pixel-compact": Case(RGGB, (1080, 1920), "pixel", "compact", (28, 28), 8, 16),
    "1080-quad-preresnet20": Case(RGGB, (1080, 1920), "quad", "preresnet20", (16, 16), 8, 16),
    "1080-pixel-preresnet20": Case(RGGB, (1080, 1920), "pixel", "preresnet20", (32, 32), 8, 16),
}


class Setup:
    """Everything one case needs: the items (an endless cycle of scenes), the capture and the classifier."""

    def __init__(self, case: Case, rotation: bool) -> None:
        from pipeline.bench.sensor import scene

        self.case, self.rotation = case, rotation
        # fixed public test key and session: benchmarks protect nothing
        self.key = Key(bytes(range(32))).for_session(bytes(16))
        cfg = SensorConfig.from_yaml(resolve(case.profile))  # the shipped profile outside a checkout
        sensor = Sensor(cfg, seed=0)
        h, w = case.hw
        # rotation: the sensor's readout orders go to the classifier, as in a run (pipeline.stream.handoff)
        micro = micro_batch_size("auto", case.batch, h, w, machine_cores())  # the most auto hands over
        capacity = handoff_capacity(case.batch, micro, QUEUE_SIZE, order_nbytes(case.scheme, h, w))
        self.readouts = ReadoutHandoff(capacity) if rotation else None
        if case.rendered_in_stage:
            rng = np.random.default_rng(0)
            self.pool: list[np.ndarray] = list(rng.integers(0, 256, (SMALL_POOL, h, w), dtype=np.uint8))
            self.capture = capture_stage(sensor, self.key, case.scheme, rotation, readouts=self.readouts)
            self.probe = capture_stage(sensor, self.key, case.scheme, rotation)
        else:
            from sensor.scene import render_photons

            self.pool = [render_photons(scene(h, w, seed=s), cfg) for s in range(SCENE_POOL)]
            key, scheme = self.key, case.scheme

            def capture_with(readouts: ReadoutHandoff | None) -> Callable[[tuple], ProtectedFrame]:
                on_readout = None if readouts is None else readouts.put

                def capture(item: tuple[int, np.ndarray, int | None]) -> ProtectedFrame:
                    return sensor.capture(item[1], key, item[0], scheme=scheme, rotation=rotation,
                                          on_readout=on_readout)
                return capture
            self.capture, self.probe = capture_with(self.readouts), capture_with(None)
        torch.manual_seed(0)
        shape = input_shape(case.scheme, h, w)
        model = build_model(case.model, shape[0], 10)
        fmt = FrameFormat.from_config(cfg, scheme=case.scheme, rotation=rotation, height=h, width=w)
        self.classifier = KeyedClassifier(model, self.key, fmt, device="cpu", model_hw=case.model_hw,
                                          readouts=self.readouts)

    def orders(self, frames: list[ProtectedFrame]) -> dict[int, ReadoutPermutation]:
        """With rotation, the readout orders of ``frames`` (built now), by frame index; else empty."""
        if not self.rotation:
            return {}
        h, w = self.case.hw
        orders = {f.meta.frame_index: readout_permutation(self.key, self.case.scheme, h, w, f.meta.frame_index)
                  for f in frames}
        for order in orders.values():
            order.kernel_tables()
        return orders

    def budget(self, first: tuple[int, np.ndarray, None]) -> ThreadBudget:
        """``auto``'s budget measured on ``first``, as a run measures it: without the handoff (the trial's
        frames are copies of one frame)."""
        self.classifier.readouts = None
        try:
            return auto_budget(lambda: self.probe(first), self.classifier, self.case.batch)
        finally:
            self.classifier.readouts = self.readouts

    def items(self, frames: int) -> Iterator[tuple[int, np.ndarray, None]]:
        return ((i, self.pool[i % len(self.pool)], None) for i in range(frames))

    def pipeline(self, frames: int, budget: ThreadBudget, sink: Callable[[list[dict]], None]) -> float:
        """Wall seconds of the pipeline over ``frames`` frames (the budget's torch threads for the run)."""
        h, w = self.case.hw
        micro = micro_batch_size("auto", self.case.batch, h, w, budget.sensor_frames)
        stages = live_stages(self.capture, self.classifier, budget, self.case.batch, 30.0)
        with torch_threads(budget.model):
            result = Pipeline(chunks(self.items(frames), micro), stages, sink, queue_size=QUEUE_SIZE).run()
        if result.error is not None:
            raise result.error
        return result.wall_s


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    return (items[i:i + size] for i in range(0, len(items), size))


def rotated(items: list[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (modulo their number)."""
    k = shift % len(items) if items else 0
    return items[k:] + items[:k]


def per_round_ratio(serial_s: list[float], other_s: list[float]) -> float:
    """Median over the rounds of serial time / other time (each round's pair ran minutes apart at most):
    steadier than the ratio of the bests when the machine's load changes between rounds."""
    return statistics.median(a / b for a, b in zip(serial_s, other_s, strict=True))


def other_budgets(budget: ThreadBudget, cores: int) -> dict[str, ThreadBudget]:
    """The modes ``budget`` is not, each with a budget to compare it with: split 1 + (cores - 1) (none on
    one core); serial and turns with ``budget``'s threads, or when it splits, the model on every core and
    the sensor on the thread count it measured faster at (every core when nothing was measured)."""
    costs = budget.costs
    sensor = budget.sensor if budget.mode != "split" else (
        1 if costs is not None and costs.sensor_1 < costs.sensor_all else cores)
    model = budget.model if budget.mode != "split" else cores
    frames = budget.sensor_frames if budget.mode != "split" else 1
    others = {}
    for mode in MODES:
        if mode == budget.mode or (mode == "split" and cores < 2):
            continue
        others[mode] = (ThreadBudget(1, cores - 1, mode, cores) if mode == "split"
                        else ThreadBudget(sensor, model, mode, cores, sensor_frames=frames))
    return others


def run_case(name: str, rotation: bool, frames: int, rounds: int, rss: bool, rss_frames: int | None = None
             ) -> dict[str, Any]:
    case = CASES[name]
    with main_thread_serial():  # parallel torch work only in the timed threads (see main_thread_serial)
        setup = Setup(case, rotation)
        items = list(setup.items(frames))
        captured = [setup.capture(it) for it in items]  # warm-up, and the model stage's input
        orders = setup.orders(captured)  # what the sensor stage hands the model stage (rotation)
        setup.classifier(captured[:case.batch])
    budget = setup.budget(items[0])
    others = other_budgets(budget, machine_cores())
    timings: dict[str, list[float]] = {k: [] for k in ("sensor_alone", "sensor_stage_alone", "model_alone", "serial",
                                                        "pipeline",
                                                        *(f"pipeline_{m}" for m in others))}
    serial_preds: list[dict] = []
    pipeline_preds: list[dict] = []
    other_preds: dict[str, list[dict]] = {m: [] for m in others}
    def timed(name: str, fn: Callable[[], object]) -> None:
        def body() -> None:
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
        in_fresh_thread(body)  # as the pipeline's stages run: see in_fresh_thread

    def serial() -> None:
        serial_preds.clear()
        for batch in batched(items, case.batch):
            serial_preds.extend(setup.classifier([setup.capture(it) for it in batch]))

    def piped(key: str, plan: ThreadBudget, preds: list[dict]) -> Callable[[], None]:
        def run() -> None:
            preds.clear()
            timings[key].append(setup.pipeline(frames, plan, preds.extend))
        return run

    def model_alone() -> None:  # with the orders the sensor stage would have left (rotation)
        for batch in batched(captured, case.batch):
            for frame in batch if orders else ():
                setup.readouts.put(frame.meta.frame_index, orders[frame.meta.frame_index])
            setup.classifier(batch)

    def sensor_stage() -> None:  # as the pipeline's sensor stage runs: micro-batches, frames at once
        numba_threads(budget.sensor)()
        micro = micro_batch_size("auto", case.batch, *case.hw, budget.sensor_frames)
        with FrameWorkers(setup.capture, budget.sensor_frames, budget.sensor) as workers:
            for chunk in chunks(items, micro):
                workers(chunk)

    runs = [lambda: timed("sensor_alone", lambda: [setup.capture(it) for it in items]),
            lambda: timed("sensor_stage_alone", sensor_stage),
            lambda: timed("model_alone", model_alone),
            lambda: timed("serial", serial), piped("pipeline", budget, pipeline_preds),
            *(piped(f"pipeline_{mode}", other, other_preds[mode]) for mode, other in others.items())]
    for r in range(rounds):  # interleaved, best of each: robust to a busy shared machine
        for run in rotated(runs, r):  # no run always follows the same one (it may inherit its memory state)
            run()
    fps = {k: frames / min(v) for k, v in timings.items()}
    sensor_best = max(fps["sensor_alone"], fps["sensor_stage_alone"])  # the sensor stage alone, the faster way
    slowest = min(sensor_best, fps["model_alone"])
    row: dict[str, Any] = {
        "case": name, "frame": list(case.hw), "scheme": case.scheme, "model": case.model,
        "model_input": list(case.model_hw or case.hw), "rotation": rotation, "frames": frames,
        "batch": case.batch, "micro_batch": micro_batch_size("auto", case.batch, *case.hw, budget.sensor_frames),
        "rounds": rounds,
        "scenes": "8-bit images rendered in the sensor stage" if case.rendered_in_stage
        else f"{SCENE_POOL} photon maps rendered before timing, cycled",
        **{f"{k}_frames_per_s": round(v, 2) for k, v in fps.items()},
        "pipeline_vs_serial": round(fps["pipeline"] / fps["serial"], 3),
        "pipeline_vs_serial_per_round_median": round(per_round_ratio(timings["serial"], timings["pipeline"]), 3),
        "pipeline_vs_slowest_stage": round(fps["pipeline"] / slowest, 3),
        "slowest_stage": "sensor" if sensor_best <= fps["model_alone"] else "model",
        "predictions_equal_serial": pipeline_preds == serial_preds,
        "threads": budget.to_dict()}
    for mode, other in others.items():  # what the modes auto turned down would give (see predictions_equal_serial)
        key = f"pipeline_{mode}"
        row[key] = {"threads": other.to_dict(), "frames_per_s": round(fps[key], 2),
                    "vs_serial": round(fps[key] / fps["serial"], 3),
                    "vs_serial_per_round_median": round(per_round_ratio(timings["serial"], timings[key]), 3),
                    "vs_slowest_stage": round(fps[key] / slowest, 3),
                    "predictions_equal_serial": other_preds[mode] == serial_preds}
    if rss:
        n_rss = rss_frames or RSS_BATCHES * case.batch
        row["peak_rss"] = {f"{n}_frames": child_rss(name, rotation, n, budget) for n in (n_rss, 10 * n_rss)}
        small, large = (row["peak_rss"][f"{n}_frames"]["peak_rss_bytes"] for n in (n_rss, 10 * n_rss))
        row["peak_rss"]["ratio_10n_to_n"] = round(large / small, 3)
    return row


def child_rss(name: str, rotation: bool, frames: int, budget: ThreadBudget) -> dict[str, Any]:
    """Peak RSS of a fresh process that runs the pipeline over ``frames`` frames (see :func:`child`)."""
    spec = json.dumps({"case": name, "rotation": rotation, "frames": frames, "sensor": budget.sensor,
                       "model": budget.model, "mode": budget.mode, "cores": budget.cores,
                       "sensor_frames": budget.sensor_frames})
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.pipeline", "--child", spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child for {name} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vm_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        for line in open("/proc/self/status"):  # noqa: SIM115 - read at once
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: ``/proc/self/clear_refs`` "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec_text: str) -> None:
    """One pipeline run in this fresh process; prints its peak RSS. The setup (scenes, model) is made first
    and the peak is reset after it where Linux allows, so the peak is the run's: what grows with frames."""
    spec = json.loads(spec_text)
    with main_thread_serial():
        setup = Setup(CASES[spec["case"]], spec["rotation"])
    budget = ThreadBudget(spec["sensor"], spec["model"], spec["mode"], spec["cores"],
                          sensor_frames=spec["sensor_frames"])
    count = itertools.count()
    setup.pipeline(min(spec["frames"], 2), budget, lambda preds: None)  # warm-up: compiled kernels, pools
    before = vm_kib("VmRSS")
    reset = reset_peak_rss()
    setup.pipeline(spec["frames"], budget, lambda preds: [next(count) for _ in preds])
    run_peak = vm_kib("VmHWM") if reset else None
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"frames": next(count), "process_peak_rss_bytes": process_peak * 1024,
                      "rss_before_run_bytes": None if before is None else before * 1024,
                      "peak_rss_bytes": (process_peak if run_peak is None else run_peak) * 1024,
                      "peak_is": "the run's (peak reset after setup)" if run_peak is not None
                      else "the whole process's"}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (default all)")
    parser.add_argument("--rotation", choices=("both", "static", "rotating"), default="both")
    parser.add_argument("--frames", type=int, help="frames per timed run, N (default: 2000 at 28x28, 16 at 1080p)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best of each (default 2)")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                        help="peak RSS over N and 10N frames, each in a subprocess (default on)")
    parser.add_argument("--rss-frames", type=int, help="N of the RSS runs (default: 6 model batches: 384 at "
                        "28x28, 48 at 1080p, beyond what the pipeline holds in flight); also run at 10N")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"--cases: expected names from {', '.join(CASES)}, got {unknown or args.cases!r}")
    if args.rounds < 1 or any(n is not None and n < 1 for n in (args.frames, args.rss_frames)):
        parser.error("--rounds, --frames and --rss-frames must be >= 1")
    rotations = {"both": (False, True), "static": (False,), "rotating": (True,)}[args.rotation]
    rows = []
    for name in names:
        for rotation in rotations:
            row = run_case(name, rotation, args.frames or CASES[name].frames, args.rounds, args.rss,
                           args.rss_frames)
            rows.append(row)
            rss = row.get("peak_rss", {}).get("ratio_10n_to_n")
            print(f"{name:<24} rot={str(rotation):<5} sensor {row['sensor_alone_frames_per_s']:8.1f} "
                  f"(stage {row['sensor_stage_alone_frames_per_s']:.1f})  model "
                  f"{row['model_alone_frames_per_s']:8.1f}  serial {row['serial_frames_per_s']:8.1f}  pipeline "
                  f"{row['pipeline_frames_per_s']:8.1f} f/s  x{row['pipeline_vs_serial']:.2f} serial (rounds: "
                  f"x{row['pipeline_vs_serial_per_round_median']:.2f})  "
                  f"x{row['pipeline_vs_slowest_stage']:.2f} slowest  {row['threads']['mode']} "
                  f"{row['threads']['sensor']}x{row['threads']['sensor_frames']}+{row['threads']['model']}  "
                  f"rss 10N/N {rss}", flush=True)
            for mode in MODES:
                if f"pipeline_{mode}" in row:
                    sp = row[f"pipeline_{mode}"]
                    label = f"{mode} {sp['threads']['sensor']}+{sp['threads']['model']}:"
                    print(f"{'':<24} {'':<9} {label:<11} pipeline {sp['frames_per_s']:8.1f} f/s  "
                          f"x{sp['vs_serial']:.2f} serial (rounds: x{sp['vs_serial_per_round_median']:.2f})  "
                          f"x{sp['vs_slowest_stage']:.2f} slowest  "
                          f"predictions equal serial: {sp['predictions_equal_serial']}", flush=True)
    result = {"benchmark": "pipeline",
              "machine": {"platform": platform.platform(), "cores": machine_cores(), "cpus": os.cpu_count(),
                          "load_average_at_end": list(os.getloadavg())},
              "torch_threads": torch.get_num_threads(), "cases": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (the RSS children run here)
    main()
