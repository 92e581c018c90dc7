from __future__ import annotations

import threading
import time

import pytest

from pipeline.stream.engine import Batch, Map, Pipeline, RunResult

BOUND_S = 60.0  # generous bound on waits that only expire when the engine is broken (never asserted as a time)


def privcam_threads() -> list[threading.Thread]:
    """The engine's and the workers' threads alive now. The readout tables' shuffle pool
    (``sensor.permutation``, ``privcam-shuffle_*``) lives for the process by design and is left out: it is
    there after any earlier test that built a frame's tables, which made this check depend on test order."""
    return [t for t in threading.enumerate()
            if t.name.startswith("privcam-") and not t.name.startswith("privcam-shuffle")]


def run_bounded(pipeline: Pipeline) -> RunResult:
    """``pipeline.run()`` in a helper thread, so that an engine that fails to stop fails the test instead of
    hanging it."""
    box: dict[str, RunResult] = {}
    runner = threading.Thread(target=lambda: box.setdefault("result", pipeline.run()), name="test-runner",
                              daemon=True)
    runner.start()
    runner.join(BOUND_S)
    assert not runner.is_alive(), "the pipeline did not stop"
    return box["result"]


def test_items_flow_in_order_through_map_and_batch():
    out = []
    result = Pipeline(range(23), [Map("double", lambda x: 2 * x), Batch("batch", 5)], out.append).run()
    assert result.error is None and not result.interrupted
    assert [len(b) for b in out] == [5, 5, 5, 5, 3]
    assert sum(out, []) == [2 * i for i in range(23)]
    names = [s.name for s in result.stages]
    assert names == ["source", "double", "batch", "sink"]
    assert result.stages[1].items_in == 23 and result.stages[2].items_out == 5
    assert not privcam_threads()


def test_backpressure_bounds_items_in_flight():
    produced, consumed = [], []

    def source():
        for i in range(60):
            produced.append(i)
            yield i

    def slow_sink(item):
        time.sleep(0.002)
        consumed.append(item)
        assert len(produced) - len(consumed) <= 2 * 3 + 3, "a bounded pipeline cannot run ahead"

    result = Pipeline(source(), [Map("a", lambda x: x), Map("b", lambda x: x)], slow_sink, queue_size=2).run()
    assert result.error is None and consumed == list(range(60))


def test_batch_flushes_on_timeout_for_a_slow_source():
    """After each item the source waits until that item's batch reached the sink. Nothing else arrives
    meanwhile, so only the batch timeout can flush it: no race between a sleep and the timeout."""
    flushed = [threading.Event() for _ in range(3)]
    waited = []

    def trickle():
        for i in range(3):
            yield i
            waited.append(flushed[i].wait(BOUND_S if all(waited) else 0))

    out = []

    def sink(batch):
        out.append(batch)
        next(e for e in flushed + [threading.Event()] if not e.is_set()).set()

    result = run_bounded(Pipeline(trickle(), [Batch("batch", 100, timeout_s=0.05)], sink))
    assert result.error is None
    assert waited == [True, True, True], "a pending batch was not flushed while the source was idle"
    assert out == [[0], [1], [2]]


def test_stage_error_stops_everything_and_runs_close_hooks():
    closed = []

    def boom(x):
        if x == 7:
            raise RuntimeError("stage failed on item 7")
        return x

    pulled = []

    def long_source():  # finite, so a pipeline that ignores the error ends (and fails below) instead of hanging
        for i in range(100_000):
            pulled.append(i)
            yield i

    out = []
    result = run_bounded(Pipeline(long_source(), [Map("boom", boom)], out.append,
                                  on_close=[lambda: closed.append(1)]))
    # the source stopped because of the error: at most the queues' worth (2 x 8) beyond item 7 was pulled
    assert len(pulled) <= 8 + 2 * 8 + 2, len(pulled)
    assert isinstance(result.error, RuntimeError) and "item 7" in str(result.error)
    assert out == list(range(7)) and closed == [1]
    assert not privcam_threads()


def test_ctrl_c_in_the_sink_stops_cleanly():
    seen = []

    def sink(item):
        seen.append(item)
        if len(seen) == 4:
            raise KeyboardInterrupt

    result = Pipeline(iter(range(1000)), [Map("id", lambda x: x)], sink).run()
    assert result.interrupted and result.error is None and result.items_out == 3
    assert not privcam_threads()


def test_bad_queue_size():
    with pytest.raises(ValueError, match="queue_size"):
        Pipeline([], [], print, queue_size=0)


