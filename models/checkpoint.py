"""Plain-model checkpoints with a manifest, and training state for resume.

A shipped checkpoint is two files: ``NAME.pt`` (the plain model's state_dict and how to build
it) and ``NAME.json`` (the manifest: architecture, dataset, sensor profile, scheme, accuracy,
and the SHA-256 of ``NAME.pt``). Loading checks the hash and refuses a changed file.

Checkpoints hold weights only. The keyed twin's gather tables are the key and are derived from
the key file when the keyed model is built; :func:`save_checkpoint` refuses a state_dict that
holds anything not in the plain model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensor.atomic import atomic_path
from sensor.errors import PrivcamError

from .plain import build_model


class CheckpointError(PrivcamError):
    """A checkpoint or its manifest is missing, changed or inconsistent."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: dict[str, Any],
                    info: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (.pt) and its manifest. ``arch`` = {name, in_channels, num_classes}.

    Returns the manifest.
    """
    path = Path(path)
    plain_keys = set(build_model(**arch).state_dict())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra = set(state) - plain_keys
    if extra or set(state) != plain_keys:
        raise CheckpointError(f"{path}: state_dict does not match a plain {arch['name']} "
                              f"(unexpected {sorted(extra)[:3]}); save the plain model, not a keyed twin")
    with atomic_path(path) as tmp:
        torch.save({"arch": dict(arch), "state_dict": state}, tmp)
    manifest = {"file": path.name, "sha256": sha256_file(path), "arch": dict(arch), **info}
    with atomic_path(manifest_path(path)) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    mpath = manifest_path(path)
    try:
        return json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: manifest not found beside the checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{mpath}: not valid JSON: {err}") from None


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Verify the manifest hash, then build the plain model and load its weights (eval mode)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (privcam train writes one; the shipped one is "
                              f"models/weights/compact_fashion_mnist_pixel.pt)")
    manifest = read_manifest(path)
    actual = sha256_file(path)
    if manifest.get("sha256") != actual:
        raise CheckpointError(f"{path}: SHA-256 {actual[:16]}... differs from the manifest's "
                              f"{str(manifest.get('sha256'))[:16]}...; the file was changed, refusing to load")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("arch") != manifest.get("arch"):
        raise CheckpointError(f"{path}: architecture differs from its manifest")
    model = build_model(**payload["arch"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise CheckpointError(f"{path}: the weights do not fit a {payload['arch']}: "
                              f"{detail[:200]}{'...' if len(detail) > 200 else ''}") from None
    return model.to(device).eval(), manifest


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a resumable training state (model, optimiser, epoch, RNG states)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
