"""Protection stages: every way privcam can protect a frame, behind one interface.

A :class:`Protection` maps plain sensor frames (B, H, W) uint16 (values in [0, max_dn]) and their
frame indices to protected frames of the same shape and dtype, and says how an authorised user
classifies them (:meth:`Protection.authorised_logits`). The pipeline can run any of them in place
of the keyed readout, and :mod:`pipeline.lab.privacy` measures all of them with the same attacks.

=======================  =====  ==========  =================================================
stage                    keyed  invertible  authorised classifier
=======================  =====  ==========  =================================================
ReadoutProtection        yes    yes (key)   keyed twin of the plain model (no unscrambling)
EtC                      yes    yes (key)   restore with the key, then the plain model
ELE                      yes    yes (key)   restore with the key, then the plain model
ImageToPerturbation      no     no          the plain model on the transformed frames
=======================  =====  ==========  =================================================

* :class:`ReadoutProtection` is the keyed ADC readout (:mod:`sensor.readout`), static or rotated per
  frame.
* :class:`EtC` is block-wise encryption-then-compression (Chuman, Sirichotedumrong, Kiya 2019):
  4x4 blocks, block shuffle, rotation and flip (the 8 symmetries of the square), negative-positive
  (``max_dn - x``) and, on colour mosaics, a shuffle of the four packed CFA planes per block.
* :class:`ELE` is extended learnable encryption (Madono et al. 2020, after Tanaka's LE 2018): block
  shuffle, then with a separate key per block a shuffle of the block's samples and a bit-wise
  negative-positive, ``x XOR m`` with a random ``bit_depth``-bit mask per sample. LE's nibble-wise
  negative-positive is the special case of masks made of all-ones or all-zeros nibbles; LE's
  nibble shuffle between colour channels does not apply to a one-channel mosaic.
* :class:`ImageToPerturbation` (Ito, Kinoshita, Kiya, IEEE Access 2021) is a U-Net trained against
  the frozen plain classifier; see :func:`train_image_to_perturbation` for what differs from the
  paper (width, feature extractor).

The literature runs block-wise schemes through networks adapted to the encrypted domain; here the
authorised EtC/ELE user inverts with the key and runs the plain model, which measures the
scheme's protection, not an adaptation network. Keyed stages derive everything from
``key.subkey(purpose, ...)`` subkeys (see :func:`block_subkey`); no stage prints key material.
Colour (CFA) frames: EtC and ELE act on the four packed planes (:func:`sensor.cfa.pack`), so a
block is 4 x b x b samples and covers 2b x 2b mosaic pixels; mono frames use the (H, W) grid.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sensor.cfa import pack
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.permutation import keystream_words
from sensor.readout import ReadoutPermutation, readout_permutation

from ..stream.classifier import KeyedClassifier
from ..stream.inputs import network_input, to_dn
from .unet import UNet

RELATIONS = ("equal", "negate", "xor")  # how a protected sample relates to its plain source (attacks)
METHOD_NAMES = ("readout-static", "readout-rotating", "etc-static", "etc-rotating", "ele-static", "ele-rotating",
                "i2p")


# ----------------------------------------------------------------------------------------------
# Frames and the interface
# ----------------------------------------------------------------------------------------------


MONO10 = FrameFormat(16, 1023, "mono")  # levels of configs/sensors/mono10.yaml, the default spec


def check_frames(frames: np.ndarray, frame_indices: np.ndarray | list[int], max_dn: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate (B, H, W) uint16 frames and (B,) non-negative frame indices; returns both (indices int64)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint16 or frames.ndim != 3:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames: expected a (B, H, W) uint16 array, got {got}")
    idx = np.asarray(frame_indices)
    if idx.shape != (len(frames),) or (idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)):
        raise ValueError(f"frame_indices: expected ({len(frames)},) non-negative ints, got {idx.dtype} {idx.shape}")
    if max_dn is not None and frames.size and int(frames.max()) > max_dn:
        raise ValueError(f"frames: values above max_dn={max_dn} (got {int(frames.max())})")
    return np.ascontiguousarray(frames), idx.astype(np.int64)


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


class Protection(ABC):
    """One protection stage. Subclasses set the class attributes and implement :meth:`protect`.

    Attributes:
        name: method name (one of :data:`METHOD_NAMES` for the built-in stages).
        keyed: whether a secret key drives the stage.
        invertible: whether :meth:`restore` exists (for keyed stages: with the key).
        relation: how a protected sample relates to the plain sample it came from, for the
            known-plaintext attack: "equal" (a pure permutation), "negate" (the sample or
            ``max_dn`` minus it), "xor" (the sample XOR a secret constant), or None when the stage
            is not a position permutation at all.
        spec: the frames' levels and colour filter.
    """

    name: str = "protection"
    keyed: bool = False
    invertible: bool = False
    relation: str | None = None

    def __init__(self, spec: FrameFormat) -> None:
        self.spec = spec

    @abstractmethod
    def protect(self, frames: np.ndarray, frame_indices: np.ndarray | list[int]) -> np.ndarray:
        """(B, H, W) uint16 plain frames, (B,) frame indices -> (B, H, W) uint16 protected frames."""

    def restore(self, frames: np.ndarray, frame_indices: np.ndarray | list[int]) -> np.ndarray:
        """Inverse of :meth:`protect` where the stage is invertible."""
        raise NotImplementedError(f"{self.name}: not invertible, there is no restore")

    @abstractmethod
    def authorised_logits(self, model: nn.Module, frames: np.ndarray, frame_indices: np.ndarray | list[int],
                          batch: int = 500) -> torch.Tensor:
        """(B, num_classes) logits of the authorised path on protected frames, on the model's device."""

    def position_tables(self, height: int, width: int, frame_indices: np.ndarray | list[int]) -> np.ndarray:
        """(B, H*W) int64 slot->position tables (``prot.flat[s]`` came from ``plain.flat[t[s]]``).

        Ground truth for scoring the known-plaintext attack; only position-permuting stages have it.
        """
        raise NotImplementedError(f"{self.name}: not a position permutation, it has no position table")

    def with_key(self, key: Key) -> Protection:
        """The same stage under another key (what a holder of the wrong key gets)."""
        raise NotImplementedError(f"{self.name}: keyless, there is no other key")

    def describe(self) -> dict[str, Any]:
        """Public description (never key material)."""
        return {"method": self.name, "keyed": self.keyed, "invertible": self.invertible, "relation": self.relation}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.describe().items())})"