def test_a_micro_batch_that_fails_part_way_hands_on_what_it_finished():
    """Items 0-2 of the failing micro-batch [0..4] reach the next stage (a recorder) before the error stops
    the run; the error is the stage's own."""
    from pipeline.stream.engine import each

    def capture(x: int) -> int:
        if x == 3:
            raise RuntimeError("sensor broke at 3")
        return x

    recorded: list[int] = []

    def record(items: list[int]) -> list[int]:
        recorded.extend(items)
        return items

    result = Pipeline([[0, 1, 2, 3, 4]], [Map("sensor", each(capture)), Map("recorder", record)],
                      lambda _: None).run()
    assert isinstance(result.error, RuntimeError) and "sensor broke at 3" in str(result.error)
    assert recorded == [0, 1, 2]
    assert each(capture)([0, 1]) == [0, 1]
    with pytest.raises(RuntimeError, match="sensor broke"):
        each(capture)([3, 4])  # nothing finished before the failure: the error itself


# -- Serial: item work, batching and batch work in one thread ------------------------------------------


def test_serial_stage_makes_the_batches_of_the_three_stage_chain_in_one_thread():
    """Micro-batches that do not divide the batch size, a dropped item, and a final short batch: the batch
    function sees exactly the batches Map(each) -> Batch(flatten) -> Map makes, in order, in one thread."""
    from pipeline.stream.engine import Serial, chunks, each

    threads: set[str] = set()

    def double(x: int) -> int | None:
        threads.add(threading.current_thread().name)
        return None if x == 7 else 2 * x

    def total(batch: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return list(batch)

    chained: list[list[int]] = []
    stages = [Map("double", each(double)), Batch("batcher", 4, BOUND_S, flatten=True), Map("total", total)]
    assert Pipeline(chunks(range(23), 3), stages, chained.append).run().error is None
    threads.clear()
    out: list[list[int]] = []
    result = Pipeline(chunks(range(23), 3), [Serial("serial", each(double), 4, total, BOUND_S,
                                                    parts=("double", "total"))], out.append).run()
    assert result.error is None
    assert out == chained and [len(b) for b in out] == [4, 4, 4, 4, 4, 2]
    assert sum(out, []) == [2 * i for i in range(23) if i != 7]
    assert threads == {"privcam-serial"}, "the item and the batch work ran in other threads"
    stats = result.stages[1]
    assert (stats.name, stats.items_in, stats.items_out, stats.frames_out) == ("serial", 8, 6, 22)
    assert set(stats.to_dict()["busy_s_parts"]) == {"double", "total"}
    assert not privcam_threads()


def test_serial_stage_flushes_a_short_batch_on_timeout_for_a_slow_source():
    """As test_batch_flushes_on_timeout_for_a_slow_source, through a Serial stage: each item waits until
    its batch reached the sink, which only the timeout can make happen."""
    from pipeline.stream.engine import Serial

    flushed = [threading.Event() for _ in range(3)]
    waited = []

    def trickle():
        for i in range(3):
            yield [i]
            waited.append(flushed[i].wait(BOUND_S if all(waited) else 0))

    out = []

    def sink(batch):
        out.append(batch)
        next(e for e in flushed + [threading.Event()] if not e.is_set()).set()

    result = run_bounded(Pipeline(trickle(), [Serial("serial", list, 100, list, timeout_s=0.05)], sink))
    assert result.error is None
    assert waited == [True, True, True], "a pending batch was not flushed while the source was idle"
    assert out == [[0], [1], [2]]


def test_serial_stage_failing_part_way_keeps_the_work_done_before_the_failure():
    """Item 6 fails inside the micro-batch [4, 5, 6, 7]: items 0-5 were recorded (the item work, in order),
    the full batch [0..3] reached the sink, and the error is the item's own; no thread is left."""
    from pipeline.stream.engine import Serial, chunks, each

    recorded: list[int] = []

    def capture_and_record(x: int) -> int:
        if x == 6:
            raise RuntimeError("sensor broke at 6")
        recorded.append(x)
        return x

    out: list[list[int]] = []
    result = run_bounded(Pipeline(chunks(range(12), 4), [Serial("serial", each(capture_and_record), 4, list,
                                                                BOUND_S)], out.append))
    assert isinstance(result.error, RuntimeError) and "sensor broke at 6" in str(result.error)
    assert recorded == [0, 1, 2, 3, 4, 5]
    assert out == [[0, 1, 2, 3]]
    assert not privcam_threads()


def test_serial_stage_stops_on_ctrl_c_in_the_sink_and_refuses_unknown_stages():
    from pipeline.stream.engine import Serial

    seen = []

    def sink(item):
        seen.append(item)
        if len(seen) == 2:
            raise KeyboardInterrupt

    result = run_bounded(Pipeline(([i] for i in range(10_000)), [Serial("serial", list, 2, list, BOUND_S)], sink))
    assert result.interrupted and result.error is None and result.items_out == 1
    assert not privcam_threads()
    with pytest.raises(ValueError, match="size"):
        Serial("serial", list, 0, list)
    with pytest.raises(TypeError, match="Map, Batch or Serial"):
        Pipeline([], [lambda x: x], print)
