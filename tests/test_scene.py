from __future__ import annotations

import numpy as np
import pytest

from sensor.config import SensorConfig
from sensor.scene import (
    inverse_tone,
    linear_to_srgb,
    raw_to_srgb,
    render_photons,
    srgb_to_linear,
    tone,
    unprocess,
)
from sensor.sensor import Sensor


def test_tone_and_gamma_invert_exactly():
    y = np.linspace(0, 1, 1001)
    assert np.allclose(tone(inverse_tone(y)), y, atol=1e-12)
    assert np.allclose(linear_to_srgb(srgb_to_linear(y)), y, atol=1e-12)
    assert np.all(np.diff(srgb_to_linear(inverse_tone(y))) > 0), "monotone"


def test_grey_stays_neutral_before_white_balance():
    grey = np.full((4, 4, 3), 128, np.uint8)
    cam = unprocess(grey)
    # Inverse white balance divides red and blue by their gains; green is untouched.
    assert cam[0, 0, 1] == pytest.approx(srgb_to_linear(inverse_tone(np.array(128 / 255))), rel=1e-9)
    assert cam[0, 0, 0] < cam[0, 0, 1] and cam[0, 0, 2] < cam[0, 0, 1]


def test_photons_scale_with_exposure_and_follow_the_cfa():
    cfg = SensorConfig()
    white = np.full((4, 6, 3), 255, np.uint8)
    photons = render_photons(white, cfg)
    assert photons.shape == (4, 6)
    full = cfg.white_photons_per_s * cfg.exposure_s
    assert photons[0, 1] == pytest.approx(full)  # green site of RGGB sees white at full scale
    assert photons[0, 0] < photons[0, 1] and photons[1, 1] < photons[0, 1]
    doubled = render_photons(white, cfg.replace(exposure_s=2 * cfg.exposure_s))
    assert np.allclose(doubled, 2 * photons)
    mono = SensorConfig.from_yaml("configs/sensors/mono10.yaml")
    assert render_photons(white, mono) == pytest.approx(
        np.full((4, 6), mono.white_photons_per_s * mono.exposure_s))


def test_capture_and_preview_recover_the_scene():
    rng = np.random.default_rng(3)
    scene = np.repeat(np.repeat(rng.integers(30, 225, (8, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    cfg = SensorConfig()
    raw = Sensor(cfg, seed=0).expose(render_photons(scene, cfg))
    preview = raw_to_srgb(raw, cfg)
    inner = (slice(2, -2), slice(2, -2))  # demosaic edges
    err = np.abs(preview[inner].astype(int) - scene[inner].astype(int))
    assert np.median(err) <= 6, f"median preview error {np.median(err)}"


def test_default_profile_file_equals_builtin_defaults():
    assert SensorConfig.from_yaml("configs/sensors/default.yaml") == SensorConfig()
