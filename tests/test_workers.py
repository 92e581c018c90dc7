"""Frames at once (:class:`pipeline.stream.workers.FrameWorkers`): what ``each(fn)`` gives, in item order,
on worker threads that really run at once at their own numba thread count; failures part-way; and the
engine's stage ``teardown`` hook that closes those workers."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.stream.engine import Map, PartialResult, Pipeline, Serial, chunks, each
from pipeline.stream.workers import FrameWorkers
from tests.test_engine import run_bounded

BOUND_S = 30.0  # generous bound on waits that only expire when the code is broken (never asserted as a time)


def frame_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("privcam-frames") and t.is_alive()]


def outcome(call, items):
    """``call(items)`` as comparable data: ("ok", results), ("partial", results, cause) or ("error", err)."""
    try:
        return ("ok", call(items))
    except PartialResult as partial:
        return ("partial", partial.results, partial.cause)
    except Exception as err:  # noqa: BLE001 - compared by the caller
        return ("error", err)


# -- results: each(fn)'s, in order ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
def test_results_are_each_fns_in_item_order_even_when_early_items_are_slower(count):
    def fn(x: int) -> tuple[int, int] | None:
        time.sleep(0.003 * (8 - x))  # the first items finish last
        return None if x % 3 == 1 else (x, x * x)

    with FrameWorkers(fn, count, 1) as workers:
        for n in (0, 1, 2, 5, 7):
            items = list(range(n))
            expected = each(fn)(items)
            assert workers(items) == expected, (count, n)
            assert all(r is not None for r in expected) and len(expected) == n - len(range(1, n, 3))
        assert workers([1, 4]) == []  # every result dropped
    assert not frame_threads()


def test_one_worker_runs_inline_in_the_callers_thread_and_starts_no_thread():
    names = []
    workers = FrameWorkers(lambda x: names.append(threading.current_thread().name) or x, 1)
    workers.start()
    assert workers([3, 1, 2]) == [3, 1, 2]
    assert set(names) == {threading.current_thread().name}
    assert not frame_threads()
    workers.close()


def test_work_runs_on_the_worker_threads_which_are_kept_from_call_to_call():
    names: list[str] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            names.append(threading.current_thread().name)
        return x

    with FrameWorkers(fn, 2, 1) as workers:
        for _ in range(20):
            assert workers([0, 1, 2, 3]) == [0, 1, 2, 3]
        assert len(frame_threads()) <= 2
    assert set(names) and all(n.startswith("privcam-frames") for n in names), set(names)
    assert len(set(names)) <= 2, "a call started threads of its own"
    assert not frame_threads()


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None])
def test_count_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="count"):
        FrameWorkers(lambda x: x, bad)


# -- at once ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_count_items_really_run_at_once(count):
    """Each item waits until ``count`` items are inside ``fn``: only workers that run at once all get through."""
    barrier = threading.Barrier(count, timeout=BOUND_S)

    def fn(x: int) -> int:
        barrier.wait()
        return x

    with FrameWorkers(fn, count, 1) as workers:
        assert workers(list(range(count))) == list(range(count))
        assert workers(list(range(2 * count))) == list(range(2 * count))  # the next rounds too
    assert not frame_threads()


def test_one_worker_runs_one_item_at_a_time():
    barrier = threading.Barrier(2, timeout=0.2)
    with pytest.raises(threading.BrokenBarrierError):
        FrameWorkers(lambda x: barrier.wait(), 1)([0, 1])


# -- numba threads ----------------------------------------------------------------------------------------


def test_workers_run_numba_on_their_own_thread_count():
    import numba

    before = numba.get_num_threads()
    counts = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # the caller's count differs from 1
        caller = numba.get_num_threads()
        for n in counts:
            with FrameWorkers(lambda _: numba.get_num_threads(), 2, n) as workers:
                for size in (2, 3, 5):
                    assert workers(list(range(size))) == [n] * size, (n, size)
            assert numba.get_num_threads() == caller, "the workers changed the caller's numba threads"
    finally:
        numba.set_num_threads(before)


# -- failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("fail_at", [0, 1, 2, 4])
def test_failure_part_way_gives_the_results_before_it_in_order_with_the_original_error(count, fail_at):
    errors = {i: RuntimeError(f"sensor broke at {i}") for i in range(5)}

    def fn(x: int) -> int | None:
        time.sleep(0.004 * (5 - x))  # earlier items finish later: the failure is seen first
        if x == fail_at:
            raise errors[x]
        return None if x == 0 else 10 * x

    with FrameWorkers(fn, count, 1) as workers:
        got = outcome(workers, list(range(5)))
    expected = outcome(each(fn), list(range(5)))
    assert got == expected  # what each(fn) gives, the very error object included
    before = [10 * i for i in range(1, fail_at)]
    if before:
        assert got == ("partial", before, errors[fail_at])
        assert got[2] is errors[fail_at]
    else:  # nothing finished before the failure (item 0's None is dropped): the error itself
        assert got[0] == "error" and got[1] is errors[fail_at]
    assert not frame_threads()


def test_failure_raises_partial_result_chained_to_its_cause():
    def fn(x: int) -> int:
        if x == 2:
            raise KeyError("no such scene")
        return x

    with FrameWorkers(fn, 2, 1) as workers, pytest.raises(PartialResult) as info:
        workers([0, 1, 2, 3])
    assert info.value.results == [0, 1] and isinstance(info.value.cause, KeyError)
    assert info.value.__cause__ is info.value.cause
    assert not frame_threads()


def test_no_later_item_keeps_running_after_a_failure_is_raised():
    """Later items are cancelled or waited for: whatever started has finished by the time the call raises,
    and their results are dropped."""
    started: set[int] = set()
    finished: set[int] = set()
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            started.add(x)
        if x == 1:
            raise RuntimeError("broke at 1")
        time.sleep(0.1)
        with lock:
            finished.add(x)
        return x

    workers = FrameWorkers(fn, 2, 1)
    workers.start()
    try:
        with pytest.raises(PartialResult) as info:
            workers(list(range(8)))
        with lock:
            assert started - {1} == finished, "a later item was still running after the call raised"
        assert info.value.results == [0]
        assert len(started) < 8, "no later item was cancelled"
        assert workers([5, 6]) == [5, 6]  # the workers are still usable
    finally:
        workers.close()
    assert not frame_threads()


def test_close_joins_the_worker_threads_and_is_idempotent():
    workers = FrameWorkers(lambda x: time.sleep(0.01) or x, 3, 1)
    workers.start()
    assert workers(list(range(6))) == list(range(6))
    assert frame_threads(), "no worker thread was started"
    workers.close()
    assert not frame_threads()
    workers.close()
    assert not frame_threads()
    with FrameWorkers(lambda x: x, 2, 1) as again:
        assert again([1, 2]) == [1, 2]
    assert not frame_threads()


# -- the engine's teardown hook ---------------------------------------------------------------------------


class Hooks:
    """Records where and when a stage's setup and teardown ran, and its items."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def note(self, what: str) -> None:
        with self.lock:
            self.events.append((what, threading.current_thread().name))

    def setup(self) -> None:
        self.note("setup")

    def teardown(self) -> None:
        self.note("teardown")

    def teardowns(self) -> list[str]:
        return [name for what, name in self.events if what == "teardown"]


