"""Frames at once: a stage that runs its per-frame function on several frames concurrently, in order.

At a real sensor's size one capture does not use two cores fully: the exposure kernel scales with
numba's threads, but the checks, the MAC and the hand-offs around it do not (1920x1080 on 2 cores,
measured: 71 ms a frame at one numba thread, 47 ms at two). Two frames captured at once, each on one
numba thread, keep both cores busy. :class:`FrameWorkers` does that for a micro-batch: ``count``
worker threads, each with its own numba thread count, the results in the items' order, so what comes
out is what :func:`pipeline.stream.engine.each` gives (a frame depends only on the seed, the key and
its index, never on the thread that made it).

The worker threads live from :meth:`FrameWorkers.start` to :meth:`FrameWorkers.close` (a stage's
setup and teardown, in the stage's thread), so per-thread buffers (the sensor's readout scratch) are
reused from frame to frame and no thread outlives the run.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from sensor.errors import PrivcamError

from .engine import collect, each


class FrameWorkers:
    """``fn`` over a micro-batch on ``count`` threads at once, each running numba on ``numba_threads``.

    ``__call__(items)`` returns ``[fn(item) for item in items]`` in order with None results dropped
    (as :func:`pipeline.stream.engine.each`); when ``fn`` fails on an item, the results of the items
    before it (all finished by then) travel in :class:`PartialResult` and the items after it are
    cancelled or their results dropped. With ``count == 1`` it is ``each(fn)`` in the caller's thread.
    """

    def __init__(self, fn: Callable[[Any], Any], count: int, numba_threads: int = 1) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count: expected an integer >= 1, got {count!r}")
        self.fn, self.count, self.numba_threads = fn, count, numba_threads
        self._pool: ThreadPoolExecutor | None = None
        self._inline = each(fn)

    def start(self) -> None:
        """Start the worker threads (idempotent; nothing to start for one worker). Refuses numba's
        ``workqueue`` threading layer, which aborts the process when two threads launch parallel kernels."""
        if self.count > 1 and self._pool is None:
            check_concurrent_numba()
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="privcam-frames",
                                            initializer=_set_numba_threads, initargs=(self.numba_threads,))

    def close(self) -> None:
        """Stop the worker threads after the work they hold (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FrameWorkers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, items: list[Any]) -> list[Any]:
        if self.count == 1 or not items:  # one item still goes to a worker: its numba thread count
            return self._inline(items)
        self.start()
        assert self._pool is not None
        futures: list[Future] = [self._pool.submit(self.fn, item) for item in items]

        def drop_after(i: int) -> None:  # nothing of this call keeps running after it returns
            for later in futures[i + 1:]:
                later.cancel()
            for later in futures[i + 1:]:
                if not later.cancelled():
                    later.exception()
        return collect((future.result for future in futures), on_error=drop_after)


def concurrent_numba_layer() -> bool:
    """Whether numba's threading layer lets several threads launch parallel kernels at once (omp, tbb;
    not ``workqueue``, which aborts the process). Initialises the layer if nothing has yet."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # not initialised: nothing parallel ran yet
        _touch(np.zeros(2))
        layer = numba.threading_layer()
    return layer != "workqueue"


def check_concurrent_numba() -> None:
    """Raise :class:`sensor.errors.PrivcamError` unless :func:`concurrent_numba_layer`."""
    if not concurrent_numba_layer():
        raise PrivcamError("threads.sensor_frames: capturing frames at once needs numba's omp or tbb threading "
                           "layer (this process has workqueue, which aborts when two threads run parallel "
                           "kernels): install tbb, or set sensor_frames: 1")


@numba.njit(parallel=True, cache=True)
def _touch(x):  # pragma: no cover - numba: one trivial parallel launch, to initialise the threading layer
    total = 0.0
    for i in numba.prange(x.size):
        total += x[i]
    return total


def _set_numba_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
