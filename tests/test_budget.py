"""The pipeline's thread budget (config, choice from measured costs), the engine's micro-batch and
turn-taking stages, and the serial mode's one stage."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from pipeline.stream.budget import SPLIT_MARGIN, StageCosts, ThreadBudget, amdahl, choose_budget, parse_threads
from pipeline.stream.engine import Batch, Map, Pipeline, RunResult, chunks, each
from pipeline.stream.run import RunConfig
from pipeline.stream.stages import auto_budget, live_stages, micro_batch_size
from sensor.errors import ConfigError


def test_threads_config_auto_or_a_budget_that_adds_up_to_the_machine():
    assert parse_threads("auto", cores=2) is None
    budget = parse_threads({"sensor": 1, "model": 1}, cores=2)
    assert (budget.mode, budget.sensor, budget.model, budget.source) == ("split", 1, 1, "config")
    turns = parse_threads({"sensor": 2, "model": 2, "mode": "turns"}, cores=2)
    assert (turns.mode, turns.sensor, turns.model) == ("turns", 2, 2)
    serial = parse_threads({"sensor": 1, "model": 2, "mode": "serial"}, cores=2)
    assert (serial.mode, serial.sensor, serial.model, serial.source) == ("serial", 1, 2, "config")
    bad = [({"sensor": 2, "model": 1}, "threads"), ({"sensor": 0, "model": 1}, "threads.sensor"),
           ({"sensor": 1, "model": 3, "mode": "turns"}, "threads.model"),
           ({"sensor": 3, "model": 2, "mode": "serial"}, "threads.sensor"),
           ({"sensor": 2, "model": 2, "mode": "Serial"}, "threads.mode"),
           ({"sensor": 1, "model": True}, "threads.model"), ({"sensor": 1}, "threads.model"),
           ({"sensor": 1, "model": 1, "numba": 2}, "threads.numba"),
           ({"sensor": 1, "model": 1, "mode": "fast"}, "threads.mode"), ("fast", "threads"), (4, "threads")]
    for value, field in bad:
        with pytest.raises(ConfigError) as err:
            parse_threads(value, cores=2)
        assert err.value.field == field, value
    with pytest.raises(ConfigError, match="split, serial, turns|split.*serial.*turns"):
        parse_threads({"sensor": 1, "model": 1, "mode": "fused"}, cores=2)
    with pytest.raises(ConfigError, match=r"mode: split\|serial\|turns"):
        parse_threads("all", cores=2)
    with pytest.raises(ConfigError, match="or mode: serial"):
        parse_threads({"sensor": 2, "model": 2}, cores=2)


def test_run_config_validates_threads_and_micro_batch_naming_the_field():
    cfg = RunConfig.from_dict({"pipeline": {"threads": {"sensor": 1, "model": 1}, "micro_batch": 4}}, "test")
    assert cfg.pipeline.threads == {"sensor": 1, "model": 1} and cfg.pipeline.micro_batch == 4
    assert RunConfig.from_dict({}, "test").pipeline.threads == "auto"
    for section, field in [({"threads": {"sensor": 0, "model": 1}}, "pipeline.threads.sensor"),
                           ({"threads": "all"}, "pipeline.threads"),
                           ({"micro_batch": 0}, "pipeline.micro_batch"),
                           ({"micro_batch": 65, "batch_size": 64}, "pipeline.micro_batch"),
                           ({"micro_batch": "big"}, "pipeline.micro_batch")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            RunConfig.from_dict({"pipeline": section}, "test")


def test_micro_batch_auto_is_about_a_megapixel_and_at_most_the_model_batch():
    assert micro_batch_size("auto", 64, 28, 28) == 64
    assert micro_batch_size("auto", 8, 1080, 1920) == 1
    assert micro_batch_size("auto", 64, 256, 256) == 16
    assert micro_batch_size(3, 64, 28, 28) == 3


def test_budget_choice_from_measured_costs():
    assert amdahl(1.0, 0.5, 2, 1) == 1.0 and amdahl(1.0, 0.5, 2, 2) == 0.5
    assert amdahl(1.0, 0.25, 4, 2) == pytest.approx(0.5)  # perfectly parallel: Amdahl's p = 1
    # stages that gain little from a second thread: the split is estimated 1.8x faster than serial
    balanced = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.9, model_1=1.0, model_all=0.9))
    assert (balanced.mode, balanced.sensor, balanced.model, balanced.source) == ("split", 1, 1, "auto")
    assert balanced.estimate["split 1+1"] == pytest.approx(1.0)
    assert balanced.estimate["serial"] == pytest.approx(1 / 1.8)
    # a split estimated only 1.2x faster is not taken (SPLIT_MARGIN: its estimate leaves out contention)
    close = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.6, model_1=1.0, model_all=0.6))
    assert close.estimate["split 1+1"] == pytest.approx(1.2 * close.estimate["serial"])
    assert close.estimate["split 1+1"] < SPLIT_MARGIN * close.estimate["serial"] and close.mode == "overlap"
    # where turns used to win (one stage dominates), the stages run at once on the serial plan's threads
    # (overlap: every core each; the serial plan's estimate is its lower bound)
    dominant = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.55, model_1=0.1, model_all=0.06))
    assert (dominant.mode, dominant.sensor, dominant.model) == ("overlap", 2, 2)
    assert dominant.estimate["serial"] == pytest.approx(1 / 0.61)
    assert dominant.estimate["serial"] > dominant.estimate["split 1+1"]
    small_frames = choose_budget(StageCosts(2, sensor_1=0.3, sensor_all=0.5, model_1=10.0, model_all=5.0))
    assert (small_frames.mode, small_frames.sensor, small_frames.model) == ("overlap", 1, 2)
    four = choose_budget(StageCosts(4, sensor_1=3.0, sensor_all=0.75, model_1=1.0, model_all=1.0))  # 3+1: 1.75x serial
    assert (four.mode, four.sensor, four.model) == ("split", 3, 1)
    one = choose_budget(StageCosts(1, 1.0, 1.0, 1.0, 1.0))  # nothing to overlap on one core
    assert (one.mode, one.sensor, one.model) == ("serial", 1, 1)
    tie = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.5, model_1=1.0, model_all=0.5))
    assert tie.estimate["serial"] == pytest.approx(tie.estimate["split 1+1"]) and tie.mode == "overlap"
    report = balanced.to_dict()
    assert report["mode"] == "split" and report["measured"]["sensor_s_per_frame_1_thread"] == 1.0
    assert set(report["estimated_frames_per_s"]) == {"serial", "split 1+1"}


def test_micro_batches_are_recut_into_batches_of_exactly_the_model_size():
    out = []
    stages = [Map("double", each(lambda x: None if x == 7 else 2 * x)), Batch("batcher", 4, 30.0, flatten=True)]
    result = Pipeline(chunks(range(23), 3), stages, out.append).run()
    assert result.error is None
    assert [len(b) for b in out] == [4, 4, 4, 4, 4, 2]
    assert sum(out, []) == [2 * i for i in range(23) if i != 7]
    assert result.stages[1].items_in == 8 and result.stages[1].frames_out == 22
    assert list(chunks([], 3)) == [] and list(chunks(range(4), 2)) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="size"):
        list(chunks(range(3), 0))


def test_stages_sharing_a_lock_take_turns_and_setup_runs_in_the_stage_thread():
    lock, state = threading.Lock(), {"inside": 0, "most": 0, "setup": []}

    def work(x):
        state["inside"] += 1
        state["most"] = max(state["most"], state["inside"])
        for _ in range(2000):  # long enough for the other stage's thread to be scheduled
            pass
        state["inside"] -= 1
        return x

    def setup():
        state["setup"].append(threading.current_thread().name)

    out = []
    stages = [Map("a", work, setup=setup, lock=lock), Map("b", work, setup=setup, lock=lock)]
    result = Pipeline(range(200), stages, out.append).run()
    assert result.error is None and out == list(range(200))
    assert state["most"] == 1, "two stages holding the same lock ran at once"
    assert sorted(state["setup"]) == ["privcam-a", "privcam-b"]
    assert ThreadBudget(2, 2, "turns", 2).to_dict()["mode"] == "turns"


class FakeClassifier:
    """Stands in for :class:`KeyedClassifier` over int "frames": keeps the batches it classified and the
    numba thread count each batch ran at."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.numba_threads: list[int] = []

    def prepare(self, frames: list[int]) -> list[int]:
        import numba

        self.batches.append(list(frames))
        self.numba_threads.append(numba.get_num_threads())
        return frames

    def predict(self, frames: list[int]) -> list[dict[str, int]]:
        return [{"frame_index": f, "pred": f % 3} for f in frames]

    def __call__(self, frames: list[int]) -> list[dict[str, int]]:
        return self.predict(self.prepare(frames))


