"""The thread budget of the pipeline: how the machine's cores are shared by the sensor and model stages.

The sensor stage's numba kernels and the model stage's torch ops are each parallel, and each assumes by
default that it owns every core; run side by side they oversubscribe. A budget gives each stage a share
that adds up to the machine, in one of four ways:

* ``split``: the stages run at the same time, the sensor stage on ``sensor`` numba threads and the model
  stage on ``model`` torch intra-op threads, ``sensor + model == cores``. Pays when the two stages cost
  about the same.
* ``serial``: both stages get every core and run one after the other in one thread, as a serial loop
  does: capture (and record) each scene, and classify each batch as soon as it is full
  (:class:`pipeline.stream.engine.Serial`). Only the source and the sink overlap with the work. Pays
  when one stage dominates: a split would leave it on a fraction of the machine. The sensor may
  capture ``sensor_frames`` frames of a micro-batch at once, each on ``sensor`` numba threads
  (:mod:`pipeline.stream.workers`): at a real sensor's size one capture leaves part of two cores idle.
* ``turns``: as ``serial``, but the stages keep their own threads and take turns (one lock around their
  work). Nothing real overlaps either, and the hand-offs, the lock and the separate tables stage cost
  more than they save: at 1920x1080 it ran at 0.67-0.84x the serial loop (issue 17). Kept for configs
  that name it.
* ``overlap``: the stages run at the same time in their own threads, each on the thread counts of the
  serial plan (every core, or what was measured faster): deliberately oversubscribed, so that one
  stage's single-threaded parts (the checks and MAC of a capture, the network input, the hand-offs,
  Python) run while the other's parallel kernels leave a core free. The model keeps a replay's torch
  thread count, so its logits are a replay's bit for bit (a split's are not). Measured on 2 cores
  (2026-12-03, 32 frames, 2 runs each): 1920x1080 compact 1.04-1.17x the serial mode (quad rotating
  13.3-13.9 against 11.4-13.3 frames/s, pixel static 15.7-16.4 against 15.2-15.4, pixel rotating
  7.6-8.2 against 7.3-7.8), 28x28 1.00-1.18x; CPU busy 1.6-1.85 of 2 cores against 1.5-1.7; but in
  the benchmark's rounds it also lost (1080p compact pixel rotating: 0.76x the serial loop in the median
  round). ``auto`` considers it wherever it would run serially, on more than one core, runs both modes
  for a moment on the run's first scene (:func:`pipeline.stream.stages.trial_modes`) and keeps the
  faster. (An estimate from the stages timed at once while each looped nonstop was pessimistic: it chose
  ``serial`` in all 10 benchmark cases, while ``overlap`` was faster in 6 of the 8 at 1920x1080.)

numba's thread count is per calling thread (``numba.set_num_threads`` in the stage's own thread);
torch's intra-op count is process-wide, so the model share is set once for the run and restored after
(no other torch work runs in the process during a run; the sensor stage uses no torch).

``auto`` measures each stage's cost per frame on the first frame at one thread and at every core
(:func:`measure_costs`), fits Amdahl's law to each, and picks the plan with the highest estimated
throughput (:func:`choose_budget`): the split with the best ``min(share / cost)``, or the serial plan,
run in ``overlap`` mode on more than one core (``auto`` keeps it only where a short trial of both modes
ran it at least as fast as ``serial``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sensor.errors import ConfigError

# A split runs both stages at once, and the estimate from each stage timed alone leaves out what they
# cost each other (memory bandwidth, the kernel's page work for large fresh arrays). Measured on 2 cores
# (privcam bench pipeline, 2026-12-03): at 1920x1080 the 1+1 split reached 0.35-0.55 of its estimate
# (5.9 frames/s against 12.1 estimated, 4.1 against 11.7) and ran at half the serial plan; at 28x28,
# 0.68-0.75. So a split is chosen only when it is estimated clearly faster.
SPLIT_MARGIN = 1.5

MODES = ("split", "serial", "turns", "overlap")

# Frames captured at once are chosen only when measured at least this much faster than one at a time
# (small frames: the capture is mostly Python and the threads only take turns on the GIL).
AT_ONCE_MARGIN = 1.1


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StageCosts:
    """Seconds per frame of each stage alone, at one thread and at ``cores`` threads."""

    cores: int
    sensor_1: float
    sensor_all: float
    model_1: float
    model_all: float
    sensor_at_once: float | None = None  # ``cores`` frames captured at once, one numba thread each

    def to_dict(self) -> dict[str, Any]:
        out = {"cores": self.cores, "sensor_s_per_frame_1_thread": round(self.sensor_1, 6),
               "sensor_s_per_frame_all_threads": round(self.sensor_all, 6),
               "model_s_per_frame_1_thread": round(self.model_1, 6),
               "model_s_per_frame_all_threads": round(self.model_all, 6)}
        if self.sensor_at_once is not None:
            out[f"sensor_s_per_frame_{self.cores}_frames_at_once"] = round(self.sensor_at_once, 6)
        return out

    def serial_sensor(self) -> tuple[int, int, float]:
        """How the sensor runs when the stages take turns: (numba threads per frame, frames at once,
        seconds per frame), the fastest measured of one frame at 1 thread, one at every core, and (when
        measured clearly faster, by :data:`AT_ONCE_MARGIN`) ``cores`` frames at once on 1 thread each."""
        one = (1, 1, self.sensor_1) if self.sensor_1 < self.sensor_all else (self.cores, 1, self.sensor_all)
        if self.sensor_at_once is not None and self.cores > 1 and self.sensor_at_once * AT_ONCE_MARGIN < one[2]:
            return 1, self.cores, self.sensor_at_once
        return one


@dataclass(frozen=True)
class ThreadBudget:
    """Threads of each stage. ``split``: ``sensor_frames * sensor + model <= cores``; ``serial``, ``turns``
    and ``overlap``: each may use every core (``overlap`` oversubscribes on purpose):
    ``sensor_frames * sensor <= cores``.
    ``sensor_frames``: frames the sensor stage captures at once (:class:`pipeline.stream.workers.FrameWorkers`),
    each on ``sensor`` numba threads. ``source`` says where it came from: "config" or "auto"."""

    sensor: int
    model: int
    mode: str = "split"
    cores: int = 1
    source: str = "config"
    costs: StageCosts | None = None
    estimate: dict[str, float] | None = None
    note: str | None = None
    sensor_frames: int = 1
    trial: dict[str, float] | None = None  # frames/s of each mode in auto's trial (stages.trial_modes)
    trial_frames: int | None = None  # frames of each trial run

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("pipeline", "threads.mode", f"one of {MODES}", self.mode)
        for name in ("sensor", "model", "sensor_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.cores:
                raise ConfigError("pipeline", f"threads.{name}", f"an integer from 1 to the {self.cores} cores",
                                  value)
        if self.sensor_frames * self.sensor > self.cores:
            raise ConfigError("pipeline", "threads.sensor_frames", f"sensor_frames x sensor threads <= the "
                              f"{self.cores} cores", f"{self.sensor_frames} x {self.sensor}")
        if self.mode == "split" and self.sensor_frames * self.sensor + self.model > self.cores:
            raise ConfigError("pipeline", "threads", f"sensor (x sensor_frames) + model threads <= the {self.cores} "
                              "cores (they run at the same time), or mode: serial",
                              f"{self.sensor_frames} x {self.sensor} + {self.model}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "sensor": self.sensor, "sensor_frames": self.sensor_frames,
                               "model": self.model, "cores": self.cores, "source": self.source}
        if self.costs is not None:
            out["measured"] = self.costs.to_dict()
        if self.estimate is not None:
            out["estimated_frames_per_s"] = {k: round(v, 2) for k, v in self.estimate.items()}
        if self.trial is not None:
            out["trial_frames_per_s"] = {k: round(v, 2) for k, v in self.trial.items()}
            out["trial_frames"] = self.trial_frames
        if self.note:
            out["note"] = self.note
        return out


def parse_threads(value: Any, cores: int | None = None) -> ThreadBudget | None:
    """The ``pipeline.threads`` config value: "auto" (-> None: measure at start-up) or a mapping
    ``{sensor: n, model: m[, mode: split|serial|turns|overlap][, sensor_frames: k]}`` (``k`` frames captured at once,
    each on ``n`` numba threads; default 1). Raises ConfigError naming the field."""
    cores = machine_cores() if cores is None else cores
    if value == "auto":
        return None
    if not isinstance(value, dict):
        raise ConfigError("pipeline", "threads", "auto or a mapping {sensor: N, model: M, mode: "
                          f"{'|'.join(MODES)}}}", value)
    unknown = set(value) - {"sensor", "model", "mode", "sensor_frames"}
    if unknown:
        raise ConfigError("pipeline", f"threads.{sorted(unknown)[0]}", "one of sensor, model, mode, sensor_frames")
    missing = [k for k in ("sensor", "model") if k not in value]
    if missing:
        raise ConfigError("pipeline", f"threads.{missing[0]}", "a thread count (both sensor and model)")
    return ThreadBudget(value["sensor"], value["model"], value.get("mode", "split"), cores, "config",
                        sensor_frames=value.get("sensor_frames", 1))


def amdahl(t1: float, tc: float, cores: int, n: int) -> float:
    """Seconds per frame at ``n`` threads from the times at 1 and ``cores`` threads (Amdahl's law)."""
    if cores <= 1 or n >= cores:
        return tc if n >= cores else t1
    parallel = min(max((t1 - tc) / (t1 * (1 - 1 / cores)), 0.0), 1.0) if t1 > 0 else 0.0
    return t1 * ((1 - parallel) + parallel / n)


def choose_budget(costs: StageCosts, splits: bool = True) -> ThreadBudget:
    """The serial plan, unless a split is estimated at least :data:`SPLIT_MARGIN` times faster (with
    ``splits``): each split ``(n, cores - n)`` runs at ``1 / max(sensor(n), model(cores - n))``, serial at
    ``1 / (sensor + model(all))`` with the sensor as :meth:`StageCosts.serial_sensor` runs it (one frame
    on 1 thread or on every core, or ``cores`` frames at once) (the plan where turns used to be chosen:
    the same estimate, without the hand-offs).

    The serial plan runs in ``overlap`` mode on more than one core (the serial estimate taken as its lower
    bound; ``auto`` then tries both modes, :func:`pipeline.stream.stages.trial_modes`)."""
    c = costs.cores
    # one after the other, the sensor runs the fastest way measured; the model keeps every core (its
    # logits may change with its thread count)
    sensor_threads, sensor_frames, sensor_s = costs.serial_sensor()
    plans = {"serial": (sensor_threads, c, 1.0 / max(sensor_s + costs.model_all, 1e-12))}
    for n in range(1, c if splits else 1):
        s = amdahl(costs.sensor_1, costs.sensor_all, c, n)
        m = amdahl(costs.model_1, costs.model_all, c, c - n)
        plans[f"split {n}+{c - n}"] = (n, c - n, 1.0 / max(s, m, 1e-12))
    best_split = max((k for k in plans if k != "serial"), key=lambda k: plans[k][2], default=None)
    wins = best_split is not None and plans[best_split][2] >= SPLIT_MARGIN * plans["serial"][2]
    name = best_split if wins else "serial"
    estimate = {k: v[2] for k, v in plans.items()}
    sensor, model, _ = plans[name]
    mode = name.split()[0]
    if mode == "serial" and c > 1:
        mode = "overlap"  # the same threads, the stages at once
    return ThreadBudget(sensor, model, mode, c, "auto", costs, estimate,
                        sensor_frames=sensor_frames if name == "serial" else 1)


def measure_costs(sensor_fn: Callable[[int], object], model_fn: Callable[[int], object], frames: int,
                  cores: int | None = None, repeat: int = 3) -> StageCosts:
    """Time ``sensor_fn(threads)`` (one frame, run with that many numba threads) and ``model_fn(threads)``
    (``frames`` frames, that many torch threads), each at 1 and at every core, and ``cores`` calls of
    ``sensor_fn(1)`` at once (one thread each, :class:`pipeline.stream.workers.FrameWorkers`): the fastest
    of ``repeat`` after a warm-up at that setting (robust to a busy machine). Their results are thrown
    away: the calls must not change what the run produces (``sensor_fn`` must be safe to call from
    several threads at once)."""
    import numba
    import torch

    from .engine import PartialResult
    from .workers import FrameWorkers, concurrent_numba_layer

    cores = machine_cores() if cores is None else cores
    old_torch = torch.get_num_threads()
    times: dict[tuple[str, int], float] = {}

    def best_of(fn: Callable[[], object]) -> float:
        fn()  # warm-up: compilation, caches, the thread pool at this count
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def measure() -> None:
        def set_numba(n: int) -> None:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

        for name, fn, setter, per in (("sensor", sensor_fn, set_numba, 1),
                                      ("model", model_fn, torch.set_num_threads, frames)):
            for n in sorted({1, cores}):
                setter(n)
                times[(name, n)] = best_of(lambda fn=fn, n=n: fn(n)) / per
        if cores > 1 and concurrent_numba_layer():  # (workqueue: one capture at a time)
            with FrameWorkers(lambda _: sensor_fn(1), cores, 1) as workers:
                def at_once() -> None:
                    try:
                        workers(list(range(cores)))
                    except PartialResult as partial:  # a capture failed: its own error, not the wrapper
                        raise partial.cause from None
                times[("sensor_at_once", cores)] = best_of(at_once) / cores

    try:
        in_fresh_thread(measure)
    finally:
        torch.set_num_threads(old_torch)
    return StageCosts(cores, times[("sensor", 1)], times[("sensor", cores)], times[("model", 1)],
                      times[("model", cores)], times.get(("sensor_at_once", cores)))


def in_fresh_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a new thread and wait for it, re-raising its error. Timings are taken there because
    the stages run in their own threads: measured here, numba and torch parallel regions launched from
    the main thread (whose OpenMP pools torch set up at import) ran 10-30x slower on a loaded machine
    than the same calls from a fresh thread."""
    import threading

    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)

    thread = threading.Thread(target=body, name="privcam-measure")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def replay_threads(cores: int) -> int:
    """The model's torch threads when ``auto`` runs the stages serially: torch's default count in this
    process (what a replay of the recording uses, e.g. 1 under OMP_NUM_THREADS=1), at most ``cores``.
    A CPU GEMM may reassociate its sums with the thread count, so live and replayed predictions are
    equal bit for bit only at the same count."""
    import torch

    return max(1, min(cores, torch.get_num_threads()))


def numba_threads(n: int) -> Callable[[], None]:
    """A stage setup hook: this thread's numba kernels use ``n`` threads (numba's count is per thread)."""
    def setup() -> None:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return setup


def thread_counts(numba_n: int, torch_n: int | None = None) -> Callable[[], None]:
    """A stage setup hook: this thread's numba kernels on ``numba_n`` threads and, if given, its torch ops
    on ``torch_n`` intra-op threads. Both are per calling thread in effect (OpenMP's count is a per-thread
    setting that torch.get_num_threads() does not show), so a stage that runs the model sets it in its own
    thread: measured, a stage thread otherwise ran the model on 2 threads now and then under a 1-thread
    budget, and its logits differed from a replay's in the last bit."""
    set_numba = numba_threads(numba_n)

    def setup() -> None:
        set_numba()
        if torch_n is not None:
            import torch

            torch.set_num_threads(torch_n)
    return setup


@contextmanager
def main_thread_serial() -> Iterator[None]:
    """numba and torch on one thread in the calling thread for the block, restored after: for work the
    main thread does before or between runs (building the keyed classifier, ``auto``'s first capture, a
    warm-up). Parallel work belongs in the stage threads.

    A thread that runs a parallel region keeps its OpenMP team (torch's GNU OpenMP, and numba's ``omp``
    layer, which uses the system's) until it exits, and once the process's teams hold more threads than
    it has cores, libgomp's workers spin only briefly before they sleep, so every later parallel op
    waits for a sleeping worker to be woken. The main thread never exits. Measured on 2 cores
    (2026-12-04): after one 2-thread torch op, or one numba parallel kernel, in the main thread, a
    (113, 144) @ (144, 16) ``torch.mm`` on 2 threads in another thread took 175-290 us instead of
    10-13 us, and the keyed PreResNet-20 at 1080p (285 such calls a batch) classified 52-59 frames/s
    instead of 111-120. The work it covers gives the same results on one thread (integer tables,
    copies, a capture: each frame depends only on the seed, the key and its index)."""
    import numba
    import torch

    old_numba, old_torch = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old_numba)
        torch.set_num_threads(old_torch)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (process-wide), restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
