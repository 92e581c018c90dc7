"""``privcam eval accuracy``: the reference paper's table on real data, for a static key and for
per-frame rotation.

Rows (each with accuracy, test images, and the training budget for the attacks):

1. plain model on plain frames;
2. plain model on protected frames (no key);
3. fine-tune attack: the attacker has the plain weights and labelled protected frames, not the
   key, and fine-tunes the plain model on them;
4. permutation-blind attack: an MLP trained from scratch on labelled protected frames (a fixed
   permutation hides nothing from a learner without spatial priors);
5. keyed model on protected frames;
6. keyed model built from a wrong key;
7. permutation-invariant attack: an MLP on the scheme's invariant features
   (:func:`pipeline.lab.attacks.invariant_features`: sorted pixel values for pixel, the sorted bag
   of 2x2 cells for quad, per-plane sorted values for plane), which every readout permutation of
   the scheme preserves, trained to convergence (early stopping on a validation split): what no
   readout key, static or rotating, can hide. Both key modes give identical features (checked),
   so it is trained once and the rotation row reports the same result.

Frames are the sensor's real output (noise included); attack training frames come from the train
split with frame indices disjoint from the test frames; both key modes get the same attack budget.

Sensor and model resolution (``frame_size``): the scenes are exposed at the sensor's (H, W) and, when
the frames' network input is larger than the checkpoint's ``input_shape``, the plain rows and the
attacks see the plain front end's output (``network_input(..., size=model_hw)``: INTER_AREA of the
plain or the protected frames) and rows 5 and 6 the keyed front end (``KeyedClassifier(model_hw=...)``).
Every frame is held in memory at the sensor's size: keep the counts small for large frames.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import load_checkpoint, model_input_hw
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.sensor import Sensor

from ..stream.classifier import KeyedClassifier
from ..stream.datasets import Dataset
from ..stream.inputs import input_shape, network_input
from ..stream.sources import expose_scenes, frame_hw
from .attacks import (
    AttackBudget,
    ConvergenceBudget,
    accuracy,
    invariant_attack,
    invariant_features,
    mlp_attack,
    train_classifier,
)

TEST_FRAME_BASE = 0
ATTACK_FRAME_BASE = 10_000_000  # attacker's frames never share an index (noise, rotation) with test frames


def capture_frames(images: np.ndarray, sensor: Sensor, key: Key, scheme: str, rotation: bool,
                   first_index: int, progress: bool = False, desc: str = "frames",
                   size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scenes -> (plain frames, protected frames), each (B, H, W) uint16, frame n = first_index + i;
    ``size``: the sensor's (H, W) (scenes resampled to it), default the scenes' size."""
    plain = expose_scenes(images, sensor, first_index, progress, desc, size)
    protected = np.empty_like(plain)
    h, w = plain.shape[1:]
    static = None if rotation else sensor.readout(key, scheme, h, w)
    for i in range(len(plain)):
        order = static if static is not None else sensor.readout(key, scheme, h, w, first_index + i)
        protected[i] = order.forward(plain[i])
    return plain, protected


