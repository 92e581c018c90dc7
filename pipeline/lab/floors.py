"""The floors of the keyed readout: the strongest attacks that no key, static or rotating, can stop,
and the one that session nonces stop (part of ``privcam eval privacy``).

Per readout scheme (``pixel``, ``quad``, ``plane``):

* ``invariant``: the scheme's permutation-invariant learner (:func:`pipeline.lab.attacks.invariant_attack`),
  trained to convergence on rotating-key frames; the static key's features are checked to be identical,
  so its accuracy is the floor for both key modes;
* ``jigsaw`` (quad, plane): the greedy jigsaw solver (:mod:`pipeline.lab.jigsaw`) on single test frames,
  static and rotating key: pieces at their true position, neighbour pairs kept, SSIM of the restored
  frame against the plain one, and the plain classifier's accuracy on the restored frames;
* ``cross_session_kpa``: known-plaintext across runs. The attacker holds k (plain, protected) pairs at
  frame index n from k earlier runs and attacks frame n of a new run. Without session nonces every
  run reuses (key, n)'s order and the recovery is that of a static key; with a fresh nonce per run
  (:meth:`sensor.keys.Key.for_session`) the recovered table is scored against the new session's and
  falls to chance.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sensor.configio import check_range
from sensor.errors import ConfigError
from sensor.frame import FrameFormat
from sensor.keys import Key, new_session_nonce
from sensor.readout import SCHEMES, readout_permutation

from ..stream.inputs import network_input
from .attacks import (
    ConvergenceBudget,
    accuracy,
    invariant_attack,
    invariant_features,
    known_plaintext_recovery,
    recovery_fraction,
    ssim,
)
from .jigsaw import JIGSAW_SCHEMES, jigsaw_attack


@dataclass(frozen=True)
class FloorBudget:
    """What the floor attacks get (the invariant learner's training budget is ``invariant``)."""

    schemes: tuple[str, ...] = SCHEMES
    invariant: ConvergenceBudget = field(default_factory=ConvergenceBudget)
    jigsaw_frames: int = 100  # single test frames each jigsaw run solves
    kpa_pairs: tuple[int, ...] = (1, 2, 4, 8)
    kpa_indices: int = 20  # frame indices n the cross-session attack is averaged over

    def __post_init__(self) -> None:
        if not self.schemes or any(s not in SCHEMES for s in self.schemes):
            raise ConfigError("FloorBudget", "schemes", f"one or more of {', '.join(SCHEMES)}", list(self.schemes))
        check_range("FloorBudget", "jigsaw_frames", self.jigsaw_frames, 1)
        check_range("FloorBudget", "kpa_indices", self.kpa_indices, 1)
        if not self.kpa_pairs or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.kpa_pairs):
            raise ConfigError("FloorBudget", "kpa_pairs", "one or more integers >= 1", list(self.kpa_pairs))

    def to_dict(self) -> dict[str, Any]:
        return {"schemes": list(self.schemes), "invariant": self.invariant.to_dict(),
                "jigsaw_frames": self.jigsaw_frames, "kpa_pairs": list(self.kpa_pairs),
                "kpa_indices": self.kpa_indices}


def protect_frames(frames: np.ndarray, key: Key, scheme: str, rotation: bool, first_index: int) -> np.ndarray:
    """(B, H, W) uint16 plain frames -> their keyed readout; frame i has index first_index + i (rotation).

    Returns:
        (B, H, W) uint16.
    """
    h, w = frames.shape[1:]
    if not rotation:
        return readout_permutation(key, scheme, h, w).forward(frames)
    out = np.empty_like(frames)
    for i in range(len(frames)):
        out[i] = readout_permutation(key, scheme, h, w, first_index + i).forward(frames[i])
    return out


def readout_tables(key: Key, scheme: str, h: int, w: int, rotation: bool, indices: Sequence[int]) -> np.ndarray:
    """(B, H*W) int64 readout tables of frames ``indices`` (one static table repeated without rotation)."""
    if not rotation:
        return np.repeat(readout_permutation(key, scheme, h, w).table()[None], len(indices), axis=0)
    return np.stack([readout_permutation(key, scheme, h, w, int(n)).table() for n in indices])


def cross_session_recovery(key: Key, scheme: str, known_plain: np.ndarray, frame_index: int, sessions: bool
                           ) -> float:
    """Fraction of frame ``frame_index``'s readout table of a new run recovered from k known pairs at
    that index from k earlier runs (each its own session when ``sessions``, else all on the master key).

    Args:
        known_plain: (k, H, W) uint16 plain frames, one per earlier run.
    """
    h, w = known_plain.shape[1:]

    def run_key() -> Key:
        return key.for_session(new_session_nonce()) if sessions else key

    protected = np.stack([readout_permutation(run_key(), scheme, h, w, frame_index).forward(f) for f in known_plain])
    target = readout_permutation(run_key(), scheme, h, w, frame_index).table()
    return recovery_fraction(known_plaintext_recovery(known_plain, protected), target)


def _plain_accuracy(model: torch.nn.Module | None, frames: np.ndarray, labels: np.ndarray | None,
                    spec: FrameFormat) -> float | None:
    """The plain classifier on (B, H, W) mono-layout frames, when it takes them (C = 1, the pixel input)."""
    if model is None or labels is None:
        return None
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is None or first.in_channels != 1:
        return None
    return accuracy(model, network_input(frames, spec, "pixel"), labels[:len(frames)])


