"""The readout handoff: the sensor stage's per-frame orders reach the classifier, which gives the same
predictions as when it builds them itself, and never uses an order of another key or frame."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import models.tables
from models.plain import build_model
from models.tables import plane_tables_torch
from pipeline.resources import COLOUR_PROFILE, resolve
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.handoff import ReadoutHandoff, handoff_capacity, order_nbytes
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.readout import readout_permutation, readout_subkey
from sensor.readout_tables import grid_shape, plane_count, stacked_tables
from sensor.sensor import Sensor

SESSION = Key(bytes(range(32))).for_session(bytes(16))
OTHER = Key(bytes(range(1, 33))).for_session(bytes(16))


def test_handoff_takes_once_evicts_the_oldest_and_counts():
    h = ReadoutHandoff(2)
    orders = [readout_permutation(SESSION, "pixel", 4, 6, n) for n in range(3)]
    h.put(0, orders[0])
    h.put(1, orders[1])
    assert h.take(1) is orders[1] and h.take(1) is None
    h.put(1, orders[1])
    h.put(2, orders[2])  # three kept at most two: frame 0, the oldest, goes
    assert len(h) == 2 and h.take(0) is None
    assert h.take(2) is orders[2] and h.take(1) is orders[1] and len(h) == 0
    assert h.to_dict() == {"capacity": 2, "taken": 3, "built_again": 2, "evicted": 1}


def test_handoff_refuses_bad_capacity_and_pickling():
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="capacity"):
            ReadoutHandoff(bad)
    with pytest.raises(TypeError, match="key material"):
        pickle.dumps(ReadoutHandoff(1))
    assert handoff_capacity(8, 1, 8) == 2 * 8 * 1 + 3 * 8
    # 1920x1080 pixel: three uint16 tables of 1080x1920; the byte cap binds before the queues do, but
    # never below one batch
    one = order_nbytes("pixel", 1080, 1920)
    assert one == 3 * 1080 * 1920 * 2 and order_nbytes("plane", 1080, 1920) == 4 * 3 * 540 * 960 * 2
    assert handoff_capacity(8, 64, 8, one) == (1 << 30) // one == 86
    assert handoff_capacity(8, 1, 8, one) == 40 and handoff_capacity(8, 1, 8, one, max_bytes=one) == 8


def test_capture_hands_over_the_order_it_read_out_in():
    cfg = SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
    sensor = Sensor(cfg, seed=1)
    photons = np.full((16, 24), 500.0)
    seen = []
    for scheme in ("pixel", "quad", "plane"):
        frame = sensor.capture(photons, SESSION, 5, scheme=scheme, rotation=True,
                               on_readout=lambda n, order: seen.append((n, order)))
        n, order = seen.pop()
        assert n == 5 and order.scheme == scheme and order.subkey == readout_subkey(SESSION, scheme, 5)
        assert np.array_equal(order.forward(sensor.expose(photons, 5)), frame.data)
    sensor.capture(photons, SESSION, 6, scheme="pixel", rotation=False, on_readout=lambda *a: seen.append(a))
    assert seen == [], "a static readout is not handed over (the classifier holds it already)"


@pytest.mark.parametrize("scheme", ["pixel", "quad", "plane"])
def test_plane_tables_from_built_pass_tables_equal_the_built_ones(scheme):
    h, w = 16, 24
    subkeys = [readout_subkey(SESSION, scheme, n) for n in (3, 4, 9)]
    rows, cols = grid_shape(scheme, h, w)
    built = [stacked_tables(subkeys[0], rows, cols, plane_count(scheme)), None,
             readout_permutation(SESSION, scheme, h, w, 9).kernel_tables()]
    want = plane_tables_torch(scheme, h, w, subkeys)
    assert torch.equal(plane_tables_torch(scheme, h, w, subkeys, built=built), want)
    with pytest.raises(ValueError, match="2 built tables for 3 subkeys"):
        plane_tables_torch(scheme, h, w, subkeys, built=built[:2])


def classifier_pair(scheme: str, h: int, w: int, readouts: ReadoutHandoff) -> tuple[KeyedClassifier, KeyedClassifier]:
    cfg = SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
    fmt = FrameFormat.from_config(cfg, scheme=scheme, rotation=True, height=h, width=w)
    torch.manual_seed(0)
    model = build_model("compact", 1 if scheme == "pixel" else 4, 10)
    return (KeyedClassifier(model, SESSION, fmt, device="cpu"),
            KeyedClassifier(model, SESSION, fmt, device="cpu", readouts=readouts))


@pytest.mark.parametrize("scheme", ["pixel", "quad", "plane"])
def test_classifier_with_handed_orders_equals_one_that_builds_them(scheme, monkeypatch):
    h, w = 16, 24
    sensor = Sensor(SensorConfig.from_yaml(resolve(COLOUR_PROFILE)), seed=2)
    readouts = ReadoutHandoff(8)
    own, handed = classifier_pair(scheme, h, w, readouts)
    rng = np.random.default_rng(3)
    frames = [sensor.capture(rng.uniform(0, 4000, (h, w)), SESSION, n, scheme=scheme, rotation=True,
                             on_readout=readouts.put) for n in (10, 11, 12, 13)]
    want = own.logits(frames)
    calls = []
    build = models.tables.stacked_tables  # what the classifier runs to build an order itself
    monkeypatch.setattr(models.tables, "stacked_tables", lambda *a: calls.append(a) or build(*a))
    got = handed.logits(frames)
    assert torch.equal(got, want), "handed orders must give the classifier's own logits bit for bit"
    assert calls == [] and len(readouts) == 0 and readouts.to_dict()["taken"] == 4


def test_classifier_ignores_orders_of_another_key_or_frame(monkeypatch):
    """Orders under another key, or another frame's order left under this frame's index, are built again:
    the logits do not change."""
    h, w = 16, 24
    sensor = Sensor(SensorConfig.from_yaml(resolve(COLOUR_PROFILE)), seed=2)
    readouts = ReadoutHandoff(8)
    own, handed = classifier_pair("pixel", h, w, readouts)
    frames = [sensor.capture(np.full((h, w), 900.0 + n), SESSION, n, scheme="pixel", rotation=True)
              for n in (20, 21, 22)]
    readouts.put(20, readout_permutation(OTHER, "pixel", h, w, 20))  # another key
    readouts.put(21, readout_permutation(SESSION, "pixel", h, w, 30))  # another frame
    readouts.put(22, readout_permutation(SESSION, "quad", h, w, 22))  # another scheme
    want = own.logits(frames)
    calls = []
    build = models.tables.stacked_tables  # what the classifier runs to build an order itself
    monkeypatch.setattr(models.tables, "stacked_tables", lambda *a: calls.append(a) or build(*a))
    assert torch.equal(handed.logits(frames), want)
    assert len(calls) == 3 and len(readouts) == 0
