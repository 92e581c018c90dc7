"""End-to-end pipeline throughput: threaded stages with bounded queues vs the same work serially.

Run: ``python -m pipeline.bench.pipeline --json out.json [--frames 2000 --batch 64]``

Scenes are random 28x28 (mono10 sensor, pixel scheme) or 64x96 (default RGGB sensor, quad scheme)
images held in memory; the model is a randomly initialised compact net (throughput does not
depend on the weights). The baseline runs exactly the same functions in one thread, one after
another; the ratio is threaded frames/s over serial frames/s, measured in the same run (rounds
interleaved, best of each).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models.plain import build_model
from pipeline.bench.common import write_json
from pipeline.resources import resolve
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.engine import Batch, Map, Pipeline
from pipeline.stream.inputs import input_shape
from pipeline.stream.run import capture_stage
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.sensor import Sensor

CASES = [("mono10 28x28 pixel", "configs/sensors/mono10.yaml", (28, 28), "pixel"),
         ("rggb12 64x96 quad", "configs/sensors/default.yaml", (64, 96), "quad")]


def run_case(profile: str, hw: tuple[int, int], scheme: str, frames: int, batch: int, rotation: bool,
             rounds: int = 3) -> dict:
    key = Key(bytes(range(32)))  # fixed public test key: benchmarks protect nothing
    cfg = SensorConfig.from_yaml(resolve(profile))  # the shipped profile outside a checkout
    rng = np.random.default_rng(0)
    scenes = rng.integers(0, 256, (frames, *hw), dtype=np.uint8)
    items = [(i, scenes[i], None) for i in range(frames)]
    torch.manual_seed(0)
    model = build_model("compact", input_shape(scheme, *hw)[0], 10)
    fmt = FrameFormat.from_config(cfg, scheme=scheme, rotation=rotation, height=hw[0], width=hw[1])
    classifier = KeyedClassifier(model, key, fmt, device="cpu")
    capture = capture_stage(Sensor(cfg, seed=0), key, scheme, rotation)
    for i in range(min(batch, frames)):  # warm-up: numba compilation, torch kernels
        classifier([capture(items[i])])

    serial_times, pipeline_times = [], []
    for _ in range(rounds):  # interleaved, best of each: robust to a busy shared machine
        t0 = time.perf_counter()
        for start in range(0, frames, batch):
            classifier([capture(item) for item in items[start:start + batch]])
        serial_times.append(time.perf_counter() - t0)
        done: list = []
        result = Pipeline(iter(items), [Map("sensor", capture), Batch("batcher", batch, 0.5),
                                        Map("model", classifier)], done.extend, queue_size=8).run()
        assert result.error is None and len(done) == frames
        pipeline_times.append(result.wall_s)
    serial_s, pipeline_s = min(serial_times), min(pipeline_times)
    return {"frames": frames, "batch": batch, "rotation": rotation, "rounds": rounds,
            "serial_frames_per_s": frames / serial_s, "pipeline_frames_per_s": frames / pipeline_s,
            "speedup_over_serial": serial_s / pipeline_s, "stages_last_round": [s.to_dict() for s in result.stages]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    rows = []
    for name, profile, hw, scheme in CASES:
        for rotation in (False, True):
            row = {"case": name, **run_case(profile, hw, scheme, args.frames, args.batch, rotation)}
            rows.append(row)
            print(f"{name:<22} rotation={str(rotation):<5} serial {row['serial_frames_per_s']:8.1f} f/s  "
                  f"pipeline {row['pipeline_frames_per_s']:8.1f} f/s  x{row['speedup_over_serial']:.2f}")
    result = {"benchmark": "pipeline", "torch_threads": torch.get_num_threads(), "cases": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
