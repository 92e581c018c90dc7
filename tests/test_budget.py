"""The pipeline's thread budget (config, choice from measured costs) and the engine's micro-batch and
turn-taking stages."""

from __future__ import annotations

import threading

import pytest

from pipeline.stream.budget import StageCosts, ThreadBudget, amdahl, choose_budget, parse_threads
from pipeline.stream.engine import Batch, Map, Pipeline, chunks, each
from pipeline.stream.run import RunConfig
from pipeline.stream.stages import micro_batch_size
from sensor.errors import ConfigError


def test_threads_config_auto_or_a_budget_that_adds_up_to_the_machine():
    assert parse_threads("auto", cores=2) is None
    budget = parse_threads({"sensor": 1, "model": 1}, cores=2)
    assert (budget.mode, budget.sensor, budget.model, budget.source) == ("split", 1, 1, "config")
    turns = parse_threads({"sensor": 2, "model": 2, "mode": "turns"}, cores=2)
    assert (turns.mode, turns.sensor, turns.model) == ("turns", 2, 2)
    bad = [({"sensor": 2, "model": 1}, "threads"), ({"sensor": 0, "model": 1}, "threads.sensor"),
           ({"sensor": 1, "model": 3, "mode": "turns"}, "threads.model"),
           ({"sensor": 1, "model": True}, "threads.model"), ({"sensor": 1}, "threads.model"),
           ({"sensor": 1, "model": 1, "numba": 2}, "threads.numba"),
           ({"sensor": 1, "model": 1, "mode": "fast"}, "threads.mode"), ("fast", "threads"), (4, "threads")]
    for value, field in bad:
        with pytest.raises(ConfigError) as err:
            parse_threads(value, cores=2)
        assert err.value.field == field, value


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
    balanced = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.6, model_1=1.0, model_all=0.6))
    assert (balanced.mode, balanced.sensor, balanced.model, balanced.source) == ("split", 1, 1, "auto")
    assert balanced.estimate["split 1+1"] == pytest.approx(1.0) and balanced.estimate["turns"] == pytest.approx(1 / 1.2)
    dominant = choose_budget(StageCosts(2, sensor_1=1.0, sensor_all=0.55, model_1=0.1, model_all=0.06))
    assert (dominant.mode, dominant.sensor, dominant.model) == ("turns", 2, 2)
    small_frames = choose_budget(StageCosts(2, sensor_1=0.3, sensor_all=0.5, model_1=10.0, model_all=5.0))
    assert (small_frames.mode, small_frames.sensor, small_frames.model) == ("turns", 1, 2)
    four = choose_budget(StageCosts(4, sensor_1=3.0, sensor_all=1.0, model_1=1.0, model_all=0.4))
    assert (four.mode, four.sensor, four.model) == ("split", 3, 1)
    one = choose_budget(StageCosts(1, 1.0, 1.0, 1.0, 1.0))
    assert (one.mode, one.sensor, one.model) == ("turns", 1, 1)
    report = balanced.to_dict()
    assert report["mode"] == "split" and report["measured"]["sensor_s_per_frame_1_thread"] == 1.0
    assert set(report["estimated_frames_per_s"]) == {"turns", "split 1+1"}


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
