"""EMVA 1288 photon transfer measurement on the emulator: recover K and read noise.

Flat fields at a series of exposures, two frames each, plus pairs of dark frames:

    var(a - b) / 2 - var(dark1 - dark2) / 2  =  K * (mean_signal_dn - mean_dark_dn)
    var_dark_dn = K^2 (read_noise_e^2 + mu_dark_e) + 1/12      (quantisation noise)

Frame differences cancel the fixed-pattern noise (PRNU, DSNU). As EMVA 1288 warns, the
read noise is only measurable when the dark noise is at least about 0.5 DN; below that the
quantiser hides it and ``quantisation_limited`` is set (measure at a higher analog gain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SensorConfig
from .sensor import Sensor


@dataclass(frozen=True)
class PhotonTransferResult:
    gain_dn_per_e: float
    read_noise_e: float
    mean_dn: tuple[float, ...]
    variance_dn2: tuple[float, ...]
    dark_noise_dn: float

    @property
    def quantisation_limited(self) -> bool:
        return self.dark_noise_dn < 0.5

    def to_dict(self) -> dict:
        return {"gain_dn_per_e": self.gain_dn_per_e, "read_noise_e": self.read_noise_e,
                "mean_dn": list(self.mean_dn), "variance_dn2": list(self.variance_dn2),
                "dark_noise_dn": self.dark_noise_dn, "quantisation_limited": self.quantisation_limited}


def photon_transfer(config: SensorConfig, exposures_s: np.ndarray, shape: tuple[int, int] = (256, 256),
                    seed: int = 0) -> PhotonTransferResult:
    """Measure conversion gain and read noise from emulated flat and dark frames."""
    dark_shape = np.zeros(shape)
    means, variances = [], []
    for i, t in enumerate(np.asarray(exposures_s, dtype=np.float64)):
        sensor = Sensor(config.replace(exposure_s=float(t)), seed=seed)
        photons = np.full(shape, config.white_photons_per_s * t)
        a, b = (sensor.expose(photons, 4 * i + j).astype(np.float64) for j in (0, 1))
        d1, d2 = (sensor.expose(dark_shape, 4 * i + j).astype(np.float64) for j in (2, 3))
        means.append(0.5 * (a.mean() + b.mean() - d1.mean() - d2.mean()))
        variances.append(np.var(a - b) / 2 - np.var(d1 - d2) / 2)
    gain = float(np.polyfit(means, variances, 1)[0])
    sensor = Sensor(config, seed=seed)
    d1, d2 = (sensor.expose(dark_shape, 1_000_000 + j).astype(np.float64) for j in (0, 1))
    var_dark_dn = np.var(d1 - d2) / 2
    mu_dark_e = (0.5 * (d1.mean() + d2.mean()) - config.black_level_dn) / gain
    read_noise_e = float(np.sqrt(max((var_dark_dn - 1 / 12) / gain**2 - mu_dark_e, 0.0)))
    return PhotonTransferResult(gain, read_noise_e, tuple(map(float, means)), tuple(map(float, variances)),
                                float(np.sqrt(var_dark_dn)))


def default_exposures_s(config: SensorConfig, points: int = 12) -> np.ndarray:
    """Exposures from 4% to 90% of saturation (full well or the top DN code, whichever first)."""
    top_code_e = (config.max_dn - config.black_level_dn) / config.system_gain_dn_per_e
    saturation_e = min(config.full_well_e, top_code_e)
    saturation_s = saturation_e / (config.white_photons_per_s * max(config.quantum_efficiency.values()))
    return np.linspace(0.04, 0.9, points) * saturation_s