def check_torn_down_once_last(hooks: Hooks, stage: str) -> None:
    assert hooks.teardowns() == [f"privcam-{stage}"], hooks.teardowns()
    assert hooks.events[-1] == ("teardown", f"privcam-{stage}"), "teardown ran before the stage's last work"
    assert hooks.events[0] == ("setup", f"privcam-{stage}")


def map_stage(name: str, hooks: Hooks, fail_at: int | None = None) -> Map:
    def fn(items: list[int]) -> list[int]:
        hooks.note("item")
        if fail_at in items:
            raise RuntimeError(f"{name} broke at {fail_at}")
        return items

    return Map(name, fn, setup=hooks.setup, teardown=hooks.teardown)


def serial_stage(name: str, hooks: Hooks, fail_items_at: int | None = None, fail_batch: bool = False) -> Serial:
    def item_fn(items: list[int]) -> list[int]:
        hooks.note("items")
        if fail_items_at in items:
            raise RuntimeError(f"{name} broke at {fail_items_at}")
        return list(items)

    def batch_fn(batch: list[int]) -> list[int]:
        hooks.note("batch")
        if fail_batch:
            raise RuntimeError(f"{name} batch broke")
        return batch

    return Serial(name, item_fn, 2, batch_fn, BOUND_S, setup=hooks.setup, teardown=hooks.teardown)


