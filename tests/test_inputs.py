"""The network input: the numba pass equals the numpy reference bit for bit, for every scheme."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stream.inputs import input_scale, network_input, scaled_input_numpy
from sensor.cfa import pack
from sensor.frame import FrameFormat


@pytest.mark.parametrize("scheme", ["pixel", "quad", "plane"])
@pytest.mark.parametrize(("black", "max_dn", "shape"), [(64, 4095, (3, 6, 10)), (0, 1023, (1, 2, 2)),
                                                        (200, 65535, (2, 32, 48))])
def test_network_input_kernel_equals_the_numpy_reference(scheme, black, max_dn, shape):
    """Every uint16 value (below black, above max_dn) through the numba pass and through the reference:
    the same float32 bits."""
    rng = np.random.default_rng(black + max_dn)
    frames = rng.integers(0, 65536, shape, dtype=np.uint16)
    frames.flat[:4] = (0, black, max_dn, 65535)
    fmt = FrameFormat(black, max_dn, "RGGB", scheme=scheme, height=shape[1], width=shape[2])
    got = network_input(frames, fmt).numpy()
    want = scaled_input_numpy(frames, scheme, np.float32(black), input_scale(fmt))
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # and what the reference means: (dn - black) * scale in float32, on the mosaic or the packed planes
    x = frames[:, None] if scheme == "pixel" else pack(frames)
    assert np.array_equal(want, (x.astype(np.float32) - np.float32(black)) * input_scale(fmt))
    # a strided batch (every other frame) gives the same as its contiguous copy
    wide = np.repeat(frames, 2, axis=0)[::2]
    assert np.array_equal(network_input(wide, fmt).numpy(), got)


def test_network_input_other_dtypes_and_odd_sizes():
    fmt = FrameFormat(0, 255, "RGGB", scheme="quad", height=4, width=6)
    frames = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)  # not uint16: the reference path
    assert np.array_equal(network_input(frames, fmt).numpy(),
                          scaled_input_numpy(frames, "quad", np.float32(0), input_scale(fmt)))
    with pytest.raises(ValueError, match="even"):
        network_input(np.zeros((1, 5, 6), np.uint16), fmt)
    with pytest.raises(ValueError, match="expected \\(B, H, W\\)"):
        network_input(np.zeros((5, 6), np.uint16), fmt)
