"""The model stage: batches of protected frames in, predictions out.

One implementation of the per-batch work, called by the local pipeline, ``privcam replay``
and any other engine. It is built from a plain model and a key: the keyed twin's gather
tables are derived from the key here and never stored.

The network input of a frame is :func:`pipeline.stream.inputs.network_input`, the same for training
on plain frames and for inference on protected ones.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.tables import plane_tables_torch
from sensor.errors import PrivcamError
from sensor.frame import FrameFormat, ProtectedFrame
from sensor.keys import Key
from sensor.readout import readout_permutation, readout_subkey

from .handoff import ReadoutHandoff
from .inputs import input_shape, network_input


@dataclass
class PreparedBatch:
    """A batch ready for the keyed network: ``x`` (B, C, h, w) on the device, the frame counters and,
    with rotation, the per-frame readout ``tables`` ((B, n) or (B, 4, n)) and entry-layer ``orders``.
    Holds key material (the tables are the key): it stays in the process."""

    x: torch.Tensor
    frame_indices: list[int]
    tables: torch.Tensor | None = None
    orders: dict[str, torch.Tensor] | None = None

    def __reduce__(self):
        raise TypeError("PreparedBatch holds per-frame tables (key material) and cannot be pickled")


class KeyedClassifier:
    """Keyed twin of a plain classifier; ``__call__`` maps protected frames to predictions.

    Args:
        model: plain model (``models.plain``), trained on :func:`network_input` of plain frames.
        key: the session key of the frames' session (:meth:`sensor.keys.Key.for_session`; a master key
            only for frames made directly under it); the readout and every layer order derive from it.
        fmt: frame format (scheme, rotation, size, levels).
        mode: "fused" (every feature map permuted) or "fast" (only the first layer keyed).
        device: where the model and its tables run (default: CUDA when present, else CPU).
        check_fingerprint: refuse frames whose key fingerprint differs (turn off only to measure
            what a wrong key gives, as an attacker with another key would).
        model_hw: the model's input (h, w) when it is smaller than the frames' network input: a
            keyed front end resamples the protected frames (the model was trained on
            ``network_input(plain frames, fmt, size=model_hw)``).
        readouts: with rotation, where the sensor stage of the same run leaves each frame's readout
            order (:class:`pipeline.stream.handoff.ReadoutHandoff`): taken instead of built again when
            its subkey is this frame's; the same predictions either way.
    """

    def __init__(self, model: nn.Module, key: Key, fmt: FrameFormat, mode: str = "fused",
                 device: torch.device | str | None = None, check_fingerprint: bool = True,
                 model_hw: tuple[int, int] | None = None, readouts: ReadoutHandoff | None = None) -> None:
        from models.keyed import keyed

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fmt, self.mode, self.fingerprint, self.session = fmt, mode, key.fingerprint, key.session
        self._key = key
        self.check_fingerprint = check_fingerprint
        self.readouts = readouts
        static = readout_permutation(key, fmt.scheme, fmt.height, fmt.width).plane_tables()
        shape = input_shape(fmt.scheme, fmt.height, fmt.width)
        self.model_hw = tuple(model_hw) if model_hw is not None else shape[1:]  # what the network runs at
        self.model = keyed(model.to(self.device).eval(), key, shape, torch.from_numpy(static), mode=mode,
                           device=self.device, model_hw=model_hw)

    def check(self, frame: ProtectedFrame) -> None:
        """Refuse frames this classifier cannot read, naming the mismatch."""
        m, f = frame.meta, self.fmt
        if self.check_fingerprint and m.key_fingerprint != self.fingerprint:
            raise PrivcamError(f"frame {m.frame_index}: protected with key {m.key_fingerprint}, "
                               f"but the classifier holds key {self.fingerprint}")
        if not m.same_stream(f):
            raise PrivcamError(
                f"frame {m.frame_index}: scheme/rotation/size {m.scheme}/{m.rotation}/{m.height}x{m.width} "
                f"differ from the classifier's {f.scheme}/{f.rotation}/{f.height}x{f.width}")
        if self.check_fingerprint and m.session != self.session:
            raise PrivcamError(f"frame {m.frame_index}: from session {m.session or '(none)'}, but the classifier "
                               f"holds the key of session {self.session or '(none)'}")

    @torch.inference_mode()
    def logits(self, frames: list[ProtectedFrame]) -> torch.Tensor:
        """(B, num_classes) float32 logits on the classifier's device."""
        for frame in frames:
            self.check(frame)
        return self.logits_array(np.stack([f.data for f in frames]), [f.meta.frame_index for f in frames])

    @torch.inference_mode()
    def logits_array(self, data: np.ndarray, frame_indices: list[int] | np.ndarray) -> torch.Tensor:
        """The keyed inference path: protected frames (B, H, W) uint16 with their frame indices (used
        only with rotation: each frame's readout table and, in fused mode, the entry layer's output
        order) -> (B, num_classes) float32 logits on the classifier's device."""
        return self.logits_prepared(self.prepare_array(data, frame_indices))

    @torch.inference_mode()
    def prepare_array(self, data: np.ndarray, frame_indices: list[int] | np.ndarray) -> PreparedBatch:
        """The first half of :meth:`logits_array`, everything but the network: the network input
        (B, C, h, w) on the device and, with rotation, each frame's tables. A pipeline runs it for batch
        k + 1 in another thread while :meth:`logits_prepared` runs batch k (double buffering)."""
        x = network_input(data, self.fmt)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        idx = [int(n) for n in frame_indices]
        if not self.fmt.rotation:
            return PreparedBatch(x, idx)
        subkeys = [readout_subkey(self._key, self.fmt.scheme, n) for n in idx]
        built = None if self.readouts is None else [self._handed(n, k) for n, k in zip(idx, subkeys, strict=True)]
        tables = plane_tables_torch(self.fmt.scheme, self.fmt.height, self.fmt.width, subkeys, self.device, built)
        # the frame counters also rotate the entry layer's output order (fused mode)
        orders = None if self.model.frame_orders is None else self.model.frame_orders.build(idx, self.device)
        return PreparedBatch(x, idx, tables, orders)

    def _handed(self, frame_index: int, subkey: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Frame ``frame_index``'s pass tables from :attr:`readouts`, if the sensor left them there for
        this scheme, size and readout subkey (compared in constant time); else None (built here)."""
        order = self.readouts.take(frame_index) if self.readouts is not None else None
        f = self.fmt
        if order is None or (order.scheme, order.height, order.width) != (f.scheme, f.height, f.width):
            return None
        return order.kernel_tables() if hmac.compare_digest(order.subkey, subkey) else None

    @torch.inference_mode()
    def logits_prepared(self, batch: PreparedBatch) -> torch.Tensor:
        """The second half of :meth:`logits_array`: the keyed network on a prepared batch."""
        if not self.fmt.rotation:
            return self.model(batch.x)
        return self.model(batch.x, input_perm=batch.tables, frame_index=batch.frame_indices, orders=batch.orders)

    def prepare(self, frames: list[ProtectedFrame]) -> tuple[list[ProtectedFrame], PreparedBatch]:
        """Checked frames with their prepared batch (:meth:`prepare_array`), for :meth:`predict`."""
        for frame in frames:
            self.check(frame)
        return frames, self.prepare_array(np.stack([f.data for f in frames]), [f.meta.frame_index for f in frames])

    def predict(self, prepared: tuple[list[ProtectedFrame], PreparedBatch]) -> list[dict[str, Any]]:
        """Predictions of a prepared batch, as :meth:`__call__` gives them."""
        frames, batch = prepared
        probs = torch.softmax(self.logits_prepared(batch).float(), dim=1).cpu()
        conf, pred = probs.max(dim=1)
        rows = zip(frames, pred.tolist(), conf.tolist(), strict=True)
        return [{"frame_index": f.meta.frame_index, "label": f.meta.label, "pred": int(p),
                 "confidence": float(c)} for f, p, c in rows]

    def __call__(self, frames: list[ProtectedFrame]) -> list[dict[str, Any]]:
        """Predictions, one dict per frame: frame index, label (or None), class, confidence."""
        return self.predict(self.prepare(frames))

    def __reduce__(self):  # it holds the key and the keyed twin's tables
        raise TypeError("KeyedClassifier holds the key and its gather tables and cannot be pickled; build it "
                        "where it runs, from the key file and the checkpoint path")

    def __repr__(self) -> str:
        return (f"KeyedClassifier(key={self.fingerprint}, scheme={self.fmt.scheme}, "
                f"rotation={self.fmt.rotation}, mode={self.mode}, device={self.device}, "
                f"frames={self.fmt.height}x{self.fmt.width}, model_hw={self.model_hw[0]}x{self.model_hw[1]})")
