"""The model stage: batches of protected frames in, predictions out.

One implementation of the per-batch work, called by the local pipeline, ``privcam replay``
and any other engine. It is built from a plain model and a key: the keyed twin's gather
tables are derived from the key here and never stored.

The network input of a frame is :func:`pipeline.stream.inputs.network_input`, the same for training
on plain frames and for inference on protected ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models.tables import plane_tables_torch
from sensor.errors import PrivcamError
from sensor.frame import FrameFormat, ProtectedFrame
from sensor.keys import Key
from sensor.readout import readout_permutation, readout_subkey

from .inputs import input_shape, network_input


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
    """

    def __init__(self, model: nn.Module, key: Key, fmt: FrameFormat, mode: str = "fused",
                 device: torch.device | str | None = None, check_fingerprint: bool = True,
                 model_hw: tuple[int, int] | None = None) -> None:
        from models.keyed import keyed

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fmt, self.mode, self.fingerprint, self.session = fmt, mode, key.fingerprint, key.session
        self._key = key
        self.check_fingerprint = check_fingerprint
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
        x = network_input(data, self.fmt)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if not self.fmt.rotation:
            return self.model(x)
        subkeys = [readout_subkey(self._key, self.fmt.scheme, int(n)) for n in frame_indices]
        tables = plane_tables_torch(self.fmt.scheme, self.fmt.height, self.fmt.width, subkeys, self.device)
        # the frame counters also rotate the entry layer's output order (fused mode)
        return self.model(x, input_perm=tables, frame_index=[int(n) for n in frame_indices])

    def __call__(self, frames: list[ProtectedFrame]) -> list[dict[str, Any]]:
        """Predictions, one dict per frame: frame index, label (or None), class, confidence."""
        probs = torch.softmax(self.logits(frames).float(), dim=1).cpu()
        conf, pred = probs.max(dim=1)
        rows = zip(frames, pred.tolist(), conf.tolist(), strict=True)
        return [{"frame_index": f.meta.frame_index, "label": f.meta.label, "pred": int(p),
                 "confidence": float(c)} for f, p, c in rows]

    def __reduce__(self):  # it holds the key and the keyed twin's tables
        raise TypeError("KeyedClassifier holds the key and its gather tables and cannot be pickled; build it "
                        "where it runs, from the key file and the checkpoint path")

    def __repr__(self) -> str:
        return (f"KeyedClassifier(key={self.fingerprint}, scheme={self.fmt.scheme}, "
                f"rotation={self.fmt.rotation}, mode={self.mode}, device={self.device}, "
                f"frames={self.fmt.height}x{self.fmt.width}, model_hw={self.model_hw[0]}x{self.model_hw[1]})")