def run_live(mode: str, n: int, fail_at: int | None = None, interrupt_after: int | None = None,
             budget: ThreadBudget | None = None, captured: list[tuple[int, str]] | None = None
             ) -> tuple[list[dict], list[int], list[int], FakeClassifier, RunResult]:
    """``live_stages`` in ``mode`` over scenes 0..n-1 (micro-batches of 3, model batches of 4, scene 5
    skipped by the capture, scene ``fail_at`` raising, Ctrl-C in the sink after ``interrupt_after``
    batches): (predictions, recorded frames, the numba threads each capture ran at, the classifier, the
    run's result). ``budget`` replaces the mode's default budget; ``captured`` collects each scene captured
    and the thread that captured it (in the order the captures finished: several may run at once)."""
    import numba

    recorded: list[int] = []
    capture_threads: list[int] = []

    def capture(scene: int) -> int | None:
        if scene == fail_at:
            raise RuntimeError(f"sensor broke at {scene}")
        capture_threads.append(numba.get_num_threads())
        if captured is not None:
            captured.append((scene, threading.current_thread().name))
        return None if scene == 5 else scene

    def record(frame: int) -> int:
        recorded.append(frame)
        return frame

    classifier, out = FakeClassifier(), []

    def sink(rows: list[dict]) -> None:
        if interrupt_after is not None and len(out) >= 4 * interrupt_after:
            raise KeyboardInterrupt
        out.extend(rows)

    if budget is None:
        budget = ThreadBudget(1, 2, mode, 2) if mode != "split" else ThreadBudget(1, 1, "split", 2)
    assert budget.mode == mode
    stages = live_stages(capture, classifier, budget, 4, 30.0, record)
    result = Pipeline(chunks(range(n), 3), stages, sink).run()
    return out, recorded, capture_threads, classifier, result


