"""Train a plain classifier on what the sensor emits before the readout permutation.

Scenes are augmented (random shift by padding-and-crop, horizontal flip) *before* the sensor, then
rendered to photons and exposed with the sensor's noise; the network sees
:func:`pipeline.stream.inputs.network_input` of the plain frames. The keyed twin of the result
classifies protected frames without retraining.

Sensor and model resolution: ``frame_size`` [H, W] exposes every scene at that sensor resolution
(:func:`pipeline.stream.sources.fit_scene`) and ``input_size`` [h, w] is the model's input (default: the
network input of the scenes' own size); when the frames' network input is larger than the model's, the
plain front end (``network_input(..., size=(h, w))``, INTER_AREA / binning) resamples it, the same front
end whose keyed twin ``privcam run`` applies to protected frames. The manifest's ``input_shape`` is the
model's input.

Resumable: the full training state (model, optimiser, scheduler, epoch, best accuracy) is saved
atomically after every epoch to ``<out>.state``; running again with the same config continues. The
state is read back with ``weights_only=True`` and checked (:func:`models.checkpoint.load_training_state`).
An existing checkpoint at ``out`` is never replaced unless asked (``overwrite=True``, ``--force``), and a
run whose loss or weights stop being finite writes no checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import (
    CheckpointError,
    load_state_into,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from models.plain import MODEL_NAMES, build_model
from sensor.atomic import check_output_path
from sensor.config import SensorConfig
from sensor.configio import check_range, check_size, dataclass_from_dict
from sensor.errors import ConfigError
from sensor.frame import FrameFormat
from sensor.readout import SCHEMES
from sensor.sensor import Sensor

from ..resources import MONO_PROFILE, resolve
from ..stream.datasets import Dataset, load_dataset
from ..stream.inputs import input_shape, network_input
from ..stream.sources import expose_scenes


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    data: str | None = None
    model: str = "compact"
    scheme: str = "pixel"
    sensor: str = MONO_PROFILE
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    out: str = "compact_fashion_mnist_pixel.pt"
    frame_size: tuple[int, int] | None = None  # [H, W] sensor frames (scenes resampled); None: the scenes' size
    input_size: tuple[int, int] | None = None  # [h, w] model input; None: the network input of the scenes' size

    def __post_init__(self) -> None:
        src = "TrainConfig"
        if self.scheme not in SCHEMES:
            raise ConfigError(src, "scheme", "pixel, quad or plane", self.scheme)
        if self.model not in MODEL_NAMES:
            raise ConfigError(src, "model", f"one of {', '.join(MODEL_NAMES)}", self.model)
        check_range(src, "epochs", self.epochs, 1, 10_000)
        check_range(src, "batch_size", self.batch_size, 1, 65_536)
        check_range(src, "lr", self.lr, 0, 10, low_open=True)
        check_range(src, "momentum", self.momentum, 0, 0.999)
        check_range(src, "weight_decay", self.weight_decay, 0, 1)
        check_range(src, "seed", self.seed, 0, 2**32 - 1)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                check_range(src, name, getattr(self, name), 1)
        for name in ("frame_size", "input_size"):
            object.__setattr__(self, name, check_size(src, name, getattr(self, name)))
        if not str(self.out).strip() or Path(self.out).suffix != ".pt":
            raise ConfigError(src, "out", "a checkpoint path ending in .pt (its manifest is written beside it "
                              "as .json, the resumable state as .state)", self.out)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "TrainConfig") -> TrainConfig:
        return dataclass_from_dict(cls, data, source)


def _check_resumed(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                   epochs: int) -> None:
    """What load_state_dict does not check: finite weights, momentum buffers shaped like their
    parameters, an epoch within the run."""
    hint = "(delete it to start the training over)"
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(f"{path}: model: expected finite weights {hint}")
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                raise CheckpointError(f"{path}: optimizer: momentum buffers do not match the model {hint}")
    if not 0 <= state["epoch"] <= epochs:
        raise CheckpointError(f"{path}: epoch: expected 0..{epochs}, got {state['epoch']} {hint}")


def augment_scenes(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random shift (pad by reflection, crop back) and horizontal flip. (B, H, W[, 3]) uint8."""
    b, h, w = images.shape[:3]
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, widths, mode="reflect")
    dy, dx = rng.integers(0, 2 * pad + 1, b), rng.integers(0, 2 * pad + 1, b)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    flip = rng.random(b) < 0.5
    out[flip] = out[flip][:, :, ::-1]
    return out


