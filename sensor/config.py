"""Sensor configuration: a validated dataclass loaded from YAML, every parameter in physical units.

The fields follow the EMVA 1288 camera model in the order the physics happens (see
:mod:`sensor.sensor`). Unknown fields, wrong types and out-of-range values raise
:class:`~sensor.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .cfa import PATTERNS
from .configio import dataclass_from_dict, read_yaml
from .errors import ConfigError

BIT_DEPTHS = (8, 10, 12, 14, 16)
COLOUR_KEYS = ("R", "G", "B")


@dataclass(frozen=True)
class SensorConfig:
    """One sensor profile. Units are in the field names: e (electrons), dn (digital numbers)."""

    name: str = "default-12bit-rggb"
    cfa: str = "RGGB"
    bit_depth: int = 12
    # Photons -> electrons.
    quantum_efficiency: dict[str, float] = field(
        default_factory=lambda: {"R": 0.50, "G": 0.60, "B": 0.45}
    )
    prnu_percent: float = 1.0
    # Dark signal.
    dark_current_e_per_s: float = 5.0
    dark_reference_temperature_c: float = 25.0
    dark_doubling_temperature_c: float = 6.5
    temperature_c: float = 25.0
    dsnu_e: float = 1.0
    # Storage and conversion.
    full_well_e: float = 10000.0
    conversion_gain_dn_per_e: float = 0.40
    analog_gain: float = 1.0
    read_noise_e: float = 3.0
    black_level_dn: int = 64
    # Exposure and illumination of a white (linear 1.0) scene patch.
    exposure_s: float = 0.01
    white_photons_per_s: float = 1.2e6
    # Seed of the sensor's own fixed-pattern maps (DSNU, PRNU): a property of the device.
    fpn_seed: int = 1288

    def __post_init__(self) -> None:
        validate(self, "SensorConfig")

    @property
    def max_dn(self) -> int:
        """Largest code the ADC emits: 2**bit_depth - 1."""
        return (1 << self.bit_depth) - 1

    @property
    def system_gain_dn_per_e(self) -> float:
        """Overall conversion gain K including analog gain."""
        return self.conversion_gain_dn_per_e * self.analog_gain

    def dark_current_at_temperature_e_per_s(self) -> float:
        """Dark current doubles every ``dark_doubling_temperature_c`` above the reference."""
        delta = self.temperature_c - self.dark_reference_temperature_c
        return self.dark_current_e_per_s * 2.0 ** (delta / self.dark_doubling_temperature_c)

    def replace(self, **changes: Any) -> SensorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "SensorConfig") -> SensorConfig:
        """Build from a mapping; names the bad field on error."""
        return dataclass_from_dict(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SensorConfig:
        return cls.from_dict(read_yaml(path), str(path))


# Largest values accepted: far beyond any real sensor, small enough that no draw or power overflows.
LIMITS: dict[str, tuple[float, float, bool]] = {  # name: (low, high, low excluded)
    "full_well_e": (0.0, 1e9, True),
    "conversion_gain_dn_per_e": (0.0, 1e4, True),
    "analog_gain": (0.0, 1e4, True),
    "exposure_s": (0.0, 3600.0, True),
    "dark_doubling_temperature_c": (0.1, 100.0, False),
    "read_noise_e": (0.0, 1e6, False),
    "dark_current_e_per_s": (0.0, 1e9, False),
    "dsnu_e": (0.0, 1e6, False),
    "prnu_percent": (0.0, 100.0, False),
    "white_photons_per_s": (0.0, 1e12, False),
    "temperature_c": (-60.0, 150.0, False),
    "dark_reference_temperature_c": (-60.0, 150.0, False),
}
MAX_ELECTRONS_PER_EXPOSURE = 1e12  # mean photons or dark electrons of one pixel in one exposure


def _in_range(cfg: SensorConfig, source: str, name: str) -> None:
    low, high, low_open = LIMITS[name]
    value = getattr(cfg, name)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        raise ConfigError(source, name, f"a number {lo} and <= {high:g}", value)


def validate(cfg: SensorConfig, source: str) -> None:
    """Range checks for every field; raises ConfigError naming the first bad one."""
    if cfg.cfa not in PATTERNS:
        raise ConfigError(source, "cfa", f"one of {', '.join(PATTERNS)}", cfg.cfa)
    if cfg.bit_depth not in BIT_DEPTHS:
        raise ConfigError(source, "bit_depth", f"one of {BIT_DEPTHS}", cfg.bit_depth)
    qe = cfg.quantum_efficiency
    wanted = ("mono",) if cfg.cfa == "mono" else COLOUR_KEYS
    if not isinstance(qe, dict) or set(qe) != set(wanted):
        raise ConfigError(source, "quantum_efficiency", f"a mapping with keys {list(wanted)}", qe)
    for key, value in qe.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(source, f"quantum_efficiency.{key}", "a number in (0, 1]", value)
    for name in LIMITS:
        _in_range(cfg, source, name)
    if not 0 <= cfg.black_level_dn < cfg.max_dn:
        raise ConfigError(source, "black_level_dn", f"an integer in [0, {cfg.max_dn})",
                          cfg.black_level_dn)
    if not 0 <= cfg.fpn_seed < 2**63:
        raise ConfigError(source, "fpn_seed", "an integer in [0, 2**63)", cfg.fpn_seed)
    if cfg.white_photons_per_s * cfg.exposure_s > MAX_ELECTRONS_PER_EXPOSURE:
        raise ConfigError(source, "exposure_s", f"white_photons_per_s * exposure_s <= "
                          f"{MAX_ELECTRONS_PER_EXPOSURE:g} photons per pixel", cfg.exposure_s)
    delta = cfg.temperature_c - cfg.dark_reference_temperature_c
    doublings = delta / cfg.dark_doubling_temperature_c
    if doublings > 60 or cfg.dark_current_at_temperature_e_per_s() * cfg.exposure_s > MAX_ELECTRONS_PER_EXPOSURE:
        raise ConfigError(source, "temperature_c", f"a dark signal of at most {MAX_ELECTRONS_PER_EXPOSURE:g} e- "
                          f"per exposure ({doublings:.3g} doublings of dark_current_e_per_s above "
                          f"dark_reference_temperature_c)", cfg.temperature_c)
