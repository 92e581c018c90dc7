"""Frame authentication: an HMAC-SHA256 tag over each protected frame's header and pixels.

The camera holds the (session) key and tags every frame it emits; whoever holds the same key can
verify that a frame is unchanged and belongs to that session. Storage and transport cannot forge a
tag, so a replay can tell a tampered, duplicated, reordered or spliced frame from an intact one.

Tag = HMAC-SHA256(key.subkey("frame-mac"), header || pixels), where header is the frame's
:class:`~sensor.frame.FrameMeta` without ``mac`` as compact JSON with sorted keys (UTF-8), and pixels
are the (H, W) samples as little-endian uint16 in slot order. The tag is public.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace

import numpy as np

from .frame import FrameMeta, ProtectedFrame
from .keys import Key

MAC_PURPOSE = "frame-mac"

__all__ = ["MAC_PURPOSE", "frame_mac", "sign_frame", "verify_frame"]


def header_bytes(meta: FrameMeta) -> bytes:
    """The authenticated header: every FrameMeta field except ``mac``, as sorted compact JSON."""
    fields = meta.to_dict()
    fields.pop("mac")
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def frame_mac(key: Key, meta: FrameMeta, data: np.ndarray) -> str:
    """64 hex digits: the tag of one frame. data: (H, W) uint16 in slot order."""
    tag = hmac.new(key.subkey(MAC_PURPOSE), header_bytes(meta), hashlib.sha256)
    tag.update(np.ascontiguousarray(data, dtype="<u2").data)
    return tag.hexdigest()


def sign_frame(key: Key, frame: ProtectedFrame) -> ProtectedFrame:
    """The frame with its ``mac`` set."""
    return ProtectedFrame(frame.data, replace(frame.meta, mac=frame_mac(key, frame.meta, frame.data)))


def verify_frame(key: Key, frame: ProtectedFrame) -> bool:
    """True when the frame's tag is present and matches under ``key`` (constant-time comparison)."""
    if not frame.meta.mac:
        return False
    return hmac.compare_digest(frame.meta.mac, frame_mac(key, frame.meta, frame.data))
