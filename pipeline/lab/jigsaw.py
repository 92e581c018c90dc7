"""A jigsaw-solver attack on single protected frames of the quad and plane schemes.

A quad frame is a shuffle of whole 2x2 cells, a plane frame four independent shuffles of single
samples (one per CFA phase): both are jigsaw puzzles with square pieces of known size, and a
solver that needs only the one frame is untouched by per-frame rotation (Chuman and Kiya,
arXiv:2211.02369, restore block-shuffled images the same way).

:func:`solve_jigsaw` is a greedy placer by edge compatibility (a simple relative of Pomeranz et
al. 2011): start from the most distinctive piece, then repeatedly put the free piece that fits
best at the open position where it fits best, scoring a (position, piece) by the mean
dissimilarity of the piece's edges to its already placed neighbours, divided by their number (so
positions closed on more sides go first). The placed region may not outgrow the frame.

Dissimilarity of two edges: the sum of squared differences of the facing boundary samples, each
side's sample extrapolated one step into its neighbour where the piece is at least 2 wide
(Gallagher's prediction, halves averaged), divided by the pieces' second-best dissimilarity plus
one (Pomeranz's normalisation).

:func:`jigsaw_scores` compares a solution with the truth: pieces at their true position, true
neighbour pairs that the solution keeps adjacent (shift-invariant), and the restored frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

JIGSAW_SCHEMES = ("quad", "plane")


@dataclass
class Pieces:
    """A frame cut into pieces: ``pixels`` (P, p, p) float64 values, ``cls`` (P,) the class of each piece
    (plane: CFA phase; quad: 0), ``source`` (P, p*p) flat frame positions of each piece's samples."""

    scheme: str
    height: int
    width: int
    size: int
    pixels: np.ndarray = field(repr=False)
    cls: np.ndarray = field(repr=False)
    source: np.ndarray = field(repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        """Piece positions of the frame: (rows, cols)."""
        return self.height // self.size, self.width // self.size


def cut_pieces(frame: np.ndarray, scheme: str) -> Pieces:
    """Cut one (H, W) frame (H, W even) into the pieces its scheme moves: quad, the 2x2 cells
    (row-major); plane, every sample (class = its phase 2 (y % 2) + x % 2)."""
    frame = np.asarray(frame)
    if scheme not in JIGSAW_SCHEMES:
        raise ValueError(f"scheme: expected one of {', '.join(JIGSAW_SCHEMES)}, got {scheme!r}")
    if frame.ndim != 2 or frame.shape[0] % 2 or frame.shape[1] % 2 or min(frame.shape) < 2:
        raise ValueError(f"frame: expected one (H, W) frame with H, W even, got shape {frame.shape}")
    h, w = frame.shape
    pos = np.arange(h * w).reshape(h, w)
    if scheme == "quad":
        px = frame.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 2, 2)
        src = pos.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
        return Pieces(scheme, h, w, 2, px.astype(np.float64), np.zeros(len(px), np.int64), src)
    y, x = np.divmod(pos.reshape(-1), w)
    return Pieces(scheme, h, w, 1, frame.reshape(-1, 1, 1).astype(np.float64), 2 * (y % 2) + x % 2,
                  pos.reshape(-1, 1))


