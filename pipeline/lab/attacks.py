"""Attacks on protected frames, each a library function, and the image-quality metrics they report.

* :func:`known_plaintext_recovery`: given k (plain, protected) frame pairs, recover the slot->position
  table of a stage that moves samples around (Li et al. 2008: about two frames break a fixed
  permutation). :func:`recovery_fraction` scores it against the true table;
  :func:`known_plaintext_decrypt` decrypts other frames with the best guess of the table.
* :func:`inversion_attack` (ITN-Attack, Ito et al. 2021): train a U-Net on (protected, plain) pairs,
  reconstruct held-out frames, report SSIM and PSNR against the originals.
* :func:`finetune_attack` and :func:`mlp_attack`: the classifier attacks of ``privcam eval accuracy``
  (:mod:`pipeline.lab.evaluate`), on any protection's frames.
* :func:`invariant_features` and :func:`invariant_attack`: per readout scheme, what every permutation
  of the scheme keeps, and an MLP trained on it to convergence (:func:`train_to_convergence`).
* :func:`ssim` and :func:`psnr` in numpy. SSIM is Wang et al. 2004 with an 11-tap Gaussian window
  (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population covariances, averaged over
  the positions where the window fits inside the image; this equals scikit-image's
  ``structural_similarity(a, b, data_range=R, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from sensor.configio import check_range

from .protection import RELATIONS
from .unet import UNet

# ----------------------------------------------------------------------------------------------
# Known-plaintext attack
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackBudget:
    train_images: int = 10_000
    epochs: int = 3
    batch_size: int = 128
    finetune_lr: float = 0.01
    mlp_lr: float = 1e-3
    mlp_hidden: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_images", "epochs", "batch_size", "mlp_hidden"):
            check_range("AttackBudget", name, getattr(self, name), 1)
        for name in ("finetune_lr", "mlp_lr"):
            check_range("AttackBudget", name, getattr(self, name), 0, 10, low_open=True)
        check_range("AttackBudget", "seed", self.seed, 0, 2**32 - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"train_images": self.train_images, "epochs": self.epochs, "batch_size": self.batch_size,
                "finetune_lr": self.finetune_lr, "mlp_lr": self.mlp_lr, "mlp_hidden": self.mlp_hidden}


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, labels: np.ndarray, batch: int = 500, **kw: Any) -> float:
    """Top-1 accuracy of ``model`` (extra keyword arguments such as ``input_perm`` per batch are sliced)."""
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        extra = {k: v[s:s + batch] for k, v in kw.items()}
        correct += int((model(x[s:s + batch], **extra).argmax(1) == torch.from_numpy(labels[s:s + batch])).sum())
    return correct / len(x)


def train_classifier(model: nn.Module, x: torch.Tensor, y: np.ndarray, epochs: int, lr: float, batch: int,
                     seed: int, optimizer: str = "sgd", progress: bool = False, desc: str = "attack") -> float:
    """Plain supervised training (the attacker's). Returns wall seconds."""
    torch.manual_seed(seed)
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=lr))
    labels = torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            loss = loss_fn(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def mlp(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Permutation-blind learner: no spatial prior at all."""
    return nn.Sequential(nn.Flatten(1), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def mlp_attack(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
               num_classes: int, budget: AttackBudget, progress: bool = False,
               desc: str = "MLP attack") -> dict[str, Any]:
    """A permutation-blind MLP trained from scratch on labelled frames. Returns accuracy and wall seconds."""
    torch.manual_seed(budget.seed)
    model = mlp(x_train[0].numel(), budget.mlp_hidden, num_classes)
    secs = train_classifier(model, x_train, y_train, budget.epochs, budget.mlp_lr, budget.batch_size, budget.seed,
                            optimizer="adam", progress=progress, desc=desc)
    return {"accuracy": accuracy(model, x_test, y_test), "wall_s": round(secs, 1)}


def _signatures(frames: np.ndarray, relation: str, max_dn: int | None) -> np.ndarray:
    """(k, N) sample values -> (N, m) per-position signatures that are equal for a protected slot and
    its plain source under ``relation`` ("equal": the k values; "negate": the smaller of the values
    and their negatives, lexicographically; "xor": values XOR the first frame's, m = k - 1)."""
    v = frames.astype(np.int64).T
    if relation == "equal":
        return v
    if relation == "xor":
        return v[:, 1:] ^ v[:, :1]
    neg = int(max_dn) - v
    d = v - neg
    first = np.argmax(d != 0, axis=1)
    keep = d[np.arange(len(d)), first] <= 0
    return np.where(keep[:, None], v, neg)


def _check_pairs(plain: np.ndarray, protected: np.ndarray, relation: str, max_dn: int | None) -> None:
    if plain.shape != protected.shape or plain.ndim != 3 or len(plain) < 1:
        raise ValueError(f"plain, protected: expected two (k, H, W) arrays of one shape with k >= 1, got "
                         f"{plain.shape} and {protected.shape}")
    if relation not in RELATIONS:
        raise ValueError(f"relation: expected one of {', '.join(RELATIONS)}, got {relation!r}")
    if relation == "negate" and max_dn is None:
        raise ValueError("max_dn: the 'negate' relation needs the clip level")


def _classes(plain: np.ndarray, protected: np.ndarray, relation: str, max_dn: int | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Consistency classes: (N,) class id of each plain position and (N,) of each protected slot;
    a slot and a position are consistent across all pairs iff their ids are equal."""
    plain, protected = np.asarray(plain), np.asarray(protected)
    _check_pairs(plain, protected, relation, max_dn)
    k, n = len(plain), plain[0].size
    sig_p = _signatures(plain.reshape(k, n), relation, max_dn)
    sig_s = _signatures(protected.reshape(k, n), relation, max_dn)
    if sig_p.shape[1] == 0:  # xor with one pair: every position fits every slot
        return np.zeros(n, np.int64), np.zeros(n, np.int64)
    _, inverse = np.unique(np.concatenate([sig_p, sig_s]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse[:n], inverse[n:]


def known_plaintext_recovery(plain: np.ndarray, protected: np.ndarray, relation: str = "equal",
                             max_dn: int | None = None) -> np.ndarray:
    """Recover a slot->position table from k known (plain, protected) frame pairs.

    Assumes the same table for all k pairs (a static key). A slot is recovered when exactly one
    plain position is consistent with it across all k pairs under ``relation``; otherwise it is -1
    (ambiguous, or no consistent position, as happens when the key rotates per frame).

    Args:
        plain: (k, H, W) plain frames; protected: (k, H, W) their protected versions.
        relation: "equal" (pure permutation), "negate" (sample or ``max_dn`` minus it, per slot) or
            "xor" (sample XOR a per-slot secret; one pair says nothing).
        max_dn: the clip level, needed for "negate".

    Returns:
        (H*W,) int64: ``recovered[s]`` = plain position of slot s, or -1.
    """
    pid, sid = _classes(plain, protected, relation, max_dn)
    n = len(pid)
    counts = np.bincount(pid, minlength=int(max(pid.max(), sid.max())) + 1)
    owner = np.full(len(counts), -1, np.int64)
    owner[pid] = np.arange(n)
    return np.where(counts[sid] == 1, owner[sid], -1)


def known_plaintext_guess(plain: np.ndarray, protected: np.ndarray, relation: str = "equal",
                          max_dn: int | None = None) -> np.ndarray:
    """Like :func:`known_plaintext_recovery`, but every ambiguous slot gets one of its consistent
    positions (the i-th slot of a class the i-th position, so the guess is one-to-one): the best
    table an attacker can use. -1 only where no position is consistent.

    Returns:
        (H*W,) int64 slot->position guess.
    """
    pid, sid = _classes(plain, protected, relation, max_dn)
    n = len(pid)
    m = int(max(pid.max(), sid.max())) + 1
    order_p, order_s = np.argsort(pid, kind="stable"), np.argsort(sid, kind="stable")
    start_p = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=m))])
    start_s = np.concatenate([[0], np.cumsum(np.bincount(sid, minlength=m))])
    cls = sid[order_s]
    rank = np.arange(n) - start_s[cls]  # rank of each sorted slot inside its class
    ok = rank < start_p[cls + 1] - start_p[cls]
    guess = np.full(n, -1, np.int64)
    guess[order_s[ok]] = order_p[start_p[cls[ok]] + rank[ok]]
    return guess


def known_plaintext_decrypt(plain: np.ndarray, protected: np.ndarray, targets: np.ndarray, relation: str = "equal",
                            max_dn: int | None = None, fill: int = 0) -> np.ndarray:
    """Decrypt other protected frames with the table guessed from k known pairs.

    The per-slot constant is read off the first pair (``c[s] = prot[0, s] XOR plain[0, guess[s]]``:
    0 for "equal", 0 or ``max_dn`` for "negate"); positions no slot maps to get ``fill``.

    Args:
        plain, protected: (k, H, W) known pairs; targets: (B, H, W) protected frames to decrypt.

    Returns:
        (B, H, W) uint16 best-guess plain frames.
    """
    guess = known_plaintext_guess(plain, protected, relation, max_dn)
    targets = np.asarray(targets)
    if targets.ndim != 3 or targets.shape[1:] != np.shape(plain)[1:]:
        raise ValueError(f"targets: expected (B, {plain.shape[1]}, {plain.shape[2]}), got {targets.shape}")
    ok = guess >= 0
    p0, s0 = np.asarray(plain)[0].reshape(-1), np.asarray(protected)[0].reshape(-1)
    const = s0[ok].astype(np.int64) ^ p0[guess[ok]].astype(np.int64)
    flat = targets.reshape(len(targets), -1).astype(np.int64)
    out = np.full(flat.shape, fill, np.int64)
    out[:, guess[ok]] = flat[:, ok] ^ const
    return out.astype(np.uint16).reshape(targets.shape)


def recovery_fraction(recovered: np.ndarray, true_table: np.ndarray) -> float:
    """Fraction of slots whose recovered position is the true one.

    Args:
        recovered: (N,) from :func:`known_plaintext_recovery`.
        true_table: (N,) or (B, N) true slot->position tables (B target frames: the mean over them).
    """
    recovered, true_table = np.asarray(recovered), np.asarray(true_table)
    if true_table.shape[-1] != recovered.shape[-1] or recovered.ndim != 1:
        raise ValueError(f"recovered (N,) and true_table (..., N): got {recovered.shape} and {true_table.shape}")
    return float((true_table == recovered).mean())


def recovery_counts(recovered: np.ndarray, true_table: np.ndarray) -> dict[str, float]:
    """Fractions of slots recovered correctly, recovered wrongly, and left ambiguous (-1)."""
    true_table = np.broadcast_to(np.asarray(true_table), np.broadcast_shapes(np.shape(true_table),
                                                                             np.shape(recovered)))
    unknown = np.broadcast_to(recovered < 0, true_table.shape)
    right = true_table == recovered
    return {"correct": float(right.mean()), "wrong": float((~right & ~unknown).mean()),
            "ambiguous": float(unknown.mean())}


# ----------------------------------------------------------------------------------------------
# SSIM and PSNR
# ----------------------------------------------------------------------------------------------


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """(2r + 1,) normalised Gaussian taps, r = int(truncate * sigma + 0.5) (as scipy.ndimage)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable filter, positions where the window fits: (..., H, W) -> (..., H - 2r, W - 2r)."""
    n = len(w)
    y = np.lib.stride_tricks.sliding_window_view(x, n, axis=-1) @ w
    return np.lib.stride_tricks.sliding_window_view(y, n, axis=-2) @ w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float | np.ndarray:
    """Mean structural similarity (Wang et al. 2004), Gaussian window (see the module docstring).

    Args:
        a, b: (..., H, W) images of one shape, H and W at least the window size (11 for sigma 1.5).
        data_range: the value range R (C1 = (K1 R)^2, C2 = (K2 R)^2).

    Returns:
        a float for (H, W) images, else an array of the leading shape (one SSIM per image).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = gaussian_window(sigma)
    if a.shape != b.shape or a.ndim < 2 or min(a.shape[-2:]) < len(w):
        raise ValueError(f"ssim: expected two (..., H, W) arrays of one shape with H, W >= {len(w)}, got "
                         f"{a.shape} and {b.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range: expected > 0, got {data_range}")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ux, uy = _filter_valid(a, w), _filter_valid(b, w)
    vx = _filter_valid(a * a, w) - ux * ux
    vy = _filter_valid(b * b, w) - uy * uy
    vxy = _filter_valid(a * b, w) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.mean(axis=(-2, -1))
    return float(out) if out.ndim == 0 else out


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float | np.ndarray:
    """Peak signal-to-noise ratio 10 log10(R^2 / MSE) in dB, per (H, W) image (inf when equal).

    Returns:
        a float for (H, W) images, else an array of the leading shape.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"psnr: expected two (..., H, W) arrays of one shape, got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).mean(axis=(-2, -1))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(float(data_range) ** 2 / mse)
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------------------------
# Inversion attack (ITN-Attack)
# ----------------------------------------------------------------------------------------------


@dataclass
class InversionResult:
    """Mean SSIM/PSNR of the reconstructions of held-out frames, and what it cost."""

    ssim: float
    psnr: float
    train_frames: int
    test_frames: int
    epochs: int
    train_s: float
    final_loss: float
    ssim_per_frame: np.ndarray = field(repr=False)
    psnr_per_frame: np.ndarray = field(repr=False)
    reconstructed: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"ssim": self.ssim, "psnr": self.psnr, "train_frames": self.train_frames,
                "test_frames": self.test_frames, "epochs": self.epochs, "train_s": round(self.train_s, 1),
                "final_loss": self.final_loss}


def _normalise(frames: np.ndarray, black_level: int, max_dn: int) -> torch.Tensor:
    scale = 1.0 / max(max_dn - black_level, 1)
    return torch.from_numpy((frames.astype(np.float32) - black_level) * np.float32(scale))[:, None]


def inversion_attack(train_protected: np.ndarray, train_plain: np.ndarray, test_protected: np.ndarray,
                     test_plain: np.ndarray, epochs: int, *, max_dn: int, black_level: int = 0,
                     batch_size: int = 64, lr: float = 1e-3, width: int = 16, levels: int = 3, seed: int = 0,
                     device: torch.device | str | None = None, progress: bool = False) -> InversionResult:
    """ITN-Attack: a U-Net trained (MSE, Adam) to map protected frames to plain ones.

    Frames are normalised to ``(dn - black_level) / (max_dn - black_level)``; the network ends in a
    sigmoid. SSIM/PSNR compare the reconstructions, rounded to DN, with the plain test frames,
    ``data_range = max_dn - black_level``.

    Args:
        train_protected, train_plain: (N, H, W) the attacker's pairs.
        test_protected, test_plain: (M, H, W) held-out frames (M >= 1, H and W >= 11).

    Returns:
        :class:`InversionResult`.
    """
    for name, arr in (("train_protected", train_protected), ("train_plain", train_plain),
                      ("test_protected", test_protected), ("test_plain", test_plain)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise ValueError(f"{name}: expected an (N, H, W) array")
    if train_protected.shape != train_plain.shape or test_protected.shape != test_plain.shape:
        raise ValueError("protected and plain frames: expected pairs of one shape")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    net = UNet(1, 1, width, levels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xs, ys = _normalise(train_protected, black_level, max_dn), _normalise(train_plain, black_level, max_dn)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    last = float("nan")
    for _ in tqdm(range(epochs), desc="inversion attack", disable=not progress, leave=False):
        net.train()
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            loss = F.mse_loss(torch.sigmoid(net(xs[idx].to(device))), ys[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        last = total / max(len(order), 1)
    train_s = time.perf_counter() - t0
    net.eval()
    x_test = _normalise(test_protected, black_level, max_dn)
    recon = np.empty(test_plain.shape, np.uint16)
    with torch.inference_mode():
        for s in range(0, len(x_test), 500):
            y = torch.sigmoid(net(x_test[s:s + 500].to(device)))[:, 0].float().cpu().numpy()
            recon[s:s + 500] = np.clip(np.rint(black_level + y * (max_dn - black_level)), 0, max_dn)
    rng = max_dn - black_level
    s_per = np.atleast_1d(ssim(recon, test_plain, rng))
    p_per = np.atleast_1d(psnr(recon, test_plain, rng))
    return InversionResult(float(s_per.mean()), float(p_per.mean()), len(train_plain), len(test_plain), epochs,
                           train_s, last, s_per, p_per, recon)


# ----------------------------------------------------------------------------------------------
# Classifier attacks (from privcam eval accuracy), on any protection's frames
# ----------------------------------------------------------------------------------------------


def finetune_attack(checkpoint: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor,
                    y_test: np.ndarray, budget: AttackBudget, progress: bool = False) -> dict[str, Any]:
    """The attacker holds the plain weights and labelled protected frames, not the key, and fine-tunes.

    Args:
        x_train, x_test: (N, C, h, w) network inputs of protected frames; y_*: (N,) labels.
    """
    model, _ = load_checkpoint(checkpoint)
    secs = train_classifier(model, x_train, y_train, budget.epochs, budget.finetune_lr, budget.batch_size,
                            budget.seed, progress=progress, desc="fine-tune attack")
    return {"accuracy": accuracy(model, x_test, y_test), "wall_s": round(secs, 1)}




# ----------------------------------------------------------------------------------------------
# Permutation-invariant learners: what no readout permutation of a scheme can hide
# ----------------------------------------------------------------------------------------------

INVARIANT_FEATURES = {
    "pixel": "sorted values of the whole frame",
    "quad": "the bag of 2x2 cells, sorted by (cell sum, then its four values)",
    "plane": "sorted values of each of the four CFA planes (2x2 phases)",
}


def invariant_features(frames: np.ndarray, scheme: str) -> np.ndarray:
    """Features of each frame that every readout permutation of ``scheme`` leaves unchanged.

    * pixel: the H*W values sorted (the histogram);
    * quad: the (H/2)(W/2) 2x2 cells, each kept whole (top-left, top-right, bottom-left,
      bottom-right), sorted lexicographically by (cell sum, values): a canonical order of the bag;
    * plane: each packed plane (phase (dy, dx) = divmod(k, 2)) sorted on its own, planes in order.

    Args:
        frames: (N, H, W) integer frames (H, W even for quad and plane).

    Returns:
        (N, H*W) array of the frames' dtype.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"frames: expected an (N, H, W) integer array, got {frames.dtype} {frames.shape}")
    if scheme not in INVARIANT_FEATURES:
        raise ValueError(f"scheme: expected one of {', '.join(INVARIANT_FEATURES)}, got {scheme!r}")
    n, h, w = frames.shape
    if scheme == "pixel":
        return np.sort(frames.reshape(n, h * w), axis=1)
    if h % 2 or w % 2:
        raise ValueError(f"frames: the {scheme} scheme needs an even height and width, got {h}x{w}")
    cells = frames.reshape(n, h // 2, 2, w // 2, 2)
    if scheme == "plane":
        return np.sort(cells.transpose(0, 2, 4, 1, 3).reshape(n, 4, -1), axis=2).reshape(n, h * w)
    bag = cells.transpose(0, 1, 3, 2, 4).reshape(n, -1, 4)
    total = bag.sum(axis=2, dtype=np.int64)
    order = np.lexsort((bag[..., 3], bag[..., 2], bag[..., 1], bag[..., 0], total), axis=-1)
    return np.take_along_axis(bag, order[..., None], axis=1).reshape(n, h * w)


@dataclass(frozen=True)
class ConvergenceBudget:
    """Training to convergence: Adam with early stopping on a held-out split of the attacker's frames
    (the weights of the best validation epoch are kept)."""

    train_images: int = 20_000  # labelled frames, validation split included
    max_epochs: int = 200
    patience: int = 10  # epochs without a better validation accuracy before stopping
    val_fraction: float = 0.1
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size", "hidden"):
            check_range("ConvergenceBudget", name, getattr(self, name), 1)
        check_range("ConvergenceBudget", "train_images", self.train_images, 2)  # a validation split is held out
        check_range("ConvergenceBudget", "val_fraction", self.val_fraction, 0, 0.5, low_open=True)
        check_range("ConvergenceBudget", "lr", self.lr, 0, 10, low_open=True)
        check_range("ConvergenceBudget", "seed", self.seed, 0, 2**32 - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"train_images": self.train_images, "max_epochs": self.max_epochs, "patience": self.patience,
                "val_fraction": self.val_fraction, "batch_size": self.batch_size, "lr": self.lr,
                "hidden": self.hidden, "optimizer": "adam", "early_stopping": "validation accuracy"}


def train_to_convergence(model: nn.Module, x: torch.Tensor, y: np.ndarray, budget: ConvergenceBudget,
                         progress: bool = False, desc: str = "converge") -> dict[str, Any]:
    """Train ``model`` (Adam) on a (1 - val_fraction) split of (x, y), stop after ``patience`` epochs
    without a better validation accuracy, and load the best epoch's weights.

    Args:
        x: (N, ...) inputs; y: (N,) labels, N >= 2.

    Returns:
        ``{"epochs_run", "best_epoch", "val_accuracy", "fit_images", "val_images", "wall_s"}``.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x, y: expected the same number >= 2 of items, got {len(x)} and {len(y)}")
    torch.manual_seed(budget.seed)
    gen = torch.Generator().manual_seed(budget.seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(round(len(x) * budget.val_fraction)))
    val, fit = perm[:n_val], perm[n_val:]
    labels = torch.from_numpy(np.asarray(y, np.int64))
    x_val, y_val = x[val], labels[val].numpy()
    opt = torch.optim.Adam(model.parameters(), lr=budget.lr)
    loss_fn = nn.CrossEntropyLoss()
    best, best_epoch, best_state, epoch = -1.0, 0, None, 0
    t0 = time.perf_counter()
    bar = tqdm(total=budget.max_epochs, desc=desc, disable=not progress, leave=False)
    for epoch in range(1, budget.max_epochs + 1):
        model.train()
        order = fit[torch.randperm(len(fit), generator=gen)]
        for s in range(0, len(order), budget.batch_size):
            idx = order[s:s + budget.batch_size]
            loss = loss_fn(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model, x_val, y_val)
        bar.update(1)
        if acc > best:
            best, best_epoch = acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= budget.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs_run": epoch, "best_epoch": best_epoch, "val_accuracy": best, "fit_images": len(fit),
            "val_images": n_val, "wall_s": round(time.perf_counter() - t0, 1)}


def invariant_attack(train_frames: np.ndarray, y_train: np.ndarray, test_frames: np.ndarray, y_test: np.ndarray,
                     scheme: str, num_classes: int, budget: ConvergenceBudget, *, max_dn: int, black_level: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """The permutation-invariant learner of ``scheme``: an MLP on :func:`invariant_features`
    (normalised to ``(dn - black_level) / (max_dn - black_level)``), trained to convergence.

    Any readout permutation of the scheme (static or rotating, any key) gives the same features, so
    this is a floor no key can push the attack below.

    Args:
        train_frames: (N, H, W) protected frames with labels y_train (N,) (the first
            ``budget.train_images`` are used); test_frames: (M, H, W) with y_test (M,).

    Returns:
        accuracy on the test frames, the features, the budget, epochs used, model size, wall seconds.
    """
    n = min(budget.train_images, len(train_frames))
    scale = np.float32(1.0 / max(max_dn - black_level, 1))

    def feats(frames: np.ndarray) -> torch.Tensor:
        f = invariant_features(frames, scheme).astype(np.float32)
        return torch.from_numpy((f - np.float32(black_level)) * scale)

    x_train, x_test = feats(train_frames[:n]), feats(test_frames)
    torch.manual_seed(budget.seed)
    model = mlp(x_train.shape[1], budget.hidden, num_classes)
    log = train_to_convergence(model, x_train, np.asarray(y_train[:n]), budget, progress,
                               f"{scheme}: invariant learner")
    return {"scheme": scheme, "features": INVARIANT_FEATURES[scheme], "accuracy": accuracy(model, x_test, y_test),
            "test_images": len(test_frames),
            "budget": {**budget.to_dict(), "train_images": n, **log,
                       "model": f"MLP {x_train.shape[1]}-{budget.hidden}-{budget.hidden}-{num_classes}",
                       "parameters": sum(p.numel() for p in model.parameters())}}