def accuracy_table(checkpoint: str, test: Dataset, train: Dataset, sensor_cfg: SensorConfig, key: Key,
                   scheme: str, budget: AttackBudget, rotations: tuple[bool, ...] = (False, True),
                   progress: bool = True, sensor_seed: int = 0,
                   frame_size: tuple[int, int] | None = None,
                   convergence: ConvergenceBudget | None = None) -> dict[str, Any]:
    """All seven rows for each key mode, on frames of ``frame_size`` (default: the scenes' size) read at
    the checkpoint's input size through the front end when larger. Returns a JSON-ready dict.

    ``convergence``: row 7's training (default: early stopping, on ``budget.train_images`` frames).
    """
    convergence = convergence or ConvergenceBudget(train_images=budget.train_images, seed=budget.seed)
    model, manifest = load_checkpoint(checkpoint)
    num_classes = model.fc.out_features if hasattr(model, "fc") else int(test.labels.max()) + 1
    sensor = Sensor(sensor_cfg, seed=sensor_seed)
    h, w = frame_hw(test.images, frame_size)
    model_hw = model_input_hw(model, manifest, input_shape(scheme, h, w),
                              f"the {scheme} scheme on {h}x{w} {sensor_cfg.cfa} frames", checkpoint)
    attack_set = train.subset(budget.train_images)
    chance = 1.0 / num_classes
    modes = []
    invariant: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None  # features and result of row 7
    for rotation in rotations:
        mode_name = "rotation" if rotation else "static"
        t0 = time.perf_counter()
        plain, prot = capture_frames(test.images, sensor, key, scheme, rotation, TEST_FRAME_BASE, progress,
                                     f"{mode_name}: test frames", frame_size)
        _, prot_attack = capture_frames(attack_set.images, sensor, key, scheme, rotation, ATTACK_FRAME_BASE,
                                        progress, f"{mode_name}: attacker frames", frame_size)
        in_fmt = FrameFormat.from_config(sensor_cfg, scheme=scheme)
        x_plain, x_prot, x_attack = (network_input(f, in_fmt, size=model_hw) for f in (plain, prot, prot_attack))
        rows: list[dict[str, Any]] = []
        row = _row_adder(rows, len(test))
        plain_model, _ = load_checkpoint(checkpoint)
        plain_preds = _predictions(plain_model, x_plain)
        row(1, "plain model, plain frames", float((plain_preds == test.labels).mean()))
        row(2, "plain model, protected frames (no key)", accuracy(plain_model, x_prot, test.labels))

        attacker, _ = load_checkpoint(checkpoint)
        secs = train_classifier(attacker, x_attack, attack_set.labels, budget.epochs, budget.finetune_lr,
                                budget.batch_size, budget.seed, progress=progress, desc=f"{mode_name}: fine-tune")
        row(3, "fine-tune attack: plain weights + labelled protected frames, no key",
            accuracy(attacker, x_prot, test.labels), attack_budget={**budget.to_dict(), "wall_s": round(secs, 1)})

        blind = mlp_attack(x_attack, attack_set.labels, x_prot, test.labels, num_classes, budget, progress,
                           f"{mode_name}: MLP")
        row(4, "permutation-blind attack: MLP trained on labelled protected frames", blind["accuracy"],
            attack_budget={**budget.to_dict(), "wall_s": blind["wall_s"]})

        fmt = FrameFormat.from_config(sensor_cfg, scheme=scheme, rotation=rotation, height=h, width=w)
        keyed_preds = _keyed_predictions(plain_model, key, fmt, prot, model_hw=model_hw)
        row(5, "keyed model, protected frames", float((keyed_preds == test.labels).mean()),
            agrees_with_row1_on=int((keyed_preds == plain_preds).sum()))
        wrong = Key.generate()
        wrong_preds = _keyed_predictions(load_checkpoint(checkpoint)[0], wrong, fmt, prot, model_hw=model_hw)
        row(6, "keyed model built with a wrong key", float((wrong_preds == test.labels).mean()))
        feats = (invariant_features(prot_attack, scheme), invariant_features(prot, scheme))
        reused = invariant is not None and all(np.array_equal(a, b) for a, b in zip(feats, invariant[:2], strict=True))
        if not reused:
            result = invariant_attack(prot_attack, attack_set.labels, prot, test.labels, scheme, num_classes,
                                      convergence, max_dn=in_fmt.max_dn, black_level=in_fmt.black_level,
                                      progress=progress)
            invariant = (*feats, result)
        row(7, f"permutation-invariant attack: MLP on {invariant[2]['features']}, trained to convergence "
            "(no readout key hides these)", invariant[2]["accuracy"], attack_budget=invariant[2]["budget"],
            identical_features_to_previous_mode=reused)
        modes.append({"key_mode": mode_name, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)})
    return {"dataset": test.name, "test_images": len(test), "chance": chance, "scheme": scheme,
            "checkpoint": checkpoint, "checkpoint_sha256": manifest.get("sha256"), "sensor": sensor_cfg.name,
            "key_fingerprint": key.fingerprint, "frame_size": [h, w],
            "model_input": list(model_hw or input_shape(scheme, h, w)[1:]), **front_end_note(model_hw), "modes": modes}


def front_end_note(model_hw: tuple[int, int] | None) -> dict[str, str]:
    """What the rows read when the frames are larger than the model input (empty otherwise)."""
    if model_hw is None:
        return {}
    return {"front_end": f"frames resampled to {model_hw[0]}x{model_hw[1]} (INTER_AREA): rows 1-4 and 7 through "
                         "the plain front end (rows 2-4 and 7 on the protected frames), rows 5-6 through the "
                         "keyed front end"}


def _row_adder(rows: list[dict[str, Any]], n_test: int):
    def add(number: int, name: str, acc: float, **extra: Any) -> None:
        rows.append({"row": number, "name": name, "accuracy": acc, "test_images": n_test, **extra})
    return add


@torch.inference_mode()
def _predictions(model: nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)]).numpy()


def _keyed_predictions(model: nn.Module, key: Key, fmt: FrameFormat, frames: np.ndarray,
                       batch: int = 500, model_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The keyed twin (the one keyed inference path, :meth:`KeyedClassifier.logits_array`) on protected
    frames (B, H, W); with rotation frame i's table comes from (key, TEST_FRAME_BASE + i). ``model_hw``:
    the model's input when smaller than the frames' (the keyed front end)."""
    clf = KeyedClassifier(model, key, fmt, device="cpu", check_fingerprint=False, model_hw=model_hw)
    idx = TEST_FRAME_BASE + np.arange(len(frames))
    out = [clf.logits_array(frames[s:s + batch], idx[s:s + batch]).argmax(1) for s in range(0, len(frames), batch)]
    return torch.cat(out).cpu().numpy()
