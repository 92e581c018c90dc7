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