def floor_table(test_plain: np.ndarray, test_labels: np.ndarray, train_plain: np.ndarray, train_labels: np.ndarray,
                key: Key, spec: FrameFormat, budget: FloorBudget, num_classes: int,
                model: torch.nn.Module | None = None, test_first_index: int = 0, train_first_index: int = 0,
                progress: bool = False) -> dict[str, Any]:
    """Every floor attack for every scheme of ``budget`` (see the module docstring).

    Args:
        test_plain: (M, H, W) uint16 plain test frames (indices test_first_index + i), labels (M,).
        train_plain: (N, H, W) the attacker's plain frames (indices train_first_index + i), labels (N,).
        key: the master key (rotation runs on one session key drawn from it, as a live run does).
        model: the plain classifier, for its accuracy on jigsaw-restored frames (None: not measured).

    Returns:
        JSON-ready dict: ``{"invariant": [...], "jigsaw": [...], "cross_session_kpa": {...}, "budget"}``.
    """
    t0 = time.perf_counter()
    h, w = test_plain.shape[1:]
    session = key.for_session(new_session_nonce())
    rng = spec.max_dn - spec.black_level
    n_train = min(budget.invariant.train_images, len(train_plain))
    invariant, jigsaw = [], []
    for scheme in tqdm(budget.schemes, desc="floors", disable=not progress, leave=False):
        rot = {"train": protect_frames(train_plain[:n_train], session, scheme, True, train_first_index),
               "test": protect_frames(test_plain, session, scheme, True, test_first_index)}
        same = all(np.array_equal(invariant_features(protect_frames(f, key, scheme, False, 0), scheme),
                                  invariant_features(rot[part], scheme))
                   for part, f in (("train", train_plain[:n_train]), ("test", test_plain)))
        res = invariant_attack(rot["train"], train_labels[:n_train], rot["test"], test_labels, scheme, num_classes,
                               budget.invariant, max_dn=spec.max_dn, black_level=spec.black_level,
                               progress=progress)
        invariant.append({**res, "trained_on": "rotating key (one session)",
                          "static_key_features_identical": bool(same)})
        if scheme not in JIGSAW_SCHEMES:
            continue
        m = min(budget.jigsaw_frames, len(test_plain))
        idx = test_first_index + np.arange(m)
        for rotation in (False, True):
            k = session if rotation else key
            t1 = time.perf_counter()
            prot = protect_frames(test_plain[:m], k, scheme, rotation, test_first_index)
            res = jigsaw_attack(prot, scheme, readout_tables(k, scheme, h, w, rotation, idx), fill=spec.black_level)
            jigsaw.append({
                "scheme": scheme, "key_mode": "rotation" if rotation else "static", "frames": m,
                "position_accuracy": float(res["position_accuracy"].mean()),
                "neighbour_accuracy": float(res["neighbour_accuracy"].mean()),
                "restored_ssim": float(np.mean(ssim(res["restored"], test_plain[:m], rng))),
                "protected_ssim": float(np.mean(ssim(prot, test_plain[:m], rng))),
                "plain_model_on_restored": _plain_accuracy(model, res["restored"], test_labels, spec),
                "plain_model_on_protected": _plain_accuracy(model, prot, test_labels, spec),
                "plain_model_on_plain": _plain_accuracy(model, test_plain[:m], test_labels, spec),
                "wall_s": round(time.perf_counter() - t1, 1)})
    kmax = max(budget.kpa_pairs)
    n_idx = min(budget.kpa_indices, len(train_plain) // kmax)  # each index gets its own kmax known frames
    kpa: dict[str, Any] = {"schemes": {}, "chance": 1.0 / (h * w), "indices": n_idx,
                           "attack": "k pairs at frame index n from k earlier runs; target: frame n of a new run"}
    for scheme in budget.schemes if n_idx else ():
        rows = {}
        for label, sessions in (("no_sessions", False), ("sessions", True)):
            rows[label] = {str(k): float(np.mean([
                cross_session_recovery(key, scheme, train_plain[n * kmax:n * kmax + k], n, sessions)
                for n in range(n_idx)])) for k in budget.kpa_pairs}
        kpa["schemes"][scheme] = rows
    return {"invariant": invariant, "jigsaw": jigsaw, "cross_session_kpa": kpa, "budget": budget.to_dict(),
            "test_images": len(test_plain), "wall_s": round(time.perf_counter() - t0, 1)}


def format_floors(floors: dict[str, Any]) -> str:
    """Human-readable text of a :func:`floor_table` result."""
    lines = ["floors (attacks no readout key can stop; cross-session known-plaintext):"]
    for r in floors["invariant"]:
        b = r["budget"]
        lines.append(f"  invariant {r['scheme']:<6} {r['accuracy']:.3f}  ({r['features']}; {b['model']}, "
                     f"{b['fit_images']}+{b['val_images']} frames, best epoch {b['best_epoch']} of {b['epochs_run']}, "
                     f"static key features identical: {r['static_key_features_identical']})")
    for r in floors["jigsaw"]:
        acc = r["plain_model_on_restored"]
        lines.append(f"  jigsaw {r['scheme']:<6} {r['key_mode']:<9} positions {r['position_accuracy']:.3f} "
                     f"neighbours {r['neighbour_accuracy']:.3f} SSIM {r['restored_ssim']:.3f} (protected "
                     f"{r['protected_ssim']:.3f}) plain model on restored "
                     f"{'-' if acc is None else format(acc, '.3f')} ({r['frames']} frames)")
    for scheme, rows in floors["cross_session_kpa"]["schemes"].items():
        lines.append(f"  cross-session KPA {scheme:<6} " + "  ".join(
            f"{label} " + "/".join(f"{v:.3f}" for v in vals.values()) for label, vals in rows.items())
            + f"  (k = {'/'.join(rows['sessions'])})")
    return "\n".join(lines)
