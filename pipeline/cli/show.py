"""One PNG a person can read at a glance: what the scene is, what the sensor digitised, what it
emits under the key, and what the first keyed layer holds next to its plain twin.

Panels (left to right): scene | plain raw, demosaiced | protected frame as emitted |
plain first-layer feature map | keyed first-layer feature map as stored (slot order).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from models.keyed import KeyedConv2d, keyed
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.scene import raw_to_srgb, render_photons
from sensor.sensor import Sensor

from ..stream.inputs import input_shape, network_input

PANEL_PX = 224


def _to_panel(image: np.ndarray, title: str) -> np.ndarray:
    """Any (H, W) or (H, W, 3) array -> (PANEL_PX + 28, PANEL_PX, 3) uint8 with a caption."""
    if image.dtype != np.uint8:
        lo, hi = np.percentile(image, [1, 99])
        image = np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    scale = PANEL_PX / max(h, w)
    interp = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    panel = np.full((PANEL_PX + 28, PANEL_PX, 3), 255, np.uint8)
    y0, x0 = 28 + (PANEL_PX - resized.shape[0]) // 2, (PANEL_PX - resized.shape[1]) // 2
    panel[y0:y0 + resized.shape[0], x0:x0 + resized.shape[1]] = resized
    cv2.putText(panel, title, (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def _first_conv_output(model: nn.Module, x: torch.Tensor, kind: type) -> torch.Tensor:
    """Output of the first module of type ``kind`` during a forward pass."""
    captured: list[torch.Tensor] = []
    layer = next(m for m in model.modules() if isinstance(m, kind))
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[0]


def show_panels(scene: np.ndarray, config: SensorConfig, key: Key, scheme: str, model: nn.Module,
                frame_index: int = 0, seed: int = 0,
                model_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Build the figure. Returns ((H, W, 3) uint8 RGB, facts about it).

    ``model_hw``: the model's input (h, w) when it is smaller than the frame's network input: the plain
    map is then the model's on the plain front end's output, the keyed one behind the keyed front end.
    """
    sensor = Sensor(config, seed=seed)
    photons = render_photons(scene, config)
    plain = sensor.expose(photons, frame_index)
    protected = sensor.capture(photons, key, frame_index, scheme=scheme)
    h, w = plain.shape
    shape = input_shape(scheme, h, w)
    order = sensor.readout(key, scheme, h, w)
    twin = keyed(model, key, shape, torch.from_numpy(order.plane_tables()), mode="fused", model_hw=model_hw)
    fmt = FrameFormat.from_config(config, scheme=scheme)
    plain_in, prot_in = network_input(plain[None], fmt, size=model_hw), network_input(protected.data[None], fmt)
    fmap_plain = _first_conv_output(model.eval(), plain_in, nn.Conv2d)[0]
    fmap_keyed = _first_conv_output(twin.eval(), prot_in, KeyedConv2d)[0]
    channel = int(fmap_plain.flatten(1).std(1).argmax())
    layer = next(m for m in twin.modules() if isinstance(m, KeyedConv2d))
    restored = fmap_keyed.flatten(1)[:, torch.argsort(layer.out_perm)].view_as(fmap_plain)
    facts = {"scheme": scheme, "key_fingerprint": key.fingerprint, "frame_shape": [h, w],
             "model_input": list(model_hw or shape[1:]),
             "feature_channel": channel,
             "keyed_vs_plain_feature_max_abs_diff": float((restored - fmap_plain).abs().max())}
    panels = [_to_panel(scene, "scene"),
              _to_panel(raw_to_srgb(plain, config), "plain raw (demosaiced)"),
              _to_panel(raw_to_srgb(protected.data, config), f"protected ({scheme} readout)"),
              _to_panel(fmap_plain[channel].numpy(), f"plain conv1 map #{channel}"),
              _to_panel(fmap_keyed[channel].numpy(), f"keyed conv1 map #{channel}")]
    return np.concatenate(panels, axis=1), facts
