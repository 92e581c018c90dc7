"""The model benchmark runs every row on small settings and reports what the issue's targets need."""

from __future__ import annotations

import json

import pytest
import torch

from models.plain import build_model
from pipeline.bench import model as bench
from sensor.keys import Key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = Key(bytes(range(32)))
CPU = torch.device("cpu")


def test_model_row_reports_every_mode():
    row = bench._model_row("preresnet20", (3, 16, 16), 2, 1, KEY, CPU)
    for mode in ("plain", "fused", "fast", "rotating"):
        assert row[f"{mode}_images_per_s"] > 0 and row[f"{mode}_peak_bytes"] > 0
        assert row[f"{mode}_time_over_plain"] > 0
    assert row["plain_time_over_plain"] == 1.0 and row["fused_build_s"] > 0
    assert row["fused_peak_over_plain"] <= 2  # the memory target holds at any batch


def test_frontend_row_and_targets(tmp_path):
    model = build_model("compact", 1, 10).eval()
    row = bench._frontend_row(60, 90, model, 1, KEY, CPU)
    assert row["kind"] == "area" and row["frame"] == [60, 90]
    for case in ("plain", "keyed_static", "keyed_per_frame", "frontend_and_compact_rotating", "with_readout_table"):
        assert row[f"{case}_ms"] > 0
    models = [bench._model_row("vgg16_bn", (3, 32, 32), 1, 1, KEY, CPU)]
    targets = bench.targets({"models": models, "frontend": [row]})
    whats = [t["what"] for t in targets]
    assert any("vgg16_bn" in w and "fused time" in w for w in whats)
    assert any("all tables built" in w for w in whats)
    assert all(isinstance(t["met"], bool) for t in targets)
    json.dumps(targets)


def test_peak_memory_sees_a_temporary():
    def fn():
        a = torch.empty(1 << 20)  # 4 MiB, freed before the next allocation
        del a
        return torch.empty(1 << 18)

    peak = bench.peak_memory(fn)
    assert (4 << 20) <= peak < (6 << 20)
