"""``privcam eval privacy``: every protection method under the same attacks, side by side.

For each method (:data:`pipeline.lab.protection.METHOD_NAMES`) one row of:

* ``authorised_accuracy``: the authorised path (:meth:`Protection.authorised_logits`);
* ``unauthorised_accuracy``: the plain model on the protected frames, no key (for the keyless
  I2P this *is* the authorised path: its protection is visual, not access control);
* ``wrong_key_accuracy``: the authorised path built from another key (keyed methods);
* ``finetune_attack_accuracy`` and ``mlp_attack_accuracy``: the attacks of ``privcam eval accuracy``;
* ``known_plaintext_recovered``: fraction of positions recovered from k = 1, 2, 4, 8 known pairs
  (the attacker's frames), scored against the tables of held-out test frames, so a table recovered
  under a rotating key scores what it is worth on future frames (chance, about 1/(H*W));
  ``known_plaintext_decrypt_ssim``: SSIM of the test frames decrypted with the attacker's best guess
  of the table (ambiguous slots get one of their consistent positions, unmapped pixels black);
* ``inversion_ssim`` / ``inversion_psnr``: ITN-Attack reconstructions of the test frames;
* ``protected_ssim`` / ``protected_psnr``: protected frame vs plain frame (how much is visible);
* ``throughput_frames_per_s``: the protection stage alone, steady state (static tables built once;
  rotating keys build one table per frame, inside the timing).

With a :class:`pipeline.lab.floors.FloorBudget` the Fashion-MNIST table also gets ``floors``: per
readout scheme, the invariant learner to convergence, the jigsaw solver on single frames, and
known-plaintext across sessions (:mod:`pipeline.lab.floors`).

Frames are the sensor's real output (noise included) and images are metrics' "originals": SSIM and
PSNR are computed on the raw mosaic in DN with ``data_range = max_dn - black_level``. The test,
attacker and I2P-training frames come from disjoint images and frame indices.

Datasets: Fashion-MNIST with the shipped classifier (all columns), and the 20 real CIFAR-10 test
images in foolbox's wheel. There is no trained CIFAR-10 classifier here, so the CIFAR rows have no
accuracy columns and no I2P (its transform is trained against a classifier): only known-plaintext,
inversion, protected-frame similarity and throughput. Their inversion attacker trains on natural
32x32 patches from the same wheel (random crops of its 20 ImageNet photos and its 20 CIFAR-100
images), and all 20 CIFAR-10 images are held out.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import check_model_input, load_checkpoint
from sensor.config import SensorConfig
from sensor.configio import check_range
from sensor.errors import ConfigError
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.sensor import Sensor

from ..resources import COLOUR_PROFILE, resolve
from ..stream.datasets import CIFAR10_CLASSES, Dataset
from ..stream.inputs import input_shape, network_input
from ..stream.sources import expose_scenes
from .attacks import (
    finetune_attack,
    inversion_attack,
    known_plaintext_decrypt,
    known_plaintext_recovery,
    mlp_attack,
    psnr,
    recovery_fraction,
    ssim,
)
from .evaluate import ATTACK_FRAME_BASE, TEST_FRAME_BASE, AttackBudget, accuracy
from .floors import FloorBudget, floor_table, format_floors
from .protection import (
    METHOD_NAMES,
    I2PTraining,
    Protection,
    build_protection,
    train_image_to_perturbation,
)

I2P_FRAME_BASE = 20_000_000  # the defender's I2P training frames: indices disjoint from test and attacker frames
CIFAR_NOTE = ("no trained CIFAR-10 classifier: accuracy columns and I2P (trained against a classifier) are not "
              "measured; the inversion attacker trains on natural 32x32 patches (foolbox's ImageNet photos and "
              "CIFAR-100 images) and is tested on the 20 real CIFAR-10 images")


@dataclass(frozen=True)
class PrivacyBudget:
    """Data and training budgets of :func:`privacy_table` (the same for every method)."""

    test_images: int | None = 2000  # Fashion-MNIST test images (None: the whole split)
    attack_train_images: int = 2000  # attacker's labelled protected frames (fine-tune and MLP attacks)
    attack_epochs: int = 2
    inversion_train_images: int = 2000  # attacker's (protected, plain) pairs for the inversion attack
    inversion_epochs: int = 3
    inversion_width: int = 16
    i2p_train_images: int = 5000  # defender's plain frames to train the I2P transform
    i2p_epochs: int = 2
    i2p_feature_weight: float = 0.01
    i2p_features: str = "classifier"
    i2p_width: int = 16
    kpa_pairs: tuple[int, ...] = (1, 2, 4, 8)
    kpa_targets: int = 20  # held-out test frames whose true tables score the recovered table
    cifar_attack_images: int = 2000  # natural patches for the CIFAR inversion attacker
    seed: int = 0

    def __post_init__(self) -> None:
        src = "PrivacyBudget"
        if self.test_images is not None:
            check_range(src, "test_images", self.test_images, 1)
        for name in ("attack_train_images", "attack_epochs", "inversion_train_images", "inversion_epochs",
                     "inversion_width", "i2p_train_images", "i2p_epochs", "i2p_width", "kpa_targets",
                     "cifar_attack_images"):
            check_range(src, name, getattr(self, name), 1)
        check_range(src, "i2p_feature_weight", self.i2p_feature_weight, 0)
        check_range(src, "seed", self.seed, 0, 2**32 - 1)
        if not self.kpa_pairs or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.kpa_pairs):
            raise ConfigError(src, "kpa_pairs", "one or more integers >= 1", list(self.kpa_pairs))

    def attack_budget(self) -> AttackBudget:
        return AttackBudget(train_images=self.attack_train_images, epochs=self.attack_epochs, seed=self.seed)

    def i2p_training(self) -> I2PTraining:
        return I2PTraining(epochs=self.i2p_epochs, feature_weight=self.i2p_feature_weight,
                           features=self.i2p_features, width=self.i2p_width, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kpa_pairs": list(self.kpa_pairs)}


# ----------------------------------------------------------------------------------------------
# Frames and data
# ----------------------------------------------------------------------------------------------


_FOOLBOX_NAME = re.compile(r"(?:^|/)(?P<prefix>[a-zA-Z0-9]+)_(?P<i>\d+)_(?P<label>\d+)\.(?:png|jpg)$")


def foolbox_images(source: str | os.PathLike, prefix: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The sample images foolbox ships, ``foolbox/data/<prefix>_<i>_<label>.png|jpg``.

    Args:
        source: foolbox's wheel (``pip download --no-deps foolbox``) or a folder holding the files.
        prefix: "cifar10", "cifar100", "imagenet", "mnist" or "fashionMNIST".

    Returns:
        (RGB (H, W, 3) uint8 images in index order, (N,) int64 labels from the file names).
    """
    import cv2

    source = Path(source)
    if source.is_dir():
        blobs = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            blobs = {n: zf.read(n) for n in zf.namelist() if _FOOLBOX_NAME.search(n)}
    else:
        raise ValueError(f"{source}: expected foolbox's wheel (.whl) or a folder of its data files")
    found = []
    for name, blob in blobs.items():
        m = _FOOLBOX_NAME.search(name)
        if m and m["prefix"] == prefix:
            image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"{source}: {name}: not a readable image")
            found.append((int(m["i"]), int(m["label"]), cv2.cvtColor(image, cv2.COLOR_BGR2RGB)))
    if not found:
        raise ValueError(f"{source}: no {prefix}_<i>_<label>.png|jpg images (is it foolbox's wheel?)")
    found.sort(key=lambda t: t[0])
    return [f[2] for f in found], np.array([f[1] for f in found], np.int64)


