"""Non-degenerate models for tests that compare predictions.

No shipped checkpoint takes the packed 4-plane input of the quad and plane schemes, and a randomly
initialised net predicts one class for every image, so "same prediction" would prove nothing. These
models keep explicitly seeded random conv weights, calibrate their BatchNorm statistics on plain
frames and fit the final Linear by ridge regression (closed form, no SGD) on labelled plain frames:
deterministic, a few seconds, and far from constant. Tests still check the predictions they compare
cover several classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.plain import build_model
from pipeline.stream.inputs import network_input
from pipeline.stream.sources import expose_scenes
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.sensor import Sensor

FIT_FRAME_BASE = 100_000  # frame indices of the fitting frames: apart from the test frames' noise


@torch.no_grad()
def fitted_model(arch: str, sensor_cfg: SensorConfig, scheme: str, images: np.ndarray, labels: np.ndarray,
                 seed: int = 0, num_classes: int = 10) -> nn.Sequential:
    """Plain ``arch`` for ``scheme``'s network input, fitted to plain sensor frames of ``images``.

    Args:
        images: (B, H, W[, 3]) uint8 scenes (use images the test does not evaluate on).
        labels: (B,) class labels.

    Returns:
        the model in eval mode.
    """
    fmt = FrameFormat.from_config(sensor_cfg, scheme=scheme)
    x = network_input(expose_scenes(images, Sensor(sensor_cfg, seed=seed), FIT_FRAME_BASE), fmt)
    torch.manual_seed(seed)
    model = build_model(arch, x.shape[1], num_classes)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    model(x)
    model.eval()
    for bn in norms:
        bn.momentum = 0.1
    head = model[-1]
    features = nn.Sequential(*list(model.children())[:-1])(x).double()
    f1 = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    y = nn.functional.one_hot(torch.as_tensor(np.asarray(labels), dtype=torch.long), num_classes).double()
    ridge = 1e-3 * f1.pow(2).sum(0).mean() * torch.eye(f1.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(f1.T @ f1 + ridge, f1.T @ y)
    head.weight.copy_(w[:-1].T.float())
    head.bias.copy_(w[-1].float())
    return model