def test_serial_mode_is_one_stage_that_makes_the_batches_the_stages_make():
    """The serial mode: one thread does the capture, the recording (every frame, in order) and the model's
    batches (exactly the batch size, the short one last), and predicts what the threaded stages predict;
    numba runs on the sensor's share for the capture and on the model's for the batches."""
    import numba

    out, recorded, capture_threads, classifier, result = run_live("serial", 23)
    assert result.error is None
    assert [s.name for s in result.stages] == ["source", "serial", "sink"]
    frames = [i for i in range(23) if i != 5]
    assert recorded == frames
    assert classifier.batches == [frames[i:i + 4] for i in range(0, 22, 4)]
    turns_out, turns_recorded, _, turns_classifier, _ = run_live("turns", 23)
    overlap_out, overlap_recorded, _, overlap_classifier, _ = run_live("overlap", 23)
    assert out == overlap_out and recorded == overlap_recorded and classifier.batches == overlap_classifier.batches
    assert out == turns_out and recorded == turns_recorded and classifier.batches == turns_classifier.batches
    assert set(capture_threads) == {1}
    assert set(classifier.numba_threads) == {min(2, numba.config.NUMBA_NUM_THREADS)}
    parts = result.stages[1].to_dict()["busy_s_parts"]
    assert set(parts) == {"sensor", "model"}


