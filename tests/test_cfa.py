"""Colour filter arrays: every Bayer pattern places R, G and B where its name says, end to end through
the sensor; pack and unpack are inverses; demosaic keeps flat grey grey and uniform colours right.

The expected sites are written from the naming convention in sensor/cfa.py's docstring (the four
letters are the top-left 2x2 cell in row-major order, top-left pixel first), not from its code.
"""

from __future__ import annotations

import numpy as np
import pytest

from sensor.cfa import PATTERNS, demosaic, mosaic, pack, unpack
from sensor.config import SensorConfig
from sensor.keys import Key
from sensor.scene import render_photons
from sensor.sensor import Sensor

BAYER = ("RGGB", "BGGR", "GRBG", "GBRG")
PURE = {"R": (255, 0, 0), "G": (0, 255, 0), "B": (0, 0, 255)}


def sites(pattern: str, height: int, width: int) -> np.ndarray:
    """(H, W) array of colour letters: pixel (y, x) has letter pattern[2 * (y % 2) + x % 2]."""
    return np.array([[pattern[2 * (y % 2) + x % 2] for x in range(width)] for y in range(height)])


@pytest.mark.parametrize("pattern", BAYER)
def test_mosaic_samples_each_colour_at_its_named_sites(pattern):
    rgb = np.zeros((6, 8, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 300
    raw = mosaic(rgb, pattern)
    expected = np.vectorize({"R": 100, "G": 200, "B": 300}.get)(sites(pattern, 6, 8))
    assert np.array_equal(raw, expected)


@pytest.mark.parametrize("pattern", ["BGGR", "GRBG", "GBRG"])
def test_a_capture_puts_a_pure_colour_on_its_sites(pattern):
    """A pure red, green or blue scene through a sensor of each pattern, read out keyed: the brightest
    sites of the restored frame are exactly the named ones, and the quad readout (whole 2x2 cells) keeps
    the emitted frame a valid mosaic of the same pattern."""
    cfg = SensorConfig().replace(cfa=pattern, name=f"test-{pattern}")
    sensor, key = Sensor(cfg, seed=1), Key(bytes(range(32)))
    where = sites(pattern, 16, 24)
    for colour, rgb in PURE.items():
        scene = np.broadcast_to(np.array(rgb, np.uint8), (16, 24, 3)).copy()
        photons = render_photons(scene, cfg)
        for scheme in ("quad", "pixel"):
            frame = sensor.capture(photons, key, frame_index=2, scheme=scheme)
            assert frame.meta.cfa == pattern
            plain = sensor.readout(key, scheme, 16, 24).inverse(frame.data)
            assert np.array_equal(plain, sensor.expose(photons, 2))
            on, off = plain[where == colour], plain[where != colour]
            assert on.min() > off.max(), f"{pattern} {colour} scene ({scheme}): its sites are not the brightest"
            if scheme == "quad":
                emitted_on, emitted_off = frame.data[where == colour], frame.data[where != colour]
                assert emitted_on.min() > emitted_off.max(), f"{pattern} quad readout broke the mosaic"


@pytest.mark.parametrize("shape", [(4, 6), (3, 8, 10), (2, 3, 2, 4)])
def test_unpack_inverts_pack(shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, shape, dtype=np.uint16)
    planes = pack(raw)
    assert planes.shape == (*shape[:-2], 4, shape[-2] // 2, shape[-1] // 2)
    assert np.array_equal(planes[..., 1, :, :], raw[..., 0::2, 1::2]), "plane k is offset (k // 2, k % 2)"
    assert np.array_equal(planes[..., 2, :, :], raw[..., 1::2, 0::2])
    assert np.array_equal(unpack(planes), raw)
    assert np.array_equal(pack(unpack(planes)), planes)
    with pytest.raises(ValueError, match="4 planes"):
        unpack(planes[..., :3, :, :])


@pytest.mark.parametrize("dtype, grey", [(np.uint8, 117), (np.uint16, 2900)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_flat_grey_demosaics_to_flat_grey(pattern, dtype, grey):
    rgb = demosaic(np.full((8, 10), grey, dtype), pattern)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == dtype
    assert np.all(rgb == grey)


@pytest.mark.parametrize("pattern", BAYER)
def test_demosaic_restores_a_uniform_colour(pattern):
    colour = np.array([900, 2500, 400], np.uint16)
    raw = mosaic(np.broadcast_to(colour, (12, 16, 3)).copy(), pattern)
    rgb = demosaic(raw, pattern)
    inner = rgb[2:-2, 2:-2].reshape(-1, 3)
    assert np.all(inner == colour), f"{pattern}: demosaiced {np.unique(inner, axis=0)[:3].tolist()}, want {colour}"
