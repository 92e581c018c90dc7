"""Plain-model checkpoints with a manifest, and training state for resume.

A shipped checkpoint is two files: ``NAME.pt`` (the plain model's state_dict and how to build
it) and ``NAME.json`` (the manifest: architecture, dataset, sensor profile, scheme, accuracy,
and the SHA-256 of ``NAME.pt``). Loading checks the hash and refuses a changed file.

Checkpoints hold weights only. The keyed twin's gather tables are the key and are derived from
the key file when the keyed model is built; :func:`save_checkpoint` refuses a state_dict that
holds anything not in the plain model.

Every file is read through :func:`safe_torch_load` (``weights_only=True``: tensors and plain
containers, never code), and every payload is checked (a dict with the expected keys, an
architecture that builds, weights that fit it) before use, so a file placed beside an output, or a
checkpoint whose hash matches but whose payload is wrong, gives a one-line CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensor.atomic import atomic_path
from sensor.errors import InputFileError, PrivcamError
from sensor.safeio import open_regular, read_text

from .plain import MODEL_NAMES, build_model

ARCH_KEYS = ("name", "in_channels", "num_classes")
TRAINING_STATE_KEYS = ("config", "model", "optimizer", "scheduler", "epoch", "history", "wall_s")


class CheckpointError(PrivcamError):
    """A checkpoint or its manifest is missing, changed or inconsistent."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with _open(path, "a checkpoint file") as fh:
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


