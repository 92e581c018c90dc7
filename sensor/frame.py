"""The protected frame a keyed sensor emits: the permuted uint16 data plus public metadata.

Nothing here is secret: the key is identified only by its public fingerprint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import PrivcamError
from .readout_tables import Scheme


@dataclass(frozen=True)
class FrameFormat:
    """What every frame of a stream shares: DN levels, colour filter, readout scheme and size.

    ``max_dn`` is ``2**bit_depth - 1`` (the sensor's clip level), so ``max_dn - x`` equals
    ``x XOR max_dn`` for every valid sample. ``height``/``width`` are None where any size is
    accepted (a protection stage); a classifier's format names them.
    """

    black_level: int
    max_dn: int
    cfa: str = "mono"
    scheme: str = "pixel"
    rotation: bool = False
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.max_dn < 1 or (self.max_dn + 1) & self.max_dn:
            raise ValueError(f"max_dn: expected 2**bits - 1, got {self.max_dn}")
        if not 0 <= self.black_level < self.max_dn:
            raise ValueError(f"black_level: expected an int in [0, {self.max_dn}), got {self.black_level}")

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> FrameFormat:
        """Levels and CFA of a :class:`~sensor.config.SensorConfig`, plus any other field."""
        return cls(int(cfg.black_level_dn), int(cfg.max_dn), cfg.cfa, **kw)

    @property
    def input_scheme(self) -> str:
        """Network input layout of plain-order frames: "pixel" (1, H, W) or packed planes (4, H/2, W/2)."""
        return "pixel" if self.cfa == "mono" else "quad"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FrameMeta:
    """Public metadata of one protected frame."""

    frame_index: int
    scheme: Scheme
    rotation: bool
    key_fingerprint: str
    bit_depth: int
    cfa: str
    height: int
    width: int
    capture_time_ns: int = 0
    label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def same_stream(self, fmt: FrameFormat) -> bool:
        """True if this frame has the scheme, rotation and size of ``fmt``."""
        return (self.scheme, self.rotation, self.height, self.width) == (fmt.scheme, fmt.rotation, fmt.height,
                                                                         fmt.width)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrameMeta:
        known = set(cls.__dataclass_fields__)
        missing = [k for k in known if k not in data and k not in ("capture_time_ns", "label")]
        if missing:
            raise PrivcamError(f"frame metadata: missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ProtectedFrame:
    """A frame as the sensor emits it: pixels in keyed slot order. data: (H, W) uint16."""

    data: np.ndarray = field(repr=False)
    meta: FrameMeta

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint16 or self.data.shape != (self.meta.height, self.meta.width):
            raise PrivcamError(f"protected frame: expected ({self.meta.height}, {self.meta.width}) uint16, "
                               f"got {self.data.shape} {self.data.dtype}")
