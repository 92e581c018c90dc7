"""Scene rendering: ordinary 8-bit images -> linear camera RGB -> mean photons per pixel.

The inverse ISP follows Brooks et al. 2019, "Unprocessing Images for Learned Raw
Denoising", in reverse processing order:

    sRGB uint8 -> [0, 1] -> inverse tone curve (smoothstep) -> inverse sRGB gamma
    -> inverse colour correction (camera-from-sRGB matrix) -> inverse white balance
    -> CFA mosaic -> photons = linear * white_photons_per_s * exposure_s

A forward ISP (:func:`raw_to_srgb`) turns a digitised mosaic back into a viewable preview;
it is for people looking at plain frames only and is never applied to protected frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cfa import demosaic, mosaic
from .config import SensorConfig

# sRGB-linear -> camera RGB. Rows sum to 1 so grey stays grey before white balance; this is
# the row-normalised inverse of a typical cam->sRGB matrix (Brooks et al. draw one at random
# per image; privcam uses one fixed matrix so renders are reproducible).
_CAM_FROM_SRGB = np.array([[0.7700, 0.2000, 0.0300],
                           [0.0900, 0.8000, 0.1100],
                           [0.0300, 0.2100, 0.7600]])


@dataclass(frozen=True)
class IspParams:
    """Colour parameters of the (inverse) ISP."""

    cam_from_srgb: np.ndarray = field(default_factory=lambda: _CAM_FROM_SRGB.copy())
    red_gain: float = 1.9
    blue_gain: float = 1.5


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, 3]) -> float64 in [0, 1]. Other dtypes are rejected."""
    if image.dtype != np.uint8:
        raise ValueError(f"scene image: expected uint8 pixels, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"scene image: expected (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    x = image.astype(np.float64) / 255.0
    return x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x


def inverse_tone(y: np.ndarray) -> np.ndarray:
    """Invert the smoothstep tone curve 3x^2 - 2x^3 on [0, 1]."""
    y = np.clip(y, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def tone(x: np.ndarray) -> np.ndarray:
    """Smoothstep tone curve, the forward of :func:`inverse_tone`."""
    x = np.clip(x, 0.0, 1.0)
    return 3.0 * x**2 - 2.0 * x**3


def srgb_to_linear(y: np.ndarray) -> np.ndarray:
    """Exact sRGB electro-optical transfer function."""
    return np.where(y <= 0.04045, y / 12.92, ((y + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`srgb_to_linear`."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def linear_srgb(image: np.ndarray) -> np.ndarray:
    """Undo tone curve and gamma: uint8 (H, W[, 3]) -> linear float64 of the same layout."""
    return srgb_to_linear(inverse_tone(to_unit_float(image)))


def camera_from_linear_srgb(lin: np.ndarray, isp: IspParams | None = None) -> np.ndarray:
    """Inverse colour correction and inverse white balance: (H, W, 3) -> (H, W, 3) in [0, 1]."""
    isp = isp or IspParams()
    cam = lin @ isp.cam_from_srgb.T
    cam[..., 0] /= isp.red_gain
    cam[..., 2] /= isp.blue_gain
    return np.clip(cam, 0.0, 1.0)


def unprocess(image: np.ndarray, isp: IspParams | None = None) -> np.ndarray:
    """Inverse ISP of an 8-bit image.

    Args:
        image: (H, W, 3) sRGB or (H, W) grey, uint8.

    Returns:
        (H, W, 3) linear camera RGB, or (H, W) linear grey for grey input, float64 in [0, 1].
    """
    lin = linear_srgb(image)
    return lin if lin.ndim == 2 else camera_from_linear_srgb(lin, isp)


def luminance(linear_rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luminance of linear RGB: (H, W, 3) -> (H, W)."""
    return linear_rgb @ np.array([0.2126, 0.7152, 0.0722])


def render_photons(image: np.ndarray, config: SensorConfig, isp: IspParams | None = None) -> np.ndarray:
    """Mean photon count per pixel that ``image`` delivers to ``config``'s sensor.

    A mono sensor sees the linear luminance; a colour sensor the mosaic of camera RGB.

    Args:
        image: (H, W, 3) or (H, W) uint8.

    Returns:
        (H, W) float64 mean photons per pixel over ``config.exposure_s``.
    """
    lin = linear_srgb(image)
    if config.cfa == "mono":
        plane = lin if lin.ndim == 2 else luminance(lin)
    else:
        rgb = lin if lin.ndim == 3 else np.repeat(lin[..., None], 3, axis=2)
        plane = mosaic(camera_from_linear_srgb(rgb, isp), config.cfa)
    return plane * (config.white_photons_per_s * config.exposure_s)


def raw_to_photons(raw: np.ndarray, meta: object, config: SensorConfig) -> np.ndarray:
    """A raw frame as a scene: its values normalised between black and white level are linear
    camera signal, mapped to photons like a white patch. ``meta`` is a :class:`sensor.rawio.RawMeta`.

    Args:
        raw: (H, W) uint16 mosaic whose CFA must match ``config.cfa``.

    Returns:
        (H, W) float64 mean photons per pixel.
    """
    if meta.cfa != config.cfa:
        raise ValueError(f"raw input has CFA {meta.cfa} but the sensor profile expects {config.cfa}")
    span = max(float(meta.white_level) - float(meta.black_level), 1.0)
    linear = np.clip((raw.astype(np.float64) - meta.black_level) / span, 0.0, 1.0)
    return linear * (config.white_photons_per_s * config.exposure_s)


def raw_to_srgb(raw: np.ndarray, config: SensorConfig, isp: IspParams | None = None) -> np.ndarray:
    """Preview ISP: black level, normalise, demosaic, white balance, colour matrix, gamma, tone.

    Args:
        raw: (H, W) uint16 plain (unprotected) mosaic.

    Returns:
        (H, W, 3) uint8 sRGB preview.
    """
    isp = isp or IspParams()
    rgb = demosaic(raw, config.cfa).astype(np.float64)
    # DN of a white patch per colour channel: undo exposure, quantum efficiency and gain.
    qe = config.quantum_efficiency
    qe_rgb = np.array([qe["mono"]] * 3 if config.cfa == "mono" else [qe["R"], qe["G"], qe["B"]])
    white_dn = config.white_photons_per_s * config.exposure_s * qe_rgb * config.system_gain_dn_per_e
    lin = np.clip((rgb - config.black_level_dn) / np.maximum(white_dn, 1e-9), 0.0, 1.0)
    if config.cfa != "mono":
        lin[..., 0] *= isp.red_gain
        lin[..., 2] *= isp.blue_gain
        lin = np.clip(lin, 0.0, 1.0) @ np.linalg.inv(isp.cam_from_srgb).T
    out = tone(linear_to_srgb(lin))
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


# sRGB values of the 24 ColorChecker Classic patches (BabelColor averages, D50 -> sRGB), row-major.
_COLORCHECKER_SRGB = np.array([
    [115, 82, 68], [194, 150, 130], [98, 122, 157], [87, 108, 67], [133, 128, 177], [103, 189, 170],
    [214, 126, 44], [80, 91, 166], [193, 90, 99], [94, 60, 108], [157, 188, 64], [224, 163, 46],
    [56, 61, 150], [70, 148, 73], [175, 54, 60], [231, 199, 31], [187, 86, 149], [8, 133, 161],
    [243, 243, 242], [200, 200, 200], [160, 160, 160], [122, 122, 121], [85, 85, 85], [52, 52, 52],
], np.uint8)


def colour_chart(height: int = 240, width: int = 360) -> np.ndarray:
    """Built-in scene: a 4x6 ColorChecker-style chart over a grey ramp. Returns (H, W, 3) uint8 sRGB."""
    if height < 8 or width < 12:
        raise ValueError(f"colour_chart: expected at least 8x12 pixels, got {height}x{width}")
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    chart = np.repeat(np.repeat(ramp[None, :, None], height, 0), 3, 2)
    ph, pw = height * 3 // 4 // 4, width // 6
    margin = max(ph // 8, 1)
    for i, colour in enumerate(_COLORCHECKER_SRGB):
        r, c = divmod(i, 6)
        chart[r * ph + margin:(r + 1) * ph - margin, c * pw + margin:(c + 1) * pw - margin] = colour
    return chart
