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
    """Public metadata of one protected frame.

    ``session``: the capture session's public nonce (32 hex digits; "" for frames made directly under a
    master key); frame ``n``'s orders derive from (key, session, n). ``mac``: HMAC-SHA256 over this
    header and the pixels under the session's MAC subkey (:mod:`sensor.frameauth`), 64 hex digits.
    ``label`` is None unless a recording was explicitly made for evaluation (``--store-labels``).
    """

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
    session: str = ""
    mac: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field by name. The values are immutable scalars, so a shallow dict equals
        :func:`dataclasses.asdict`'s deep copy (which took about an eighth of a 28x28 capture: it is
        the header of every frame's MAC)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def same_stream(self, fmt: FrameFormat) -> bool:
        """True if this frame has the scheme, rotation and size of ``fmt``."""
        return (self.scheme, self.rotation, self.height, self.width) == (fmt.scheme, fmt.rotation, fmt.height,
                                                                         fmt.width)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrameMeta:
        """Build from a decoded header, checking every field's type and range (PrivcamError naming it)."""
        if not isinstance(data, dict):
            raise PrivcamError(f"frame metadata: expected a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in known if k not in data and k not in ("capture_time_ns", "label", "session", "mac")]
        if missing:
            raise PrivcamError(f"frame metadata: missing fields {sorted(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        ints = {"frame_index": (0, 2**63 - 1), "bit_depth": (1, 16), "height": (1, 1 << 16), "width": (1, 1 << 16),
                "capture_time_ns": (0, 2**63 - 1)}
        for name, (low, high) in ints.items():
            value = values.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PrivcamError(f"frame metadata: {name}: expected an integer in [{low}, {high}], got {value!r}")
        label = values.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise PrivcamError(f"frame metadata: label: expected an integer or null, got {label!r}")
        for name in ("scheme", "key_fingerprint", "cfa"):
            if not isinstance(values[name], str):
                raise PrivcamError(f"frame metadata: {name}: expected a string, got {values[name]!r}")
        for name, digits in (("session", 32), ("mac", 64)):
            value = values.get(name, "")
            if not isinstance(value, str) or (value and (len(value) != digits or value.strip("0123456789abcdef"))):
                raise PrivcamError(f"frame metadata: {name}: expected \"\" or {digits} hex digits, got {value!r:.80}")
        if not isinstance(values["rotation"], bool):
            raise PrivcamError(f"frame metadata: rotation: expected true or false, got {values['rotation']!r}")
        return cls(**values)


@dataclass(frozen=True)
class ProtectedFrame:
    """A frame as the sensor emits it: pixels in keyed slot order. data: (H, W) uint16."""

    data: np.ndarray = field(repr=False)
    meta: FrameMeta

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint16 or self.data.shape != (self.meta.height, self.meta.width):
            raise PrivcamError(f"protected frame: expected ({self.meta.height}, {self.meta.width}) uint16, "
                               f"got {self.data.shape} {self.data.dtype}")