def natural_patches(sources: Sequence[np.ndarray], count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random (size x size) RGB patches: a source image scaled so its short side is in
    [size, 4 size], a random crop, a random horizontal flip.

    Returns:
        (count, size, size, 3) uint8.
    """
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        img = sources[int(rng.integers(len(sources)))]
        h, w = img.shape[:2]
        short = min(h, w)
        target = int(rng.integers(size, max(size, min(short, 4 * size)) + 1))
        nh, nw = max(size, round(h * target / short)), max(size, round(w * target / short))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA) if (nh, nw) != (h, w) else img
        y0, x0 = int(rng.integers(nh - size + 1)), int(rng.integers(nw - size + 1))
        patch = img[y0:y0 + size, x0:x0 + size]
        out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
    return out


# ----------------------------------------------------------------------------------------------
# One method
# ----------------------------------------------------------------------------------------------


@dataclass
class Frames:
    """Plain frames (N, H, W) uint16 with their frame indices (N,) and labels (N,) or None."""

    plain: np.ndarray
    indices: np.ndarray
    labels: np.ndarray | None = None


def _timed_protect(protection: Protection, frames: Frames) -> tuple[np.ndarray, float]:
    """Protected frames and the stage's steady-state rate (frames/s): a 2-frame warm-up first."""
    protection.protect(frames.plain[:2], frames.indices[:2])
    t0 = time.perf_counter()
    out = protection.protect(frames.plain, frames.indices)
    return out, len(out) / max(time.perf_counter() - t0, 1e-9)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _preds_accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).cpu().numpy() == labels).mean())