def test_teardown_runs_once_in_the_stage_thread_after_a_normal_end():
    a, b = Hooks(), Hooks()
    out: list = []
    result = run_bounded(Pipeline(chunks(range(10), 3), [map_stage("a", a), serial_stage("s", b)], out.append))
    assert result.error is None and sum(out, []) == list(range(10))
    check_torn_down_once_last(a, "a")
    check_torn_down_once_last(b, "s")
    assert [w for w, _ in a.events].count("item") == 4 and [w for w, _ in b.events].count("batch") == 5


@pytest.mark.parametrize("failing", ["map", "items", "batch"])
def test_teardown_runs_once_in_each_stage_thread_after_a_stage_error(failing):
    a, b = Hooks(), Hooks()
    stages = [map_stage("a", a, fail_at=4 if failing == "map" else None),
              serial_stage("s", b, fail_items_at=4 if failing == "items" else None, fail_batch=failing == "batch")]

    def long_source():
        yield from chunks(range(100_000), 3)

    result = run_bounded(Pipeline(long_source(), stages, lambda _: None))
    assert isinstance(result.error, RuntimeError) and "broke" in str(result.error)
    # the failing stage and the one stopped by it are both torn down, once each, in their own threads
    assert a.teardowns() == ["privcam-a"] and b.teardowns() == ["privcam-s"]
    assert b.events[-1] == ("teardown", "privcam-s") and a.events[-1] == ("teardown", "privcam-a")


@pytest.mark.parametrize("kind", ["map", "serial"])
def test_teardown_runs_once_in_the_stage_thread_on_ctrl_c_in_the_sink(kind):
    hooks = Hooks()
    stage = map_stage("st", hooks) if kind == "map" else serial_stage("st", hooks)
    seen: list = []

    def sink(item):
        seen.append(item)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result = run_bounded(Pipeline(chunks(range(1_000_000), 2), [stage], sink))
    assert result.interrupted and result.error is None
    check_torn_down_once_last(hooks, "st")


def test_teardown_runs_when_setup_fails_and_frame_workers_are_closed_by_the_stage():
    hooks = Hooks()

    def bad_setup() -> None:
        hooks.note("setup")
        raise RuntimeError("setup broke")

    result = run_bounded(Pipeline([[1]], [Map("m", lambda x: x, setup=bad_setup, teardown=hooks.teardown)],
                                  lambda _: None))
    assert isinstance(result.error, RuntimeError) and "setup broke" in str(result.error)
    assert hooks.teardowns() == ["privcam-m"]

    # FrameWorkers started in a stage's setup and closed by its teardown leave no thread behind
    workers = FrameWorkers(lambda x: 2 * x, 2, 1)
    out: list = []
    result = run_bounded(Pipeline(chunks(range(9), 3), [Map("sensor", workers, setup=workers.start,
                                                            teardown=workers.close)], out.append))
    assert result.error is None and sum(out, []) == [2 * i for i in range(9)]
    assert not frame_threads()


def test_a_single_item_still_runs_on_a_worker_at_its_numba_thread_count():
    """A micro-batch of one scene (the last one, or micro_batch: 1) is captured at the budget's count,
    not the calling thread's."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba threads to differ")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with FrameWorkers(lambda _: (numba.get_num_threads(), threading.current_thread().name), 2, 1) as workers:
            [(threads, name)] = workers([0])
        assert threads == 1 and name.startswith("privcam-frames")
    finally:
        numba.set_num_threads(before)


def test_frames_at_once_are_refused_under_numbas_workqueue_layer(monkeypatch):
    """numba's workqueue layer aborts the process when two threads launch parallel kernels: frame workers
    refuse it with an error naming the setting, and auto's calibration does not time frames at once."""
    import numba

    from pipeline.stream.budget import measure_costs
    from sensor.errors import PrivcamError

    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    with pytest.raises(PrivcamError, match="sensor_frames"):
        FrameWorkers(lambda x: x, 2, 1).start()
    assert FrameWorkers(lambda x: x, 1, 1)([1, None, 2]) == [1, 2]  # one at a time needs no check
    costs = measure_costs(lambda _: None, lambda _: None, 1, cores=2, repeat=1)
    assert costs.sensor_at_once is None and costs.serial_sensor()[1] == 1