def _open(path: str | os.PathLike, what: str):
    try:
        return open_regular(path, what)
    except InputFileError as err:
        raise CheckpointError(str(err)) from None


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` of a regular file with ``weights_only=True``: tensors and plain containers only.

    A file that holds anything else (a pickled object, which could run code) or is not a torch file at
    all raises CheckpointError; nothing in it is executed.
    """
    with _open(path, f"a {what} file") as fh:
        try:
            return torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not re.search(r"\bglobal\b", str(err), re.IGNORECASE):  # not a pickled object: damaged data
                raise CheckpointError(f"{path}: not a readable {what} (damaged or not a torch file)") from None
            raise CheckpointError(f"{path}: {what} holds objects other than tensors and plain containers; "
                                  "refusing to load it (only weights are ever loaded, never code)") from None
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{path}: not a readable {what} ({type(err).__name__}: {first[:200]})") from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    mpath = manifest_path(path)
    if not mpath.exists():
        raise CheckpointError(f"{mpath}: manifest not found beside the checkpoint")
    try:
        manifest = json.loads(read_text(mpath, "a JSON manifest"))
    except InputFileError as err:
        raise CheckpointError(str(err)) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{mpath}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: expected a JSON object (the manifest), got {type(manifest).__name__}")
    return manifest


def check_arch(source: str | os.PathLike, arch: Any) -> dict[str, Any]:
    """An architecture mapping {name, in_channels, num_classes} with known values, else CheckpointError."""
    if not isinstance(arch, dict) or set(arch) != set(ARCH_KEYS):
        got = sorted(arch) if isinstance(arch, dict) else type(arch).__name__
        raise CheckpointError(f"{source}: arch: expected a mapping with exactly the keys {list(ARCH_KEYS)}, "
                              f"got {got}")
    if arch["name"] not in MODEL_NAMES:
        raise CheckpointError(f"{source}: arch.name: expected one of {', '.join(MODEL_NAMES)}, got {arch['name']!r}")
    for name, high in (("in_channels", 64), ("num_classes", 100_000)):
        value = arch[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise CheckpointError(f"{source}: arch.{name}: expected an integer in [1, {high}], got {value!r}")
    return dict(arch)


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
    payload = safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or not {"arch", "state_dict"} <= set(payload):
        got = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected a checkpoint dict with 'arch' and 'state_dict', got {got}")
    if payload.get("arch") != manifest.get("arch"):
        raise CheckpointError(f"{path}: architecture differs from its manifest")
    arch = check_arch(path, payload["arch"])
    model = build_model(**arch)
    _load_weights(path, model, payload["state_dict"], f"a plain {arch['name']} {arch}")
    return model.to(device).eval(), manifest


def _load_weights(path: str | os.PathLike, module: Any, state: Any, what: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: state_dict: expected a mapping of names to tensors, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True) if isinstance(module, nn.Module) else module.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - missing/unexpected keys, wrong shapes or types
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first line only says "Error(s) in loading"
        raise CheckpointError(f"{path}: the weights do not fit {what}: {detail[:300]}") from None


def first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def check_model_input(model: nn.Module, manifest: dict[str, Any], shape: tuple[int, int, int], given_by: str,
                      source: str | os.PathLike = "checkpoint") -> None:
    """Refuse a network input ``shape`` (C, h, w) the checkpoint's model cannot take, naming both.

    ``given_by`` says where the shape comes from, e.g. "the quad scheme on 96x144 RGGB frames".
    """
    c, h, w = shape
    want = first_conv_channels(model)
    trained = manifest.get("input_shape")
    at = f" at {trained[1]}x{trained[2]}" if isinstance(trained, list) and len(trained) == 3 else ""
    expects = f"{want} channel{'s' if want != 1 else ''}{at}"
    gives = f"{c} channel{'s' if c != 1 else ''} at {h}x{w}"
    if want is not None and want != c:
        raise CheckpointError(f"{source}: this checkpoint expects {expects}; {given_by} gives {gives}")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, c, h, w, device=device))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or ["RuntimeError"])[0]
        raise CheckpointError(f"{source}: this checkpoint expects {expects}; {given_by} gives {gives} "
                              f"({first[:200]})") from None
    finally:
        model.train(was_training)


def trained_input_shape(manifest: dict[str, Any], source: str | os.PathLike = "checkpoint"
                        ) -> tuple[int, int, int] | None:
    """The manifest's ``input_shape`` (C, h, w) (what :func:`pipeline.lab.train.train` trained on), None when
    the manifest does not say; a value that is not three positive integers is a CheckpointError."""
    shape = manifest.get("input_shape")
    if shape is None:
        return None
    if (not isinstance(shape, list) or len(shape) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 16 for v in shape)):
        raise CheckpointError(f"{manifest_path(source)}: input_shape: expected [C, h, w], three integers in "
                              f"[1, 65536], got {shape!r}")
    return shape[0], shape[1], shape[2]


def model_input_hw(model: nn.Module, manifest: dict[str, Any], shape: tuple[int, int, int], given_by: str,
                   source: str | os.PathLike = "checkpoint") -> tuple[int, int] | None:
    """The model input (h, w) the front end must resample a network input ``shape`` (C, H, W) to, or None
    when ``shape`` is fed as it is.

    The model's input is the manifest's ``input_shape`` (C, h, w). Frames whose network input is larger
    (H >= h, W >= w) go through the front end (:mod:`models.frontend`: INTER_AREA / binning, plain and
    keyed) to (h, w); frames of the model's size, and frames for a checkpoint whose manifest has no
    ``input_shape``, are fed as they are (checked by :func:`check_model_input`). A CheckpointError names
    both shapes when the channel counts differ or the frames are smaller than the model's input (the front
    end only downscales). ``given_by`` says where ``shape`` comes from, e.g. "the quad scheme on 96x144
    RGGB frames".
    """
    trained = trained_input_shape(manifest, source)
    c, h, w = shape
    if trained is None or trained[0] != c or (h, w) == trained[1:]:
        check_model_input(model, manifest, shape, given_by, source)
        if trained is not None and trained[0] != c:  # a model whose first layer takes any channel count
            raise CheckpointError(f"{source}: this checkpoint expects {trained[0]} channels at {trained[1]}x"
                                  f"{trained[2]}; {given_by} gives {c} channels at {h}x{w}")
        return None
    _, mh, mw = trained
    if h < mh or w < mw:
        raise CheckpointError(f"{source}: this checkpoint expects {c} channel{'s' if c != 1 else ''} at {mh}x{mw}; "
                              f"{given_by} gives {h}x{w}, smaller than the model's input (the front end only "
                              f"downscales: expose the scenes at a larger sensor size, frame_size)")
    check_model_input(model, manifest, trained, f"the front end's output of {given_by}", source)
    return mh, mw


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a resumable training state (model, optimiser, epoch, RNG states)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The training state saved by :func:`save_training_state`, or None when there is none.

    Read with ``weights_only=True`` (a pickle placed beside the output cannot run code) and checked
    for the keys and types :func:`pipeline.lab.train.train` uses; anything else is a CheckpointError.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    state = safe_torch_load(path, "training state")
    hint = "(delete it to start the training over)"
    if not isinstance(state, dict) or not set(TRAINING_STATE_KEYS) <= set(state):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected a training state with keys {list(TRAINING_STATE_KEYS)}, "
                              f"got {got} {hint}")
    types = {"config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "history": list,
             "wall_s": (int, float)}
    for name, kind in types.items():
        if isinstance(state[name], bool) or not isinstance(state[name], kind):
            raise CheckpointError(f"{path}: {name}: expected {getattr(kind, '__name__', 'a number')}, "
                                  f"got {type(state[name]).__name__} {hint}")
    if state["epoch"] < 0 or not all(isinstance(h, dict) for h in state["history"]):
        raise CheckpointError(f"{path}: epoch/history: expected a count >= 0 and a list of epochs {hint}")
    return state


def load_state_into(path: str | os.PathLike, module: Any, state: Any, what: str) -> None:
    """``module.load_state_dict(state)`` with a CheckpointError naming ``path`` when it does not fit."""
    _load_weights(path, module, state, what)
