"""``make demo``: the whole product on built-in defaults, on any machine.

1. The sensor alone: a colour chart through the 12-bit RGGB profile -> ``chart.dng`` + preview.
2. The shipped Fashion-MNIST sample through the mono sensor with a rotating keyed readout, recorded
   to ``frames.mcap``, classified by the keyed twin of the shipped checkpoint -> ``predictions.jsonl``.
3. The recording replayed through a freshly built keyed classifier -> ``replay.jsonl`` (must be
   identical).
4. The same protected frames read by a keyed model built from a wrong key (chance expected).
5. ``show.png``: scene, plain raw, protected frame, plain and keyed feature maps.

With ``frame_size`` (``privcam demo --frame-size 280 280``) the 28x28 scenes are exposed at that sensor
size and every model step reads the frames through the front end (keyed on protected frames, plain in
``show.png``'s plain map) at the checkpoint's 28x28 input.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import load_checkpoint, model_input_hw
from sensor.config import SensorConfig
from sensor.keys import Key, load_key_file, write_key_file
from sensor.rawio import RawMeta, write_raw
from sensor.scene import colour_chart, raw_to_srgb, render_photons
from sensor.sensor import Sensor

from ..resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from ..stream.classifier import FrameFormat, KeyedClassifier
from ..stream.datasets import load_dataset
from ..stream.inputs import input_shape
from ..stream.run import RunConfig, replay_recording, run_pipeline
from ..stream.sources import fit_scene, frame_hw
from .images import write_png
from .show import show_panels


def wrong_key_accuracy(frames: list, labels: np.ndarray, model_path: Path, fmt: FrameFormat,
                       model_hw: tuple[int, int] | None = None) -> float:
    """Accuracy of a keyed model built from a fresh, wrong key on the same protected frames (through the
    keyed front end to ``model_hw`` when given)."""
    model, _ = load_checkpoint(model_path)
    attacker = KeyedClassifier(model, Key.generate(), fmt, check_fingerprint=False, model_hw=model_hw)
    preds = [row["pred"] for i in range(0, len(frames), 100) for row in attacker(frames[i:i + 100])]
    return float((np.array(preds) == labels).mean())


def predictions_without_labels(path: Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl predictions file without their labels (a recording holds no labels by default,
    so a replay's rows carry label null where the live run's carry the dataset's labels)."""
    return [{k: v for k, v in json.loads(line).items() if k != "label"} for line in path.read_text().splitlines()]


def run_demo(out: Path, limit: int = 1000, progress: bool = True,
             frame_size: tuple[int, int] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / "camera.key"
    if not key_path.exists():
        write_key_file(key_path)
    key = load_key_file(key_path)

    colour = SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
    chart = Sensor(colour, seed=0).expose(render_photons(colour_chart(), colour), frame_index=0)
    write_raw(out / "chart.dng", chart, RawMeta(width=chart.shape[1], height=chart.shape[0],
                                                bit_depth=colour.bit_depth, cfa=colour.cfa,
                                                black_level=colour.black_level_dn, white_level=colour.max_dn))
    write_png(out / "chart_preview.png", raw_to_srgb(chart, colour))

    cfg = RunConfig.from_dict({
        "source": {"dataset": "fashion-mnist-sample", "limit": limit,
                   "frame_size": None if frame_size is None else list(frame_size)},
        "sensor": {"profile": str(resolve(MONO_PROFILE)), "seed": 0},
        "key": {"file": str(key_path), "scheme": "pixel", "rotation": True},
        "model": {"checkpoint": str(resolve(DEFAULT_CHECKPOINT)), "mode": "fused"},
        "output": {"predictions": str(out / "predictions.jsonl"), "record": str(out / "frames.mcap")}}, "demo")
    live = run_pipeline(cfg, progress=progress)
    replay_cfg = replace(cfg, output=replace(cfg.output, predictions=str(out / "replay.jsonl"), record=None))
    replayed = replay_recording(str(out / "frames.mcap"), replay_cfg, progress=progress)
    identical = predictions_without_labels(out / "predictions.jsonl") == predictions_without_labels(
        out / "replay.jsonl")

    mono = SensorConfig.from_yaml(resolve(MONO_PROFILE))
    sample = load_dataset("fashion-mnist-sample").subset(limit)
    sensor = Sensor(mono, seed=0)
    frames = [sensor.capture(render_photons(fit_scene(im, frame_size), mono), key, i, scheme="pixel")
              for i, im in enumerate(sample.images)]
    h, w = frame_hw(sample.images, frame_size)
    fmt = FrameFormat.from_config(mono, height=h, width=w)
    model, manifest = load_checkpoint(resolve(DEFAULT_CHECKPOINT))
    model_hw = model_input_hw(model, manifest, input_shape("pixel", h, w), f"the demo's {h}x{w} frames",
                              DEFAULT_CHECKPOINT)
    wrong_acc = wrong_key_accuracy(frames, sample.labels, resolve(DEFAULT_CHECKPOINT), fmt, model_hw)

    figure, _ = show_panels(fit_scene(sample.images[0], frame_size), mono, key, "pixel", model, model_hw=model_hw)
    write_png(out / "show.png", figure)
    return {"key_fingerprint": key.fingerprint, "frames": live["frames"], "keyed_accuracy": live["accuracy"],
            "checkpoint_plain_accuracy": live["checkpoint_plain_accuracy"], "wrong_key_accuracy": wrong_acc,
            "frames_per_s": live["frames_per_s"], "replay_frames": replayed["frames"],
            "replay_identical_predictions": identical, "error": live["error"] or replayed.get("error"),
            "frame_size": [h, w], "model_input": list(model_hw or (h, w)),
            "out": str(out), "files": sorted(p.name for p in out.iterdir())}