def evaluate_method(protection: Protection, test: Frames, attack: Frames, spec: FrameFormat, budget: PrivacyBudget,
                    checkpoint: str | None = None, model: torch.nn.Module | None = None,
                    num_classes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """One row of the table for ``protection`` (accuracy columns only when ``model`` is given)."""
    t0 = time.perf_counter()
    h, w = test.plain.shape[1:]
    prot_test, rate = _timed_protect(protection, test)
    prot_attack = protection.protect(attack.plain, attack.indices)
    rng = spec.max_dn - spec.black_level
    row: dict[str, Any] = {**protection.describe(),
                           "protected_ssim": float(np.mean(ssim(prot_test, test.plain, rng))),
                           "protected_psnr": _finite(np.mean(psnr(prot_test, test.plain, rng))),
                           "throughput_frames_per_s": round(rate, 1),
                           "throughput_mpix_per_s": round(rate * h * w / 1e6, 3)}
    row.update(dict.fromkeys(("authorised_accuracy", "unauthorised_accuracy", "wrong_key_accuracy",
                              "finetune_attack_accuracy", "mlp_attack_accuracy")))
    if model is not None and test.labels is not None and attack.labels is not None:
        row["authorised_accuracy"] = _preds_accuracy(protection.authorised_logits(model, prot_test, test.indices),
                                                     test.labels)
        scheme = getattr(protection, "scheme", spec.input_scheme)
        x_test = network_input(prot_test, spec, scheme)
        row["unauthorised_accuracy"] = accuracy(model, x_test, test.labels)
        if protection.keyed:
            wrong = protection.with_key(Key.generate())
            row["wrong_key_accuracy"] = _preds_accuracy(wrong.authorised_logits(model, prot_test, test.indices),
                                                        test.labels)
        ab = budget.attack_budget()
        n = min(ab.train_images, len(prot_attack))
        x_attack = network_input(prot_attack[:n], spec, scheme)
        row["finetune_attack_accuracy"] = finetune_attack(checkpoint, x_attack, attack.labels[:n], x_test,
                                                          test.labels, ab, progress)["accuracy"]
        row["mlp_attack_accuracy"] = mlp_attack(x_attack, attack.labels[:n], x_test, test.labels, num_classes, ab,
                                                progress)["accuracy"]
    kpa: dict[str, float] | None = None
    kpa_ssim: dict[str, float] | None = None
    if protection.relation is not None:
        targets = protection.position_tables(h, w, test.indices[:budget.kpa_targets])
        kpa, kpa_ssim = {}, {}
        for k in budget.kpa_pairs:
            if k <= len(attack.plain):
                known = (attack.plain[:k], prot_attack[:k], protection.relation, spec.max_dn)
                kpa[str(k)] = recovery_fraction(known_plaintext_recovery(*known), targets)
                decrypted = known_plaintext_decrypt(*known[:2], prot_test, *known[2:], fill=spec.black_level)
                kpa_ssim[str(k)] = float(np.mean(ssim(decrypted, test.plain, rng)))
    row["known_plaintext_recovered"] = kpa
    row["known_plaintext_decrypt_ssim"] = kpa_ssim
    m = min(budget.inversion_train_images, len(attack.plain))
    inv = inversion_attack(prot_attack[:m], attack.plain[:m], prot_test, test.plain, budget.inversion_epochs,
                           max_dn=spec.max_dn, black_level=spec.black_level, width=budget.inversion_width,
                           seed=budget.seed, progress=progress)
    row.update({"inversion_ssim": inv.ssim, "inversion_psnr": _finite(inv.psnr), "inversion": inv.to_dict(),
                "wall_s": round(time.perf_counter() - t0, 1)})
    return row


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _fashion_table(checkpoint: str, test: Dataset, train: Dataset, sensor_cfg: SensorConfig, key: Key, scheme: str,
                   budget: PrivacyBudget, methods: Sequence[str], block: int, progress: bool,
                   sensor_seed: int, floors: FloorBudget | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    sensor, spec = Sensor(sensor_cfg, seed=sensor_seed), FrameFormat.from_config(sensor_cfg)
    test = test.subset(budget.test_images)
    n_attack = max(budget.attack_train_images, budget.inversion_train_images, max(budget.kpa_pairs))
    attack_set = train.subset(n_attack)
    test_frames = Frames(expose_scenes(test.images, sensor, TEST_FRAME_BASE, progress, "test frames"),
                         TEST_FRAME_BASE + np.arange(len(test)), test.labels)
    attack_frames = Frames(expose_scenes(attack_set.images, sensor, ATTACK_FRAME_BASE, progress, "attacker frames"),
                           ATTACK_FRAME_BASE + np.arange(len(attack_set)), attack_set.labels)
    model, manifest = load_checkpoint(checkpoint)
    num_classes = int(model.fc.out_features) if hasattr(model, "fc") else int(test.labels.max()) + 1
    plain_acc = accuracy(model, network_input(test_frames.plain, spec, scheme), test.labels)
    i2p, i2p_log = None, None
    if "i2p" in methods:
        i2p_set = train.subset(budget.i2p_train_images, offset=n_attack)
        i2p_plain = expose_scenes(i2p_set.images, sensor, I2P_FRAME_BASE, progress, "i2p training frames")
        i2p, i2p_log = train_image_to_perturbation(load_checkpoint(checkpoint)[0], i2p_plain, i2p_set.labels, spec,
                                                   budget.i2p_training(), progress)
    rows = []
    for method in tqdm(methods, desc=f"{test.name}: methods", disable=not progress, leave=False):
        protection = build_protection(method, key, spec, scheme, block, i2p)
        rows.append(evaluate_method(protection, test_frames, attack_frames, spec, budget, checkpoint, model,
                                    num_classes, progress))
    floor = None
    if floors is not None:
        n_floor = max(floors.invariant.train_images, max(floors.kpa_pairs) * floors.kpa_indices)
        floor_set = train.subset(n_floor)
        floor_plain = (attack_frames.plain if len(floor_set) <= len(attack_set) else
                       expose_scenes(floor_set.images, sensor, ATTACK_FRAME_BASE, progress, "floor attacker frames"))
        floor = floor_table(test_frames.plain, test.labels, floor_plain[:len(floor_set)], floor_set.labels, key, spec,
                            floors, num_classes, model, TEST_FRAME_BASE, ATTACK_FRAME_BASE, progress)
    return {"dataset": test.name, "sensor": sensor_cfg.name, "scheme": scheme, "test_images": len(test),
            "attacker_images": len(attack_set), "chance": 1.0 / num_classes, "checkpoint": str(checkpoint),
            "checkpoint_sha256": manifest.get("sha256"), "plain_accuracy": plain_acc,
            "i2p_training": None if i2p is None else {**budget.i2p_training().to_dict(), **i2p_log,
                                                      "train_images": budget.i2p_train_images},
            "methods": rows, "floors": floor, "not_measured": None, "wall_s": round(time.perf_counter() - t0, 1)}


def _cifar_table(source: str | os.PathLike, sensor_cfg: SensorConfig, key: Key, scheme: str, budget: PrivacyBudget,
                 methods: Sequence[str], block: int, progress: bool, sensor_seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    images, labels = foolbox_images(source, "cifar10")
    test = Dataset("cifar10-foolbox-test20", np.stack(images), labels, CIFAR10_CLASSES)
    natural = foolbox_images(source, "imagenet")[0] + foolbox_images(source, "cifar100")[0]
    scenes = natural_patches(natural, budget.cifar_attack_images, size=test.images.shape[1], seed=budget.seed)
    sensor, spec = Sensor(sensor_cfg, seed=sensor_seed), FrameFormat.from_config(sensor_cfg)
    test_frames = Frames(expose_scenes(test.images, sensor, TEST_FRAME_BASE, progress, "cifar test frames"),
                         TEST_FRAME_BASE + np.arange(len(test)), test.labels)
    attack_frames = Frames(expose_scenes(scenes, sensor, ATTACK_FRAME_BASE, progress, "cifar attacker frames"),
                           ATTACK_FRAME_BASE + np.arange(len(scenes)))
    rows = []
    for method in tqdm([m for m in methods if m != "i2p"], desc="cifar10: methods", disable=not progress,
                       leave=False):
        protection = build_protection(method, key, spec, scheme, block)
        rows.append(evaluate_method(protection, test_frames, attack_frames, spec, budget, progress=progress))
    return {"dataset": test.name, "sensor": sensor_cfg.name, "scheme": scheme, "test_images": len(test),
            "attacker_images": len(scenes), "chance": 1.0 / len(CIFAR10_CLASSES), "checkpoint": None,
            "plain_accuracy": None, "i2p_training": None, "methods": rows, "not_measured": CIFAR_NOTE,
            "wall_s": round(time.perf_counter() - t0, 1)}


def privacy_table(checkpoint: str | os.PathLike, test: Dataset, train: Dataset, sensor_cfg: SensorConfig, key: Key,
                  scheme: str = "pixel", budget: PrivacyBudget | None = None,
                  methods: Sequence[str] = METHOD_NAMES, cifar: str | os.PathLike | None = None,
                  cifar_sensor_cfg: SensorConfig | None = None, cifar_scheme: str = "quad", block: int = 4,
                  progress: bool = True, sensor_seed: int = 0, floors: FloorBudget | None = None) -> dict[str, Any]:
    """Method x {accuracies, attacks, similarity, throughput} on ``test`` (and CIFAR-10 if given).

    Args:
        checkpoint: plain classifier trained on ``sensor_cfg`` frames under ``scheme``.
        test, train: labelled datasets (the budget takes the first images of each).
        key: the secret key of every keyed method (only its fingerprint appears in the table).
        methods: any of :data:`METHOD_NAMES`.
        cifar: foolbox's wheel or a folder with its ``cifar10_*.png`` (None: skip CIFAR-10).
        cifar_sensor_cfg: the colour sensor for CIFAR-10 (default: configs/sensors/default.yaml).
        floors: budget of the floor attacks on Fashion-MNIST (:mod:`pipeline.lab.floors`; None: not run).
            With floors, ``methods`` may be empty (the floors alone).

    Returns:
        JSON-ready dict: ``{"tables": [per dataset: {..., "methods": [rows]}], "budget", ...}``.
    """
    budget = budget or PrivacyBudget()
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not (methods or floors):
        raise ValueError(f"methods: expected some of {', '.join(METHOD_NAMES)}, got {list(methods)}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= min(test.images.shape[1:3]):
        raise ConfigError("privacy", "block", f"an integer in [1, {min(test.images.shape[1:3])}] (the frame side)",
                          block)
    model, manifest = load_checkpoint(checkpoint)  # refuse a checkpoint that does not fit before any work
    h, w = test.images.shape[1:3]
    check_model_input(model, manifest, input_shape(scheme, h, w), f"the {scheme} scheme on {h}x{w} "
                      f"{sensor_cfg.cfa} frames", checkpoint)
    t0 = time.perf_counter()
    tables = [_fashion_table(str(checkpoint), test, train, sensor_cfg, key, scheme, budget, methods, block, progress,
                             sensor_seed, floors)]
    if cifar is not None and methods:
        cfg = cifar_sensor_cfg or SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
        tables.append(_cifar_table(cifar, cfg, key, cifar_scheme, budget, methods, block, progress, sensor_seed))
    return {"tables": tables, "budget": budget.to_dict(), "block": block, "key_fingerprint": key.fingerprint,
            "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(table: dict[str, Any]) -> str:
    """Human-readable text of a :func:`privacy_table` result (kpaK: positions recovered from K pairs,
    decK: SSIM of test frames decrypted with that table)."""
    pairs = [str(k) for k in table["budget"]["kpa_pairs"]]
    head = (f"  {'method':<17}{'auth':>6}{'unauth':>7}{'wrongk':>7}{'finet':>7}{'mlp':>7} "
            + "".join(f"{'kpa' + k:>6}" for k in pairs) + " " + "".join(f"{'dec' + k:>6}" for k in pairs)
            + f"{'invSSIM':>8}{'invPSNR':>8}{'protSSIM':>9}{'frames/s':>10}")
    lines = []
    for t in table["tables"]:
        lines.append(f"{t['dataset']} ({t['sensor']}, {t['test_images']} test frames, scheme {t['scheme']}, "
                     f"plain accuracy {_fmt(t['plain_accuracy'])}, chance {t['chance']:.3f})")
        if t["not_measured"]:
            lines.append(f"  note: {t['not_measured']}")
        if t["methods"]:
            lines.append(head)
        for r in t["methods"]:
            kpa, dec = r["known_plaintext_recovered"] or {}, r["known_plaintext_decrypt_ssim"] or {}
            lines.append(f"  {r['method']:<17}{_fmt(r['authorised_accuracy']):>6}{_fmt(r['unauthorised_accuracy']):>7}"
                         f"{_fmt(r['wrong_key_accuracy']):>7}{_fmt(r['finetune_attack_accuracy']):>7}"
                         f"{_fmt(r['mlp_attack_accuracy']):>7} "
                         + "".join(f"{_fmt(kpa.get(k)):>6}" for k in pairs) + " "
                         + "".join(f"{_fmt(dec.get(k), '.2f'):>6}" for k in pairs)
                         + f"{_fmt(r['inversion_ssim']):>8}{_fmt(r['inversion_psnr'], '.2f'):>8}"
                         f"{_fmt(r['protected_ssim']):>9}{_fmt(r['throughput_frames_per_s'], '.0f'):>10}")
        if t.get("floors"):
            lines.append(format_floors(t["floors"]))
    lines.append(f"total {table['wall_s']} s, key {table['key_fingerprint']}")
    return "\n".join(lines)