def sensor_inputs(images: np.ndarray, sensor: Sensor, scheme: str, first_frame_index: int,
                  frame_size: tuple[int, int] | None = None,
                  model_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Scenes (B, H, W[, 3]) -> plain frames (at ``frame_size``, default (H, W)) -> network input tensor
    (B, C, h, w) float32, resampled by the plain front end to ``model_hw`` when given."""
    frames = expose_scenes(images, sensor, first_frame_index, size=frame_size)
    return network_input(frames, FrameFormat.from_config(sensor.config, scheme=scheme), size=model_hw)


def model_input(cfg: TrainConfig, scene_hw: tuple[int, int]) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(network input (C, H, W) of the sensor frames, model input (h, w)) for scenes of ``scene_hw``.

    ConfigError when the model input is larger than the frames' network input (the front end only downscales).
    """
    frame = cfg.frame_size or (int(scene_hw[0]), int(scene_hw[1]))
    c, fh, fw = input_shape(cfg.scheme, *frame)
    mh, mw = cfg.input_size or input_shape(cfg.scheme, *scene_hw)[1:]
    if mh > fh or mw > fw:
        field, got = ("input_size", cfg.input_size) if cfg.input_size else ("frame_size", cfg.frame_size)
        raise ConfigError("TrainConfig", field, f"a model input ({mh}x{mw}) no larger than the network input of "
                          f"the {cfg.scheme} scheme on {frame[0]}x{frame[1]} frames ({fh}x{fw}; the front end only "
                          f"downscales)", list(got))
    return (c, fh, fw), (mh, mw)


@torch.inference_mode()
def evaluate_plain(model: nn.Module, data: Dataset, sensor: Sensor, scheme: str, batch_size: int = 500,
                   first_frame_index: int = 10**9, device: torch.device | str = "cpu",
                   frame_size: tuple[int, int] | None = None, model_hw: tuple[int, int] | None = None) -> float:
    """Accuracy of a plain model on plain (unpermuted) sensor frames of ``data`` (exposed at ``frame_size``,
    resampled to ``model_hw`` by the plain front end; see :func:`sensor_inputs`)."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = sensor_inputs(data.images[start:start + batch_size], sensor, scheme, first_frame_index + start,
                          frame_size, model_hw)
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(data.labels[start:start + batch_size])).sum())
    return correct / len(data)


def check_outputs(cfg: TrainConfig, overwrite: bool = False) -> None:
    """Refuse, before any work, outputs that cannot be written, and an existing checkpoint unless ``overwrite``."""
    out = Path(cfg.out)
    check_output_path(out, "out", (".pt",), overwrite=overwrite)
    check_output_path(out.with_suffix(".json"), "out (its manifest)", (".json",))
    check_output_path(out.with_suffix(".state"), "out (its training state)", (".state",))


def train(cfg: TrainConfig, progress: bool = True, device: torch.device | str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) and write the checkpoint and its manifest. Returns the manifest.

    An existing checkpoint at ``cfg.out`` is refused unless ``overwrite``.
    """
    check_outputs(cfg, overwrite)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set = load_dataset(cfg.dataset, "train", cfg.data).subset(cfg.limit_train)
    test_set = load_dataset(cfg.dataset, "test", cfg.data).subset(cfg.limit_test)
    sensor_cfg = SensorConfig.from_yaml(resolve(cfg.sensor))
    sensor = Sensor(sensor_cfg, seed=cfg.seed)
    (c, _, _), model_hw = model_input(cfg, train_set.images.shape[1:3])
    num_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1
    arch = {"name": cfg.model, "in_channels": c, "num_classes": num_classes}
    torch.manual_seed(cfg.seed)
    model = build_model(**arch).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=True)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    state_path = Path(cfg.out).with_suffix(".state")
    epoch0, history, wall_s = 0, [], 0.0
    state = load_training_state(state_path)
    if state is not None:
        if {**asdict(TrainConfig()), **state["config"]} != asdict(cfg):  # fields added later: their defaults
            raise ConfigError(str(state_path), "config", "the same training config to resume (delete the .state "
                              "file to start over)", "a different config")
        load_state_into(state_path, model, state["model"], f"a plain {cfg.model}")
        load_state_into(state_path, opt, state["optimizer"], "the SGD optimiser")
        load_state_into(state_path, sched, state["scheduler"], "the one-cycle schedule")
        _check_resumed(state_path, model, opt, state, cfg.epochs)
        epoch0, history, wall_s = state["epoch"], state["history"], state["wall_s"]
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epoch0, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, epoch, 0x7A])))
        order = rng.permutation(len(train_set))
        model.train()
        total_loss, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   unit="batch", leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            scenes = train_set.images[idx]
            if cfg.augment:
                scenes = augment_scenes(scenes, rng)
            x = sensor_inputs(scenes, sensor, cfg.scheme, epoch * len(train_set) + step * cfg.batch_size,
                              cfg.frame_size, model_hw)
            y = torch.from_numpy(train_set.labels[idx])
            loss = loss_fn(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        if not np.isfinite(total_loss) or not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ConfigError(cfg.out, "lr", f"a training run whose loss stays finite (it diverged in epoch "
                              f"{epoch + 1}; no checkpoint was written; try a smaller lr)", cfg.lr)
        acc = evaluate_plain(model, test_set, sensor, cfg.scheme, device=device, frame_size=cfg.frame_size,
                             model_hw=model_hw)
        wall_s += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": total_loss / seen, "test_accuracy": acc, "wall_s": wall_s})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {total_loss / seen:.4f}  plain test accuracy {acc:.4f}  "
                       f"({wall_s:.0f} s)")
        save_training_state(state_path, {
            "config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history, "wall_s": wall_s})
    final_acc = history[-1]["test_accuracy"] if history else None
    info = {"dataset": cfg.dataset, "train_images": len(train_set), "test_images": len(test_set),
            "scheme": cfg.scheme, "input_shape": [c, *model_hw],
            "frame_size": list(cfg.frame_size or train_set.images.shape[1:3]),
            "sensor": sensor_cfg.to_dict(), "sensor_seed": cfg.seed, "plain_test_accuracy": final_acc,
            "epochs": cfg.epochs, "train_wall_s": round(wall_s, 1), "device": str(device),
            "torch_threads": torch.get_num_threads(), "history": history, "train_config": asdict(cfg)}
    return save_checkpoint(cfg.out, model, arch, info)