def test_serial_mode_failing_capture_mid_batch_records_the_frames_before_it():
    out, recorded, _, classifier, result = run_live("serial", 23, fail_at=10)
    assert isinstance(result.error, RuntimeError) and "sensor broke at 10" in str(result.error)
    assert recorded == [0, 1, 2, 3, 4, 6, 7, 8, 9], "a frame captured before the failure was not recorded"
    assert classifier.batches == [[0, 1, 2, 3], [4, 6, 7, 8]]
    assert [row["frame_index"] for row in out] == [0, 1, 2, 3, 4, 6, 7, 8]


def test_auto_budget_runs_serially_when_nothing_can_be_measured():
    one_core = auto_budget(lambda: pytest.fail("nothing to measure on one core"), None, 8, cores=1)
    assert (one_core.mode, one_core.sensor, one_core.model, one_core.source) == ("serial", 1, 1, "auto")
    no_scene = auto_budget(lambda: None, None, 8, cores=2)
    assert (no_scene.mode, no_scene.sensor, no_scene.model) == ("serial", 2, 2)


def test_auto_budget_runs_the_model_on_a_replays_threads(monkeypatch):
    """Costs for which a 1+1 split is estimated 1.8x faster: auto still runs serially, the model on torch's
    default thread count, because a replay classifies at that count and logits may change with it."""
    import numpy as np
    import torch

    import pipeline.stream.stages as stages

    frame = type("F", (), {"data": np.zeros((4, 4), np.uint16), "meta": type("M", (), {"frame_index": 0})()})()
    costs = StageCosts(2, sensor_1=1.0, sensor_all=0.9, model_1=1.0, model_all=0.9)
    monkeypatch.setattr(stages, "measure_costs", lambda *args, **kw: costs)
    tried = []

    def trial(capture_one, classifier, budget, batch_size, frames, frame_hw):  # overlap the faster
        tried.append(budget.model)
        return {"serial": 10.0, "overlap": 11.0}
    monkeypatch.setattr(stages, "trial_modes", trial)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        budget = auto_budget(lambda: frame, None, 8, cores=2)
        assert choose_budget(costs).mode == "split"
        assert (budget.mode, budget.model, budget.source) == ("overlap", 2, "auto")
        assert tried == [2], "overlap was chosen without a trial at the model's threads"
        assert "fewer torch threads than a replay" in budget.note
        torch.set_num_threads(1)  # a process whose torch default is one thread: the 1+1 split keeps it
        assert auto_budget(lambda: frame, None, 8, cores=2).mode == "split"
        # serial plans run the model at that default too (what a replay under OMP_NUM_THREADS=1 uses)
        monkeypatch.setattr(stages, "measure_costs", lambda *args, **kw: StageCosts(2, 1.0, 0.55, 0.1, 0.06))
        serial = auto_budget(lambda: frame, None, 8, cores=2)
        assert (serial.mode, serial.sensor, serial.model) == ("overlap", 2, 1)
        assert auto_budget(lambda: None, None, 8, cores=2).model == 1
    finally:
        torch.set_num_threads(before)


def test_serial_mode_interrupted_loses_no_captured_frame():
    """Ctrl-C in the sink after two batches: every frame the serial stage captured was recorded, in order,
    and the predictions that reached the sink are those of the first batches."""
    out, recorded, capture_threads, classifier, result = run_live("serial", 3000, interrupt_after=2)
    assert result.interrupted and result.error is None
    captured = [i for i in range(len(capture_threads)) if i != 5]  # one count per scene captured, in order
    assert recorded == captured and len(recorded) < 2999
    assert [row["frame_index"] for row in out] == sum(classifier.batches[:2], [])


# -- frames captured at once (sensor_frames) ----------------------------------------------------------------


def frame_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("privcam-frames") and t.is_alive()]


