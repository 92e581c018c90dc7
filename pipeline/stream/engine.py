"""A small streaming engine: a source, stages in threads joined by bounded queues, a sink.

- Backpressure: every queue is bounded, so a slow stage blocks the ones before it and
  memory stays flat.
- Stage work runs in threads; the heavy work (numba ``nogil`` kernels, torch) releases the GIL.
- ``Batch`` stages collect up to ``size`` items, or whatever arrived within ``timeout_s``, so a
  slow source still flushes.
- Micro-batches: a source of lists (:func:`chunks`) and stages over lists (:func:`each`) pay the
  queue hand-off once per list; a ``Batch(flatten=True)`` stage re-cuts the lists into batches of
  exactly ``size`` items (the last, or one flushed by the timeout, may be shorter).
- A stage's ``queue_size`` bounds its output queue instead of the pipeline's (e.g. 1 batch of large
  frames: double buffering needs one ready while one runs).
- Thread budget: a ``Map`` or ``Serial`` stage's ``setup`` runs once in its own thread before any item
  (e.g. its numba thread count, or starting worker threads) and its ``teardown`` after the last, also
  on an error or a stop (e.g. joining those workers); stages that share a ``lock`` take turns (their
  work never overlaps).
- ``Serial``: the chain ``Map(each(fn)) -> Batch(flatten=True) -> Map(batch_fn)`` in one thread, for
  work that would only take turns anyway: the same batches, none of the hand-offs between them.
- Any stage error or Ctrl-C sets one stop event; every blocking call polls it, items that
  already passed every stage still reach the sink after an error, all threads are joined,
  ``on_close`` hooks run (e.g. finalising a recording), and the run reports what was processed.
  No thread outlives :meth:`Pipeline.run`.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_END = object()
_POLL_S = 0.05
_HAND_OVER_S = 10.0  # longest wait for the next stage to take a failed micro-batch's finished items


@dataclass
class StageStats:
    """Counters of one stage; times in seconds."""

    name: str
    items_in: int = 0
    items_out: int = 0
    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    wait_turn_s: float = 0.0
    frames_out: int = 0
    parts: dict[str, float] = field(default_factory=dict)  # busy seconds of each part of a Serial stage

    def to_dict(self) -> dict[str, Any]:
        rate = self.items_out / self.busy_s if self.busy_s > 0 else None
        out = {"name": self.name, "items_in": self.items_in, "items_out": self.items_out,
               "busy_s": round(self.busy_s, 4), "wait_in_s": round(self.wait_in_s, 4),
               "wait_out_s": round(self.wait_out_s, 4), "items_per_busy_s": rate}
        if self.wait_turn_s:
            out["wait_turn_s"] = round(self.wait_turn_s, 4)
        if self.frames_out:  # the items are lists of frames (micro-batches)
            out["frames_out"] = self.frames_out
            out["frames_per_busy_s"] = self.frames_out / self.busy_s if self.busy_s > 0 else None
        if self.parts:
            out["busy_s_parts"] = {k: round(v, 4) for k, v in self.parts.items()}
        return out


@dataclass
class Map:
    """A 1 -> 1 stage. ``fn`` may return None to drop an item.

    ``setup`` runs once in the stage's thread before the first item (per-thread settings such as
    numba's thread count). Stages given the same ``lock`` hold it around each ``fn`` call: they take
    turns on the cores instead of oversubscribing them.
    """

    name: str
    fn: Callable[[Any], Any]
    setup: Callable[[], None] | None = None
    lock: Any = None  # threading.Lock shared by the stages that take turns
    queue_size: int | None = None  # of its output queue (None: the pipeline's)
    teardown: Callable[[], None] | None = None  # in the stage's thread after its last item, always


@dataclass
class Batch:
    """Collect items into lists of up to ``size``; flush early after ``timeout_s`` without input.

    ``flatten``: the items are lists (micro-batches) whose elements are collected, in order, into
    lists of exactly ``size`` (the remainder waits for the next list, the timeout or the end).
    """

    name: str
    size: int
    timeout_s: float = 0.5
    flatten: bool = False
    queue_size: int | None = None  # of its output queue, in batches (None: the pipeline's)


@dataclass
class Serial:
    """``Map(item_fn) -> Batch(size, timeout_s, flatten=True) -> Map(batch_fn)`` in one thread.

    ``item_fn`` maps a micro-batch (a list) to a list (e.g. :func:`each` of a capture that also records
    each frame); its items are collected, in order, into lists of exactly ``size``, each handed to
    ``batch_fn`` as soon as it is full. A shorter list goes to ``batch_fn`` when ``timeout_s`` passes
    without input (a slow source) and at the end. ``batch_fn`` may return None to drop a batch.

    The same calls, in the same order, as the three stages make, but with no queue between them: for
    work that would take turns on the cores anyway. When ``item_fn`` fails part-way
    (:class:`PartialResult`), the items it finished have had their own work done (e.g. recorded) and
    the batches completed before reached the next stage; the unfinished batch is not classified (the
    run stops with ``item_fn``'s error). ``parts`` names the two halves in :attr:`StageStats.parts`.
    """

    name: str
    item_fn: Callable[[list[Any]], list[Any]]
    size: int
    batch_fn: Callable[[list[Any]], Any]
    timeout_s: float = 0.5
    setup: Callable[[], None] | None = None
    queue_size: int | None = None  # of its output queue (None: the pipeline's)
    parts: tuple[str, str] = ("items", "batches")
    teardown: Callable[[], None] | None = None  # in the stage's thread after its last item, always

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"{self.name}: size: expected an integer >= 1, got {self.size!r}")


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter): a micro-batched source."""
    if size < 1:
        raise ValueError(f"size: expected >= 1, got {size}")
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PartialResult(Exception):
    """A micro-batch stage failed part-way: ``results`` were finished before ``cause`` was raised."""

    def __init__(self, results: list[Any], cause: Exception) -> None:
        super().__init__(str(cause))
        self.results, self.cause = results, cause


def each(fn: Callable[[Any], Any]) -> Callable[[list[Any]], list[Any]]:
    """A 1 -> 1 function over a micro-batch: ``fn`` on every item in order, dropping None results. When
    ``fn`` fails on an item, the items finished before it are not lost: :class:`PartialResult` carries them
    (the engine hands them on before it reports the error)."""
    def over(items: list[Any]) -> list[Any]:
        return collect(functools.partial(fn, item) for item in items)
    return over


def collect(results: Iterable[Callable[[], Any]], on_error: Callable[[int], None] | None = None) -> list[Any]:
    """Call each of ``results`` in order and keep what is not None (the one rule of :func:`each` and of
    :class:`pipeline.stream.workers.FrameWorkers`). When call ``i`` raises, ``on_error(i)`` runs, then the
    error is raised, wrapped in :class:`PartialResult` with the results before it if there are any."""
    out: list[Any] = []
    for i, result in enumerate(results):
        try:
            value = result()
        except Exception as err:
            if on_error is not None:
                on_error(i)
            if out:
                raise PartialResult(out, err) from err
            raise
        if value is not None:
            out.append(value)
    return out


@dataclass
class RunResult:
    stages: list[StageStats]
    wall_s: float
    items_out: int
    error: BaseException | None = None
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _Stop(Exception):
    pass


class Pipeline:
    """source -> stages... -> sink. ``sink`` runs in the calling thread."""

    def __init__(self, source: Iterable[Any], stages: list[Map | Batch | Serial], sink: Callable[[Any], None],
                 queue_size: int = 8, on_close: list[Callable[[], None]] | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size: expected >= 1, got {queue_size}")
        for stage in stages:
            self._body_of(stage)  # an unknown kind of stage is refused before any thread starts
        self.source, self.stages, self.sink = source, stages, sink
        self.queue_size = queue_size
        self.on_close = list(on_close or [])
        self._stop = threading.Event()
        self._errors: list[BaseException] = []

    # -- blocking helpers that honour the stop event ------------------------------------------
    def _put(self, q: queue.Queue, item: Any, stats: StageStats) -> None:
        t0 = time.perf_counter()
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        stats.wait_out_s += time.perf_counter() - t0

    def _get(self, q: queue.Queue, stats: StageStats, timeout_s: float | None = None) -> Any:
        t0 = time.perf_counter()
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            if self._stop.is_set():
                raise _Stop
            wait = _POLL_S if deadline is None else min(_POLL_S, max(deadline - time.perf_counter(), 0))
            try:
                item = q.get(timeout=wait)
                break
            except queue.Empty:
                if deadline is not None and time.perf_counter() >= deadline:
                    stats.wait_in_s += time.perf_counter() - t0
                    raise TimeoutError from None
        stats.wait_in_s += time.perf_counter() - t0
        return item

    # -- threads ----------------------------------------------------------------------------------
    def _body_of(self, stage: Map | Batch | Serial) -> Callable[..., None]:
        """The thread body that runs ``stage``."""
        for kind, body in ((Map, self._torn_down(self._map_body)), (Batch, self._batch_body),
                           (Serial, self._torn_down(self._serial_body))):
            if isinstance(stage, kind):
                return body
        raise TypeError(f"stages: expected Map, Batch or Serial stages, got {type(stage).__name__}")

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stop:
                pass
            except BaseException as err:  # noqa: BLE001 - reported by run()
                self._errors.append(err)
                self._stop.set()
        return run

    def _source_body(self, out: queue.Queue, stats: StageStats) -> None:
        iterator = iter(self.source)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                break
            stats.busy_s += time.perf_counter() - t0
            stats.items_out += 1
            self._put(out, item, stats)
        self._put(out, _END, stats)

    def _acquire(self, lock: Any, stats: StageStats) -> None:
        t0 = time.perf_counter()
        while not lock.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                raise _Stop
        stats.wait_turn_s += time.perf_counter() - t0

    def _torn_down(self, body: Callable[..., None]) -> Callable[..., None]:
        """``body(stage, ...)`` followed, whatever happens, by the stage's ``teardown``."""
        def run(stage: Map | Serial, *args: Any) -> None:
            try:
                body(stage, *args)
            finally:
                if stage.teardown is not None:
                    stage.teardown()
        return run

    def _map_body(self, stage: Map, inq: queue.Queue, out: queue.Queue, stats: StageStats) -> None:
        if stage.setup is not None:
            stage.setup()
        while (item := self._get(inq, stats)) is not _END:
            stats.items_in += 1
            if stage.lock is not None:
                self._acquire(stage.lock, stats)
            t0 = time.perf_counter()
            try:
                result = stage.fn(item)
            except PartialResult as partial:
                self._hand_over(partial.results, out, stats)
                raise partial.cause from None
            finally:
                stats.busy_s += time.perf_counter() - t0
                if stage.lock is not None:
                    stage.lock.release()
            if result is not None:
                stats.items_out += 1
                if isinstance(result, list):
                    stats.frames_out += len(result)
                if isinstance(result, list) and not result:
                    continue  # a micro-batch whose items were all dropped
                self._put(out, result, stats)
        self._put(out, _END, stats)

    def _hand_over(self, results: list[Any], out: queue.Queue, stats: StageStats) -> None:
        """Before a stage reports an error: pass on what it finished, and give the next stage up to
        :data:`_HAND_OVER_S` to take it (a stage finishes an item it has taken even after a stop, so a
        recorder writes those frames)."""
        stats.items_out += 1
        stats.frames_out += len(results)
        self._put(out, results, stats)
        deadline = time.perf_counter() + _HAND_OVER_S
        while not out.empty() and not self._stop.is_set() and time.perf_counter() < deadline:
            time.sleep(_POLL_S / 10)

    def _cut(self, inq: queue.Queue, stats: StageStats, size: int, timeout_s: float,
             take: Callable[[Any], list[Any]]) -> Iterator[list[Any]]:
        """Lists of exactly ``size`` of what ``take(item)`` makes of each input item, in order; a shorter
        one when ``timeout_s`` passes without input while some wait, and at the end."""
        pending: list[Any] = []
        done = False
        while not done:
            try:
                item = self._get(inq, stats, timeout_s=timeout_s if pending else None)
            except TimeoutError:
                item = None
            if item is _END:
                done = True
            elif item is not None:
                stats.items_in += 1
                pending.extend(take(item))
            while len(pending) >= size or (pending and (done or item is None)):
                batch, pending = pending[:size], pending[size:]
                yield batch

    def _batch_body(self, stage: Batch, inq: queue.Queue, out: queue.Queue, stats: StageStats) -> None:
        take = (lambda item: item) if stage.flatten else (lambda item: [item])
        for batch in self._cut(inq, stats, stage.size, stage.timeout_s, take):
            stats.items_out += 1
            stats.frames_out += len(batch) if stage.flatten else 0
            self._put(out, batch, stats)
        self._put(out, _END, stats)

    def _serial_body(self, stage: Serial, inq: queue.Queue, out: queue.Queue, stats: StageStats) -> None:
        if stage.setup is not None:
            stage.setup()
        item_part, batch_part = stage.parts
        stats.parts = {item_part: 0.0, batch_part: 0.0}
        take = lambda item: self._timed(stage.item_fn, item, stats, item_part)  # noqa: E731
        for batch in self._cut(inq, stats, stage.size, stage.timeout_s, take):
            if self._stop.is_set():  # nothing could take the result: do not start the work
                raise _Stop
            result = self._timed(stage.batch_fn, batch, stats, batch_part)
            if result is not None:
                stats.items_out += 1
                stats.frames_out += len(result) if isinstance(result, list) else 0
                self._put(out, result, stats)
        self._put(out, _END, stats)

    @staticmethod
    def _timed(fn: Callable[[Any], Any], item: Any, stats: StageStats, part: str) -> Any:
        """``fn(item)``, its time added to the stage's busy time and to ``part``'s; a
        :class:`PartialResult` is reported as its cause (the finished items' own work is done)."""
        t0 = time.perf_counter()
        try:
            return fn(item)
        except PartialResult as partial:
            raise partial.cause from None
        finally:
            elapsed = time.perf_counter() - t0
            stats.busy_s += elapsed
            stats.parts[part] += elapsed

    def _drain(self, q: queue.Queue, stats: StageStats) -> None:
        """After a stage error, sink what already finished every stage, then stop."""
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            if item is _END:
                return
            stats.items_in += 1
            self.sink(item)
            stats.items_out += 1

    def run(self) -> RunResult:
        """Run to the end of the source, an error, or Ctrl-C. Never leaves a thread behind."""
        queues = [queue.Queue(self.queue_size)] + [queue.Queue(s.queue_size or self.queue_size) for s in self.stages]
        stats = [StageStats("source")] + [StageStats(s.name) for s in self.stages]
        sink_stats = StageStats("sink")
        threads = [threading.Thread(target=self._guard(lambda: self._source_body(queues[0], stats[0])),
                                    name="privcam-source", daemon=True)]
        for i, stage in enumerate(self.stages):
            body = self._body_of(stage)
            threads.append(threading.Thread(
                target=self._guard(lambda b=body, s=stage, i=i: b(s, queues[i], queues[i + 1], stats[i + 1])),
                name=f"privcam-{stage.name}", daemon=True))
        t_start = time.perf_counter()
        interrupted = False
        for t in threads:
            t.start()
        try:
            while (item := self._get(queues[-1], sink_stats)) is not _END:
                sink_stats.items_in += 1
                t0 = time.perf_counter()
                self.sink(item)
                sink_stats.busy_s += time.perf_counter() - t0
                sink_stats.items_out += 1
        except _Stop:
            self._drain(queues[-1], sink_stats)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as err:  # noqa: BLE001 - a sink error stops the run like any other
            self._errors.append(err)
        finally:
            self._stop.set()
            for t in threads:
                t.join()
            close_errors = []
            for hook in self.on_close:
                try:
                    hook()
                except BaseException as err:  # noqa: BLE001
                    close_errors.append(err)
            self._errors.extend(close_errors)
        error = self._errors[0] if self._errors else None
        return RunResult(stats + [sink_stats], time.perf_counter() - t_start, sink_stats.items_out,
                         error=error, interrupted=interrupted)