def edge_dissimilarity(pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise edge dissimilarities of square pieces.

    Args:
        pieces: (P, p, p) values.

    Returns:
        (lr, tb), each (P, P) float64: ``lr[i, j]`` for piece j right of piece i, ``tb[i, j]`` for j
        below i (see the module docstring).
    """
    pieces = np.asarray(pieces, np.float64)
    if pieces.ndim != 3 or pieces.shape[1] != pieces.shape[2]:
        raise ValueError(f"pieces: expected (P, p, p), got {pieces.shape}")
    lr, tb = _lr(pieces), _lr(pieces.transpose(0, 2, 1))
    return _normalise(lr), _normalise(tb)


def _normalise(d: np.ndarray) -> np.ndarray:
    """Divide by the smaller second-best of both pieces (Pomeranz et al.), plus 1: an edge that fits
    many pieces about equally (flat background) scores about 1, a distinctive best fit well below."""
    n = len(d)
    if n < 3:
        return d
    e = d + np.diag(np.full(n, np.inf))
    q1 = np.partition(e, 1, axis=1)[:, 1]  # second-best of each i
    q0 = np.partition(e, 1, axis=0)[1, :]  # second-best of each j
    return d / (np.minimum(q1[:, None], q0[None, :]) + 1.0)


def _lr(px: np.ndarray) -> np.ndarray:
    right, left = px[:, :, -1], px[:, :, 0]  # (P, p): i's right edge, j's left edge
    if px.shape[2] < 2:
        return ((right[:, None, :] - left[None, :, :]) ** 2).sum(-1)
    pred_j = 2 * right - px[:, :, -2]  # i's guess of j's left edge
    pred_i = 2 * left - px[:, :, 1]  # j's guess of i's right edge
    return 0.5 * (((pred_j[:, None, :] - left[None, :, :]) ** 2).sum(-1)
                  + ((right[:, None, :] - pred_i[None, :, :]) ** 2).sum(-1))


def _seed_piece(lr: np.ndarray, tb: np.ndarray) -> int:
    """The piece with the most mutual best neighbours (ties: the largest dissimilarity spread, i.e. the
    most distinctive edges)."""
    n = len(lr)
    counts = np.zeros(n, np.int64)
    for d in (lr, tb):
        d = d + np.diag(np.full(n, np.inf))
        best_right, best_left = d.argmin(1), d.argmin(0)
        counts += best_left[best_right] == np.arange(n)
        counts += best_right[best_left] == np.arange(n)
    spread = np.nan_to_num(np.where(np.isinf(lr), np.nan, lr)).std(1) + np.nan_to_num(tb).std(1)
    return int(np.lexsort((-spread, -counts))[0])


def solve_jigsaw(pieces: Pieces) -> np.ndarray:
    """Greedy placement of every piece (see the module docstring).

    Returns:
        (rows, cols) int64: the piece placed at each piece position of the frame.
    """
    lr, tb = edge_dissimilarity(pieces.pixels)
    gh, gw = pieces.grid
    n = gh * gw
    if len(pieces.pixels) != n:
        raise ValueError(f"pieces: expected {n} pieces for a {gh}x{gw} grid, got {len(pieces.pixels)}")
    align = 2 if pieces.scheme == "plane" else 1  # plane: phases fix the parity of every position
    ch, cw = 2 * gh + 2, 2 * gw + 2  # canvas: room to grow either way from the seed
    canvas = np.full((ch, cw), -1, np.int64)
    cost = np.zeros((ch * cw, n))
    count = np.zeros(ch * cw, np.int64)
    slot_cls = (2 * (np.arange(ch)[:, None] % 2) + np.arange(cw)[None, :] % 2).reshape(-1) if align == 2 else \
        np.zeros(ch * cw, np.int64)
    free = np.ones(n, bool)
    box = [ch, -1, cw, -1]  # min row, max row, min col, max col

    def place(piece: int, y: int, x: int) -> None:
        canvas[y, x] = piece
        free[piece] = False
        box[:] = [min(box[0], y), max(box[1], y), min(box[2], x), max(box[3], x)]
        for dy, dx, d in ((0, -1, lr[:, piece]), (0, 1, lr[piece, :]), (-1, 0, tb[:, piece]), (1, 0, tb[piece, :])):
            yy, xx = y + dy, x + dx
            if 0 <= yy < ch and 0 <= xx < cw:
                cost[yy * cw + xx] += d
                count[yy * cw + xx] += 1

    def fits(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y0 = np.minimum(box[0], y) // align * align
        x0 = np.minimum(box[2], x) // align * align
        return (np.maximum(box[1], y) - y0 < gh) & (np.maximum(box[3], x) - x0 < gw)

    seed = _seed_piece(lr, tb)
    sy = gh + int(pieces.cls[seed]) // 2 if align == 2 else gh
    sx = gw + int(pieces.cls[seed]) % 2 if align == 2 else gw
    sy, sx = sy - (sy - int(pieces.cls[seed]) // 2) % align, sx - (sx - int(pieces.cls[seed]) % 2) % align
    place(seed, sy, sx)
    cls = pieces.cls
    for _ in range(n - 1):
        open_ = np.flatnonzero((count > 0) & (canvas.reshape(-1) < 0))
        open_ = open_[fits(*np.divmod(open_, cw))]
        cand = np.flatnonzero(free)
        score = cost[open_][:, cand] / (count[open_, None] ** 2)
        score[slot_cls[open_][:, None] != cls[cand][None, :]] = np.inf
        best = int(np.argmin(score))
        if not np.isfinite(score.flat[best]):
            break
        slot, piece = divmod(best, len(cand))
        piece = int(cand[piece])
        place(piece, *divmod(int(open_[slot]), cw))
    y0, x0 = box[0] // align * align, box[2] // align * align
    y0, x0 = min(y0, ch - gh), min(x0, cw - gw)
    out = canvas[y0:y0 + gh, x0:x0 + gw].copy()
    if free.any():  # nothing fitted any more: the rest fill the holes of their class in order
        holes = np.flatnonzero(out.reshape(-1) < 0)
        hy, hx = np.divmod(holes, gw)
        hole_cls = 2 * ((y0 + hy) % 2) + (x0 + hx) % 2 if align == 2 else np.zeros(len(holes), np.int64)
        for c in np.unique(cls[free]):
            left = np.flatnonzero(free & (cls == c))
            spots = holes[hole_cls == c][:len(left)]
            out.reshape(-1)[spots] = left[:len(spots)]
    return out


def assemble(frame: np.ndarray, pieces: Pieces, layout: np.ndarray, fill: int = 0) -> np.ndarray:
    """The restored (H, W) frame: piece ``layout[r, c]`` at piece position (r, c); -1 gets ``fill``.

    Returns:
        (H, W) array of the frame's dtype.
    """
    src = source_map(pieces, layout)
    flat = np.asarray(frame).reshape(-1)
    return np.where(src >= 0, flat[np.maximum(src, 0)], fill).astype(flat.dtype).reshape(pieces.height, pieces.width)


def source_map(pieces: Pieces, layout: np.ndarray, fill: int = -1) -> np.ndarray:
    """(H*W,) int64: the protected-frame position whose sample the solution puts at each position."""
    gh, gw = pieces.grid
    p = pieces.size
    if layout.shape != (gh, gw):
        raise ValueError(f"layout: expected ({gh}, {gw}), got {layout.shape}")
    src = np.where(layout[..., None] >= 0, pieces.source[np.maximum(layout, 0)], fill)  # (gh, gw, p*p)
    if pieces.scheme == "plane":
        return src.reshape(-1)
    return src.reshape(gh, gw, p, p).transpose(0, 2, 1, 3).reshape(-1)


def canonical_pieces(pieces: Pieces) -> Pieces:
    """The same pieces in an order that depends on their values only (class, then values), so every
    shuffle of one frame gives the solver the same input: its solution cannot depend on the key."""
    flat = pieces.pixels.reshape(len(pieces.pixels), -1)
    order = np.lexsort((*flat.T[::-1], pieces.cls))
    return Pieces(pieces.scheme, pieces.height, pieces.width, pieces.size, pieces.pixels[order], pieces.cls[order],
                  pieces.source[order])


def jigsaw_scores(frame: np.ndarray, pieces: Pieces, layout: np.ndarray, table: np.ndarray) -> dict[str, float]:
    """How well ``layout`` restores the plain frame whose protected version ``frame`` was cut into ``pieces``.

    Args:
        frame: (H, W) the protected frame; layout: (rows, cols) from :func:`solve_jigsaw`.
        table: (H*W,) the readout table ``pi`` (``protected.flat[s] == plain.flat[pi[s]]``).

    Returns:
        ``position_accuracy``: fraction of piece positions holding the plain frame's values there
        (pieces with equal values are interchangeable); ``neighbour_accuracy``: fraction of the plain
        frame's adjacent piece pairs (left-right and top-bottom) that the solution keeps adjacent the
        same way, wherever it put them.
    """
    h, w = pieces.height, pieces.width
    p = pieces.size
    plain = np.empty(h * w, np.asarray(frame).dtype)
    plain[np.asarray(table, np.int64)] = np.asarray(frame).reshape(-1)
    same = assemble(frame, pieces, layout).reshape(-1) == plain
    pos_acc = float(same.reshape(h // p, p, w // p, p).all(axis=(1, 3)).mean())
    src = source_map(pieces, layout)
    truth = np.empty(h * w, np.int64)
    truth[np.asarray(table, np.int64)] = np.arange(h * w)  # plain position -> protected position
    placed = np.full(h * w, -1, np.int64)  # protected position -> where the solution put it
    ok = src >= 0
    placed[src[ok]] = np.flatnonzero(ok)
    where = placed[truth].reshape(h, w)  # plain position -> solution position (-1: not placed)
    right = (where[:, p - 1:-1:p], where[:, p::p])  # pairs across piece boundaries only
    below = (where[p - 1:-1:p, :], where[p::p, :])
    kept = [((right[0] >= 0) & (right[1] == right[0] + 1) & (right[0] % w != w - 1)).reshape(-1),
            ((below[0] >= 0) & (below[1] == below[0] + w)).reshape(-1)]
    return {"position_accuracy": pos_acc, "neighbour_accuracy": float(np.concatenate(kept).mean())}


def jigsaw_attack(protected: np.ndarray, scheme: str, tables: np.ndarray | None = None, fill: int = 0
                  ) -> dict[str, Any]:
    """Solve every single frame of ``protected`` (B, H, W) on its own, pieces in canonical order
    (:func:`canonical_pieces`): any two shuffles of one frame give the same restored frame.

    Args:
        tables: (B, H*W) true readout tables, for the scores (None: no scores).

    Returns:
        ``{"restored": (B, H, W), "position_accuracy": (B,), "neighbour_accuracy": (B,)}`` (scores
        only with tables).
    """
    protected = np.asarray(protected)
    if protected.ndim != 3:
        raise ValueError(f"protected: expected (B, H, W), got {protected.shape}")
    restored = np.empty_like(protected)
    scores: dict[str, list[float]] = {"position_accuracy": [], "neighbour_accuracy": []}
    for i, frame in enumerate(protected):
        pieces = canonical_pieces(cut_pieces(frame, scheme))
        layout = solve_jigsaw(pieces)
        restored[i] = assemble(frame, pieces, layout, fill)
        if tables is not None:
            for k, v in jigsaw_scores(frame, pieces, layout, tables[i]).items():
                scores[k].append(v)
    out: dict[str, Any] = {"restored": restored}
    if tables is not None:
        out.update({k: np.array(v) for k, v in scores.items()})
    return out