def test_sensor_frames_in_the_threads_config():
    assert parse_threads({"sensor": 1, "model": 1}, cores=2).sensor_frames == 1
    at_once = parse_threads({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": 2}, cores=2)
    assert (at_once.mode, at_once.sensor, at_once.sensor_frames, at_once.model) == ("serial", 1, 2, 2)
    assert at_once.to_dict()["sensor_frames"] == 2
    assert ThreadBudget(2, 2, "serial", 2).to_dict()["sensor_frames"] == 1
    turns = parse_threads({"sensor": 1, "model": 2, "mode": "turns", "sensor_frames": 2}, cores=2)
    assert (turns.mode, turns.sensor_frames) == ("turns", 2)
    assert parse_threads({"sensor": 1, "model": 1, "sensor_frames": 2}, cores=3).sensor_frames == 2  # 2 x 1 + 1
    bad = [({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": 0}, "threads.sensor_frames"),
           ({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": 3}, "threads.sensor_frames"),
           ({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": True}, "threads.sensor_frames"),
           ({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": "2"}, "threads.sensor_frames"),
           ({"sensor": 1, "model": 2, "mode": "serial", "sensor_frames": 1.0}, "threads.sensor_frames"),
           ({"sensor": 2, "model": 2, "mode": "serial", "sensor_frames": 2}, "threads.sensor_frames"),
           ({"sensor": 2, "model": 2, "mode": "turns", "sensor_frames": 2}, "threads.sensor_frames"),
           ({"sensor": 1, "model": 1, "sensor_frames": 2}, "threads"),  # split: 2 x 1 + 1 > 2 cores
           ({"sensor": 1, "model": 1, "frames": 2}, "threads.frames")]
    for value, field in bad:
        with pytest.raises(ConfigError) as err:
            parse_threads(value, cores=2)
        assert err.value.field == field, value
    with pytest.raises(ConfigError, match="sensor_frames"):
        parse_threads({"sensor": 1, "model": 1, "speed": 2}, cores=2)  # the known keys are listed
    with pytest.raises(ConfigError) as err:
        ThreadBudget(1, 1, "split", 2, sensor_frames=2)
    assert err.value.field == "threads"


def test_budget_choice_captures_frames_at_once_only_when_measured_clearly_faster():
    from pipeline.stream.budget import AT_ONCE_MARGIN

    faster = StageCosts(2, sensor_1=1.0, sensor_all=0.6, model_1=0.1, model_all=0.1, sensor_at_once=0.5)
    assert faster.serial_sensor() == (1, 2, 0.5)
    budget = choose_budget(faster)
    assert (budget.mode, budget.sensor, budget.sensor_frames, budget.model) == ("overlap", 1, 2, 2)
    assert budget.estimate["serial"] == pytest.approx(1 / 0.6)
    assert budget.to_dict()["sensor_frames"] == 2
    assert faster.to_dict()["sensor_s_per_frame_2_frames_at_once"] == 0.5
    assert 0.58 * AT_ONCE_MARGIN > 0.6  # not clearly faster than one frame on both cores
    close = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.6, model_1=0.1, model_all=0.1,
                                     sensor_at_once=0.58))
    assert (close.mode, close.sensor, close.sensor_frames, close.model) == ("overlap", 2, 1, 2)
    assert close.estimate["serial"] == pytest.approx(1 / 0.7)
    unmeasured = StageCosts(2, sensor_1=1.0, sensor_all=0.6, model_1=0.1, model_all=0.1)
    assert (choose_budget(unmeasured).sensor, choose_budget(unmeasured).sensor_frames) == (2, 1)
    assert "sensor_s_per_frame_2_frames_at_once" not in unmeasured.to_dict()
    # at once against one frame on one thread (faster than on both), and never on one core
    assert StageCosts(2, 0.5, 0.7, 0.1, 0.1, sensor_at_once=0.4).serial_sensor() == (1, 2, 0.4)
    assert StageCosts(2, 0.5, 0.7, 0.1, 0.1, sensor_at_once=0.46).serial_sensor() == (1, 1, 0.5)
    assert StageCosts(1, 1.0, 1.0, 0.1, 0.1, sensor_at_once=0.1).serial_sensor()[1] == 1
    # a split is still a split of single frames, though serial would capture two at once
    costs = StageCosts(2, sensor_1=1.0, sensor_all=0.9, model_1=1.0, model_all=0.9, sensor_at_once=0.8)
    assert costs.serial_sensor() == (1, 2, 0.8)
    split = choose_budget(costs)
    assert (split.mode, split.sensor, split.sensor_frames, split.model) == ("split", 1, 1, 1)
    assert split.estimate["serial"] == pytest.approx(1 / 1.7)


def test_micro_batch_auto_holds_at_least_the_frames_captured_at_once():
    assert micro_batch_size("auto", 8, 1080, 1920, 2) == 2
    assert micro_batch_size("auto", 1, 1080, 1920, 2) == 1  # never more than the model batch
    assert micro_batch_size(3, 8, 1080, 1920, 2) == 3  # a configured size is kept
    assert micro_batch_size("auto", 64, 28, 28, 2) == 64
    assert micro_batch_size("auto", 8, 1080, 1920) == 1


def test_measure_costs_times_cores_captures_at_once():
    """A capture that waits 20 ms without holding the GIL: two at once take about 10 ms a frame."""
    from pipeline.stream.budget import measure_costs

    names: set[str] = set()

    def sensor_fn(threads: int) -> None:
        names.add(threading.current_thread().name)
        time.sleep(0.02)

    costs = measure_costs(sensor_fn, lambda threads: None, 1, cores=2, repeat=1)
    assert costs.sensor_at_once is not None and costs.sensor_at_once < 0.75 * costs.sensor_1, costs
    assert any(n.startswith("privcam-frames") for n in names)
    assert not frame_threads()
    assert measure_costs(sensor_fn, lambda threads: None, 1, cores=1, repeat=1).sensor_at_once is None


AT_ONCE_BUDGETS = [ThreadBudget(1, 2, "serial", 2, sensor_frames=2), ThreadBudget(1, 2, "turns", 2, sensor_frames=2),
                   ThreadBudget(1, 1, "split", 3, sensor_frames=2), ThreadBudget(1, 2, "overlap", 2, sensor_frames=2)]


@pytest.mark.parametrize("budget", AT_ONCE_BUDGETS, ids=lambda b: b.mode)
def test_frames_at_once_make_what_one_at_a_time_makes(budget):
    """Two frames captured at once: the same frames recorded in order, the same model batches and the same
    predictions as one at a time; every capture on the sensor's numba threads; no worker left."""
    import numba

    captured: list[tuple[int, str]] = []
    out, recorded, capture_threads, classifier, result = run_live(budget.mode, 23, budget=budget, captured=captured)
    assert result.error is None
    one_out, one_recorded, _, one_classifier, one_result = run_live(budget.mode, 23)
    assert one_result.error is None
    frames = [i for i in range(23) if i != 5]
    assert recorded == one_recorded == frames
    assert classifier.batches == one_classifier.batches == [frames[i:i + 4] for i in range(0, 22, 4)]
    assert out == one_out and [row["frame_index"] for row in out] == frames
    assert sorted(scene for scene, _ in captured) == list(range(23))
    assert {name for _, name in captured} <= {"privcam-frames_0", "privcam-frames_1"}, "not captured at once"
    assert set(capture_threads) == {1}  # the serial stage's own thread runs numba on the model's 2
    if budget.mode == "serial":
        assert [s.name for s in result.stages] == ["source", "serial", "sink"]
        assert set(classifier.numba_threads) == {min(2, numba.config.NUMBA_NUM_THREADS)}
    assert not frame_threads()


@pytest.mark.parametrize("budget", AT_ONCE_BUDGETS[:2], ids=lambda b: b.mode)
def test_frames_at_once_failing_capture_mid_batch_records_the_frames_before_it(budget):
    out, recorded, _, classifier, result = run_live(budget.mode, 23, fail_at=10, budget=budget)
    assert isinstance(result.error, RuntimeError) and "sensor broke at 10" in str(result.error)
    assert recorded == [0, 1, 2, 3, 4, 6, 7, 8, 9], "a frame captured before the failure was not recorded"
    if budget.mode == "serial":
        assert classifier.batches == [[0, 1, 2, 3], [4, 6, 7, 8]]
        assert [row["frame_index"] for row in out] == [0, 1, 2, 3, 4, 6, 7, 8]
        # the first scene of a micro-batch failing: nothing of it is recorded, everything before it is
        _, recorded, _, _, result = run_live("serial", 23, fail_at=9, budget=budget)
        assert isinstance(result.error, RuntimeError) and "sensor broke at 9" in str(result.error)
        assert recorded == [0, 1, 2, 3, 4, 6, 7, 8]
    assert not frame_threads()


@pytest.mark.parametrize("budget", AT_ONCE_BUDGETS[:2], ids=lambda b: b.mode)
def test_frames_at_once_interrupted_record_in_order(budget):
    """Ctrl-C in the sink after two batches: the recorded frames are the scenes in order (scene 5 skipped) up
    to where the run stopped; in serial mode every frame captured was recorded."""
    captured: list[tuple[int, str]] = []
    out, recorded, _, classifier, result = run_live(budget.mode, 3000, interrupt_after=2, budget=budget,
                                                    captured=captured)
    assert result.interrupted and result.error is None
    assert 8 <= len(recorded) < 2999
    assert recorded == [i for i in range(3000) if i != 5][:len(recorded)]
    scenes = [scene for scene, _ in captured]
    assert set(recorded) <= set(scenes)
    if budget.mode == "serial":
        assert sorted(scenes) == sorted(recorded + [5]), "a captured frame was not recorded"
    assert [row["frame_index"] for row in out] == sum(classifier.batches[:2], [])
    assert not frame_threads()


# -- overlap or serial, from a trial of both ----------------------------------------------------------------


def test_trial_frames_are_whole_batches_of_about_the_trial_time():
    from pipeline.stream.stages import TRIAL_S, trial_frames

    assert trial_frames(20.0, 8) == 16  # 0.3 s of 20 frames/s is 6 frames: still 2 batches
    assert trial_frames(2000.0, 64) == 640  # 600 frames, in whole batches of 64
    assert trial_frames(2000.0, 64) * 1.0 / 2000.0 >= TRIAL_S
    assert trial_frames(0.0, 4) == 8


def test_choose_budget_runs_the_serial_plan_in_overlap_mode_on_more_than_one_core():
    base = StageCosts(2, sensor_1=1.0, sensor_all=0.55, model_1=0.1, model_all=0.06)  # the sensor dominates
    plan = choose_budget(base)
    assert (plan.mode, plan.sensor, plan.model) == ("overlap", 2, 2)
    assert plan.estimate["serial"] == pytest.approx(1 / (0.55 + 0.06)) and "overlap" not in plan.estimate
    assert choose_budget(dataclasses.replace(base, cores=1)).mode == "serial"


def test_auto_budget_keeps_the_mode_that_ran_faster_in_the_trial(monkeypatch):
    import numpy as np
    import torch

    import pipeline.stream.stages as stages

    frame = type("F", (), {"data": np.zeros((4, 4), np.uint16), "meta": type("M", (), {"frame_index": 0})()})()
    monkeypatch.setattr(stages, "measure_costs", lambda *args, **kw: StageCosts(2, 1.0, 0.55, 0.1, 0.06))
    rates = {"serial": 12.0, "overlap": 10.0}
    tried = []

    def trial(capture_one, classifier, budget, batch_size, frames, frame_hw):
        tried.append((budget.sensor, budget.model, budget.mode, batch_size, frames, frame_hw))
        return dict(rates)
    monkeypatch.setattr(stages, "trial_modes", trial)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        budget = auto_budget(lambda: frame, None, 8, cores=2)
        assert (budget.mode, budget.sensor, budget.model) == ("serial", 2, 2)
        assert "overlap ran slower than serial in the trial" in budget.note
        # the serial plan's threads, at whole batches of about TRIAL_S at the serial estimate (1.64 frames/s)
        assert tried == [(2, 2, "overlap", 8, 16, (4, 4))]
        report = budget.to_dict()
        assert report["trial_frames_per_s"] == rates and report["trial_frames"] == 16
        rates["overlap"] = 12.0  # a tie keeps overlap
        faster = auto_budget(lambda: frame, None, 8, cores=2)
        assert faster.mode == "overlap" and faster.note is None and faster.trial == rates
        monkeypatch.setattr(stages, "concurrent_numba_layer", lambda: False)  # workqueue: never at once
        monkeypatch.setattr(stages, "trial_modes", lambda *args: pytest.fail("overlap tried under workqueue"))
        workqueue = auto_budget(lambda: frame, None, 8, cores=2)
        assert workqueue.mode == "serial" and "workqueue" in workqueue.note and workqueue.trial is None
    finally:
        torch.set_num_threads(before)


def test_trial_modes_runs_the_real_stages_of_each_mode_in_turn():
    """Real threads through the engine: each run captures ``frames`` frames of the first scene and
    classifies them in model batches; serial mode captures and classifies in one thread, overlap in
    separate stage threads; the modes alternate (serial, overlap, overlap, serial); the process's torch
    thread count is restored, and no frame is ever faster than its capture allows."""
    import torch

    from pipeline.stream.stages import trial_modes

    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    def capture_one():
        time.sleep(0.005)
        with lock:
            log.append(("capture", threading.current_thread().name))
        return 0  # an int "frame", as FakeClassifier takes

    class Classifier(FakeClassifier):
        def prepare(self, frames):
            with lock:
                log.append(("classify", threading.current_thread().name))
            return super().prepare(frames)

    classifier = Classifier()
    before = torch.get_num_threads()
    rates = trial_modes(capture_one, classifier, ThreadBudget(1, 1, "overlap", 2), 4, 8, (4, 4))
    assert torch.get_num_threads() == before
    assert set(rates) == {"serial", "overlap"} and all(0 < r <= 1 / 0.005 for r in rates.values())
    assert len(classifier.batches) == 4 * 2 and all(len(b) == 4 for b in classifier.batches)
    assert sum(1 for kind, _ in log if kind == "capture") == 4 * 8
    # each run: one thread name for the captures and one for the classification; serial: the same one
    runs, captures = [], 0
    for kind, name in log:  # the runs follow one another: run k holds captures 8k .. 8k + 7
        if kind == "capture":
            if captures % 8 == 0:
                runs.append({"capture": set(), "classify": set()})
            captures += 1
        runs[-1][kind].add(name)
    modes = ["serial" if r["capture"] == r["classify"] else "overlap" for r in runs]
    assert modes == ["serial", "overlap", "overlap", "serial"]


def test_trial_modes_raises_a_stages_own_error():
    from pipeline.stream.stages import trial_modes

    def broken():
        raise RuntimeError("sensor unplugged")

    for budget in (ThreadBudget(1, 1, "overlap", 2), ThreadBudget(1, 1, "overlap", 2, sensor_frames=2)):
        with pytest.raises(RuntimeError, match="sensor unplugged"):  # through the frame workers: not PartialResult
            trial_modes(broken, FakeClassifier(), budget, 4, 8, (4, 4))


def test_main_thread_serial_runs_numba_and_torch_on_one_thread_and_restores_them():
    """The main thread's set-up work (building the classifier, auto's first capture) runs on one numba and one
    torch thread, so the main thread, which never exits, keeps no OpenMP team; both counts come back after,
    also after an error."""
    import numba
    import torch

    from pipeline.stream.budget import main_thread_serial

    before = (numba.get_num_threads(), torch.get_num_threads())
    with main_thread_serial():
        assert (numba.get_num_threads(), torch.get_num_threads()) == (1, 1)
    assert (numba.get_num_threads(), torch.get_num_threads()) == before
    with pytest.raises(RuntimeError, match="boom"), main_thread_serial():
        raise RuntimeError("boom")
    assert (numba.get_num_threads(), torch.get_num_threads()) == before


def test_auto_budget_captures_its_first_scene_on_one_thread():
    import numba
    import torch

    seen = []

    def first_capture():
        seen.append((numba.get_num_threads(), torch.get_num_threads()))
        return None  # nothing to measure: serial

    assert auto_budget(first_capture, None, 8, cores=2).mode == "serial"
    assert seen == [(1, 1)]