def _logits_in_batches(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    device = _model_device(model)
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[s:s + batch].to(device)) for s in range(0, len(x), batch)])


# ----------------------------------------------------------------------------------------------
# Keyed ADC readout
# ----------------------------------------------------------------------------------------------


class ReadoutProtection(Protection):
    """The keyed ADC readout (:mod:`sensor.readout`): static, or rotated per frame (key, n).

    The authorised classifier is the keyed twin (:class:`pipeline.stream.classifier.KeyedClassifier`), which
    reads the protected frames without ever unscrambling them.

    Args:
        key: the secret key.
        scheme: "pixel", "quad" or "plane" (also the network input layout).
        rotation: a fresh permutation per frame instead of one static permutation.
        spec: frame levels.
        mode: keyed network mode, "fused" or "fast".
    """

    keyed = True
    invertible = True
    relation = "equal"

    def __init__(self, key: Key, scheme: str = "pixel", rotation: bool = False,
                 spec: FrameFormat = MONO10, mode: str = "fused") -> None:
        super().__init__(spec)
        self.key, self.scheme, self.rotation, self.mode = key, scheme, bool(rotation), mode
        self.name = f"readout-{'rotating' if rotation else 'static'}"
        self._static: dict[tuple[int, int], ReadoutPermutation] = {}
        self._classifier: tuple[nn.Module, tuple[int, int], KeyedClassifier] | None = None

    def _orders(self, h: int, w: int, idx: np.ndarray) -> list[ReadoutPermutation]:
        if self.rotation:
            return [readout_permutation(self.key, self.scheme, h, w, int(n)) for n in idx]
        if (h, w) not in self._static:
            self._static[(h, w)] = readout_permutation(self.key, self.scheme, h, w)
        return [self._static[(h, w)]]

    def _apply(self, frames: np.ndarray, frame_indices, inverse: bool) -> np.ndarray:
        frames, idx = check_frames(frames, frame_indices)
        h, w = frames.shape[1:]
        orders = self._orders(h, w, idx)
        if not self.rotation:
            return orders[0].inverse(frames) if inverse else orders[0].forward(frames)
        out = np.empty_like(frames)
        for i, order in enumerate(orders):
            out[i] = order.inverse(frames[i]) if inverse else order.forward(frames[i])
        return out

    def protect(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        return self._apply(frames, frame_indices, inverse=False)

    def restore(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        return self._apply(frames, frame_indices, inverse=True)

    def position_tables(self, height: int, width: int, frame_indices) -> np.ndarray:
        idx = np.asarray(frame_indices, np.int64)
        orders = self._orders(height, width, idx)
        tables = np.stack([o.table() for o in orders])
        return tables if self.rotation else np.repeat(tables, len(idx), axis=0)

    def keyed_classifier(self, model: nn.Module, height: int, width: int) -> KeyedClassifier:
        """The keyed twin of ``model`` for (height, width) frames (built once per model and size)."""
        cached = self._classifier
        if cached is None or cached[0] is not model or cached[1] != (height, width):
            fmt = replace(self.spec, scheme=self.scheme, rotation=self.rotation, height=height, width=width)
            clf = KeyedClassifier(model, self.key, fmt, mode=self.mode, device=_model_device(model),
                                  check_fingerprint=False)
            self._classifier = cached = (model, (height, width), clf)
        return cached[2]

    def authorised_logits(self, model: nn.Module, frames: np.ndarray, frame_indices, batch: int = 500
                          ) -> torch.Tensor:
        frames, idx = check_frames(frames, frame_indices)
        clf = self.keyed_classifier(model, *frames.shape[1:])
        out = [clf.logits_array(frames[s:s + batch], idx[s:s + batch]) for s in range(0, len(frames), batch)]
        return torch.cat(out) if out else torch.empty(0)

    def with_key(self, key: Key) -> ReadoutProtection:
        return ReadoutProtection(key, self.scheme, self.rotation, self.spec, self.mode)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scheme": self.scheme, "rotation": self.rotation,
                "key_fingerprint": self.key.fingerprint}


# ----------------------------------------------------------------------------------------------
# Block-wise baselines (EtC, ELE): a position table plus an XOR mask
# ----------------------------------------------------------------------------------------------


def block_layout(height: int, width: int, block: int, cfa: str = "mono") -> np.ndarray:
    """Flat frame position of every sample, grouped into blocks.

    Mono: blocks of b x b pixels of the (H, W) grid, P = 1. Colour: blocks of the four packed CFA
    planes (:func:`sensor.cfa.pack`), P = 4, each block 4 x b x b samples (2b x 2b mosaic pixels).

    Returns:
        (nb, P, b, b) int64, blocks in raster order.
    """
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    planes = grid[None] if cfa == "mono" else pack(grid)
    p, h, w = planes.shape
    if block < 1 or h % block or w % block:
        unit = "pixels" if cfa == "mono" else "pixels of each packed plane (half the mosaic size)"
        raise ValueError(f"block: {h}x{w} {unit} must be a multiple of block={block} in both directions")
    return planes.reshape(p, h // block, block, w // block, block).transpose(1, 3, 0, 2, 4).reshape(-1, p, block,
                                                                                                   block)


def _table_from_layout(layout: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Slot->position table: the slot at ``layout[i]`` receives the plain sample at ``source[i]``."""
    table = np.empty(layout.size, np.int64)
    table[layout.reshape(-1)] = source.reshape(-1)
    return table


def _keystream(subkey: bytes, label: int, n: int) -> np.ndarray:
    """(n,) uint64 keystream words of stream ``label`` (AES-256-CTR under the stage's subkey)."""
    return keystream_words(subkey, label, 2 * n).view(np.uint64)


def _dihedral(blocks: np.ndarray, t: int) -> np.ndarray:
    """Symmetry t in 0..7 of the square on the last two axes: rotate by 90 * (t % 4), then transpose if t >= 4."""
    out = np.rot90(blocks, t % 4, axes=(-2, -1))
    return np.swapaxes(out, -2, -1) if t >= 4 else out


def etc_table(subkey: bytes, height: int, width: int, block: int, cfa: str, max_dn: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """EtC as a position table and an XOR mask (negative-positive is ``x XOR max_dn``).

    Steps, each driven by its own keystream of ``subkey``: block shuffle, a symmetry of the square per block
    (4 rotations x flip), channel (packed CFA plane) shuffle per block on colour frames,
    negative-positive per block.

    Returns:
        table (H*W,) int64 with ``prot.flat[s] = plain.flat[table[s]] ^ mask[s]``; mask (H*W,) uint16.
    """
    layout = block_layout(height, width, block, cfa)
    nb, p = layout.shape[:2]
    src = layout[np.argsort(_keystream(subkey, 0, nb), kind="stable")]  # block shuffle
    turns = (_keystream(subkey, 1, nb) % np.uint64(8)).astype(np.int64)
    for t in range(1, 8):
        sel = turns == t
        src[sel] = _dihedral(src[sel], t)
    if p > 1:
        chan = np.argsort(_keystream(subkey, 2, nb * p).reshape(nb, p), axis=1, kind="stable")
        src = src[np.arange(nb)[:, None], chan]
    negate = (_keystream(subkey, 3, nb) & np.uint64(1)).astype(bool)
    mask_layout = np.broadcast_to(np.where(negate, max_dn, 0).astype(np.uint16)[:, None, None, None], layout.shape)
    mask = np.empty(layout.size, np.uint16)
    mask[layout.reshape(-1)] = mask_layout.reshape(-1)
    return _table_from_layout(layout, src), mask


def ele_table(subkey: bytes, height: int, width: int, block: int, cfa: str, max_dn: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """ELE as a position table and an XOR mask.

    Block shuffle, then per block (from the stage's keystreams): a shuffle of the block's
    P*b*b samples and a random ``bit_depth``-bit XOR mask per sample (bit-wise negative-positive).

    Returns:
        table (H*W,) int64 with ``prot.flat[s] = plain.flat[table[s]] ^ mask[s]``; mask (H*W,) uint16.
    """
    layout = block_layout(height, width, block, cfa)
    nb = layout.shape[0]
    m = layout[0].size
    src = layout[np.argsort(_keystream(subkey, 0, nb), kind="stable")].reshape(nb, m)
    inner = np.argsort(_keystream(subkey, 1, nb * m).reshape(nb, m), axis=1, kind="stable")
    src = np.take_along_axis(src, inner, axis=1)
    mask = (_keystream(subkey, 2, height * width) & np.uint64(max_dn)).astype(np.uint16)
    return _table_from_layout(layout, src), mask


def block_subkey(key: Key, purpose: str, frame_index: int | None = None) -> bytes:
    """Subkey of a block-wise stage: ``key.subkey(purpose)`` (static) or ``key.subkey(purpose + "/frame", n)``."""
    return key.subkey(purpose) if frame_index is None else key.subkey(f"{purpose}/frame", int(frame_index))


class BlockProtection(Protection):
    """Shared machinery of EtC and ELE: ``prot.flat[s] = plain.flat[table[s]] ^ mask[s]``.

    Args:
        key: the secret key.
        block: block side in samples (of the packed planes on colour frames).
        rotation: a fresh table and mask per frame (key, n) instead of one static pair.
        spec: frame levels and colour filter.
    """

    keyed = True
    invertible = True
    family = "block"

    def __init__(self, key: Key, block: int = 4, rotation: bool = False, spec: FrameFormat = MONO10
                 ) -> None:
        super().__init__(spec)
        self.key, self.block, self.rotation = key, int(block), bool(rotation)
        self.name = f"{self.family}-{'rotating' if rotation else 'static'}"
        self._static: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @abstractmethod
    def _build(self, subkey: bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(table (H*W,) int64, mask (H*W,) uint16) for one subkey."""

    def tables(self, height: int, width: int, frame_indices) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame (B, H*W) tables and (B, H*W) masks (static: the same row repeated)."""
        idx = np.asarray(frame_indices, np.int64)
        purpose = f"{self.family}/b{self.block}"
        if self.rotation:
            pairs = [self._build(block_subkey(self.key, purpose, int(n)), height, width) for n in idx]
            if not pairs:
                n = height * width
                return np.empty((0, n), np.int64), np.empty((0, n), np.uint16)
            return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        if (height, width) not in self._static:
            self._static[(height, width)] = self._build(block_subkey(self.key, purpose), height, width)
        table, mask = self._static[(height, width)]
        return np.broadcast_to(table, (len(idx), table.size)), np.broadcast_to(mask, (len(idx), mask.size))

    def protect(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        frames, idx = check_frames(frames, frame_indices, self.spec.max_dn)
        b, h, w = frames.shape
        table, mask = self.tables(h, w, idx)
        return (np.take_along_axis(frames.reshape(b, -1), table, axis=1) ^ mask).reshape(b, h, w)

    def restore(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        frames, idx = check_frames(frames, frame_indices, self.spec.max_dn)
        b, h, w = frames.shape
        table, mask = self.tables(h, w, idx)
        out = np.empty((b, h * w), np.uint16)
        np.put_along_axis(out, table, frames.reshape(b, -1) ^ mask, axis=1)
        return out.reshape(b, h, w)

    def position_tables(self, height: int, width: int, frame_indices) -> np.ndarray:
        return np.ascontiguousarray(self.tables(height, width, frame_indices)[0])

    def authorised_logits(self, model: nn.Module, frames: np.ndarray, frame_indices, batch: int = 500
                          ) -> torch.Tensor:
        """Restore with the key, then the plain model (not an adaptation network)."""
        return _logits_in_batches(model, network_input(self.restore(frames, frame_indices), self.spec), batch)

    def with_key(self, key: Key) -> BlockProtection:
        return type(self)(key, self.block, self.rotation, self.spec)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block": self.block, "rotation": self.rotation,
                "key_fingerprint": self.key.fingerprint}


class EtC(BlockProtection):
    """Block-wise EtC (see :func:`etc_table`); negative-positive makes the relation "negate"."""

    family = "etc"
    relation = "negate"

    def _build(self, subkey: bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return etc_table(subkey, height, width, self.block, self.spec.cfa, self.spec.max_dn)


class ELE(BlockProtection):
    """Extended learnable encryption with per-block keys (see :func:`ele_table`); relation "xor"."""

    family = "ele"
    relation = "xor"

    def _build(self, subkey: bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return ele_table(subkey, height, width, self.block, self.spec.cfa, self.spec.max_dn)


# ----------------------------------------------------------------------------------------------
# Image to Perturbation
# ----------------------------------------------------------------------------------------------


def to_classifier_layout(y: torch.Tensor, scheme: str) -> torch.Tensor:
    """(B, 1, H, W) normalised mosaic -> the classifier's input layout (differentiable twin of
    :func:`pipeline.stream.inputs.network_input` on normalised values)."""
    if scheme == "pixel":
        return y
    return torch.stack([y[:, 0, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=1)


class ImageToPerturbation(Protection):
    """A trained transform h: frame -> ``sigmoid(h(frame))`` scaled back to [black_level, max_dn].

    Keyless and not invertible (nothing guarantees h is one-to-one and no inverse is trained); the
    authorised path, like anyone else's, is the unchanged plain model on the transformed frames.
    Build one with :func:`train_image_to_perturbation`.
    """

    name = "i2p"
    keyed = False
    invertible = False
    relation = None

    def __init__(self, transform: UNet, spec: FrameFormat, batch: int = 500) -> None:
        super().__init__(spec)
        self.transform = transform.eval()
        self.batch = batch

    def protect(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        frames, _ = check_frames(frames, frame_indices)
        device = _model_device(self.transform)
        x = network_input(frames, self.spec, "pixel")
        out = np.empty_like(frames)
        self.transform.eval()
        with torch.inference_mode():
            for s in range(0, len(x), self.batch):
                out[s:s + self.batch] = to_dn(torch.sigmoid(self.transform(x[s:s + self.batch].to(device))), self.spec)
        return out

    def restore(self, frames: np.ndarray, frame_indices) -> np.ndarray:
        raise NotImplementedError("i2p: the transform network is not invertible (no key, no inverse); the classifier "
                                  "reads the transformed frames directly")

    def authorised_logits(self, model: nn.Module, frames: np.ndarray, frame_indices, batch: int = 500
                          ) -> torch.Tensor:
        check_frames(frames, frame_indices)
        return _logits_in_batches(model, network_input(frames, self.spec), batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "unet": dict(self.transform.config)}


def classifier_first_block(model: nn.Module) -> nn.Sequential:
    """The classifier's first conv with the BatchNorm/ReLU right after it (frozen, eval): the
    perceptual feature extractor of :func:`train_image_to_perturbation` by default.

    Walks the leaf modules of nested Sequentials in order; raises if the first leaf is not a Conv2d.
    """
    leaves: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.Sequential):
                walk(child)
            else:
                leaves.append(child)

    walk(model)
    if not leaves or not isinstance(leaves[0], nn.Conv2d):
        raise ValueError("features: the classifier does not start with a Conv2d; use features='random'")
    block = [leaves[0]]
    for m in leaves[1:]:
        if not isinstance(m, (nn.BatchNorm2d, nn.ReLU)):
            break
        block.append(m)
    return _frozen(copy.deepcopy(nn.Sequential(*block)))


def random_features(in_channels: int, seed: int = 0) -> nn.Sequential:
    """A fixed random conv stack (conv3x3 16 - ReLU - conv3x3 32 - ReLU), He-initialised from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.zero_()
    return _frozen(net)


def _frozen(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@dataclass(frozen=True)
class I2PTraining:
    """Training budget of the Image-to-Perturbation transform (defaults: the paper's loss weight 0.01)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    feature_weight: float = 0.01
    features: str = "classifier"  # "classifier": its first conv block; "random": a fixed random conv stack
    width: int = 16
    levels: int = 3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_image_to_perturbation(classifier: nn.Module, frames: np.ndarray, labels: np.ndarray, spec: FrameFormat,
                                cfg: I2PTraining | None = None, progress: bool = False,
                                device: torch.device | str | None = None) -> tuple[ImageToPerturbation, dict]:
    """Train h against the frozen plain classifier ``f``:

        loss = CE(f(sigmoid(h(x))), y) - feature_weight * MSE(phi(sigmoid(h(x))), phi(x))

    ``x`` is the normalised plain frame, ``phi`` a fixed feature extractor. The paper's ``phi`` is
    an ImageNet-pretrained VGG (not downloadable here); ``cfg.features`` picks the frozen
    classifier's own first conv block (default) or a fixed random conv stack.

    Args:
        classifier: the plain model (kept frozen; its parameters are not changed).
        frames: (N, H, W) uint16 plain training frames; labels (N,) int.

    Returns:
        (the protection stage, a training log dict: wall seconds, final CE and feature MSE).
    """
    cfg = cfg or I2PTraining()
    if cfg.features not in ("classifier", "random"):
        raise ValueError(f"features: expected 'classifier' or 'random', got {cfg.features!r}")
    device = torch.device(device) if device is not None else _model_device(classifier)
    torch.manual_seed(cfg.seed)
    classifier = classifier.to(device).eval()
    requires = [p.requires_grad for p in classifier.parameters()]
    for p in classifier.parameters():
        p.requires_grad_(False)
    scheme = spec.input_scheme
    in_ch = 1 if scheme == "pixel" else 4
    phi = classifier_first_block(classifier) if cfg.features == "classifier" else random_features(in_ch, cfg.seed)
    phi = phi.to(device)
    net = UNet(1, 1, cfg.width, cfg.levels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x_all = network_input(frames, spec, "pixel")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    gen = torch.Generator().manual_seed(cfg.seed)
    log: dict[str, Any] = {"epochs": []}
    t0 = time.perf_counter()
    try:
        for epoch in tqdm(range(cfg.epochs), desc="i2p: train transform", disable=not progress, leave=False):
            net.train()
            order = torch.randperm(len(x_all), generator=gen)
            ce_sum = feat_sum = 0.0
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                x, y = x_all[idx].to(device), y_all[idx].to(device)
                h = torch.sigmoid(net(x))
                ce = F.cross_entropy(classifier(to_classifier_layout(h, scheme)), y)
                with torch.no_grad():
                    target = phi(to_classifier_layout(x, scheme))
                feat = F.mse_loss(phi(to_classifier_layout(h, scheme)), target)
                loss = ce - cfg.feature_weight * feat
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += ce.item() * len(idx)
                feat_sum += feat.item() * len(idx)
            log["epochs"].append({"epoch": epoch + 1, "cross_entropy": ce_sum / len(order),
                                  "feature_mse": feat_sum / len(order)})
    finally:
        for p, r in zip(classifier.parameters(), requires, strict=True):
            p.requires_grad_(r)
    log["wall_s"] = time.perf_counter() - t0
    return ImageToPerturbation(net.eval(), spec), log


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------


def build_protection(method: str, key: Key | None, spec: FrameFormat, scheme: str = "pixel", block: int = 4,
                     i2p: ImageToPerturbation | None = None) -> Protection:
    """A protection stage by name (:data:`METHOD_NAMES`); "i2p" needs the trained stage passed in."""
    if method == "i2p":
        if i2p is None:
            raise ValueError("i2p: train the transform first (train_image_to_perturbation)")
        return i2p
    if method not in METHOD_NAMES:
        raise ValueError(f"method: expected one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if key is None:
        raise ValueError(f"{method}: a keyed stage needs a key")
    family, mode = method.split("-")
    rotation = mode == "rotating"
    if family == "readout":
        return ReadoutProtection(key, scheme, rotation, spec)
    return (EtC if family == "etc" else ELE)(key, block, rotation, spec)
