"""Exact retrieval ranks over the full N × M similarity matrix, tiled over ranks: the tiles,
their counts and how partial results combine (docs/DESIGN.md §4).

Tiles. Images are cut into blocks that never cross a fold (COCO 1K); caption block b holds the
captions of image block b, so tile (a, b) is image block a × the captions of image block b and the
matrix is a square grid of tiles. A query's positive lies in exactly one DIAGONAL tile (a, a):
image i's own captions and caption c's own image are in the diagonal tile of i's (c's) block.

Two passes, every tile computed exactly once (so no reliance on bitwise-reproducible kernels):
  pass 1: each rank scores its diagonal tiles, takes the positives (i2t: best own caption, t2i:
          own image) and counts, inside those tiles, the competitors scoring at least as high
          (the query's own captions / own image are no competitors); the O(N + M) positives are
          combined over ranks.
  pass 2: each rank scores its off-diagonal tiles and counts per query the competitors scoring
          at least the global positive; the counts are summed over ranks.
Rank = number of competitors scoring at least the positive (ties count against the query), and
each query's tied competitors are counted beside it: the same rule as ``scan.metrics.rank_counts``,
so the result equals ``recall_metrics`` on the full matrix made of these tiles exactly. Rank r owns the tile ROWS a ≡ r (mod world): a Ray actor or a rank
then needs only its image blocks' rows and every caption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from scan.eval.encode import Embeddings
from scan.metrics import Metrics, mean_metrics, metrics_from_ranks
from scan.precision import lowest
from scan.scorers import Scorer, as_scorer

PROTOCOLS = ("split", "f30k1k", "coco1k", "coco5k")
COCO_FOLD = 1000  # images per COCO 1K fold
COUNTS = ("i2t", "t2i", "i2t_fold", "t2i_fold")  # the rank counts a Partial accumulates
RANK_RULE = "competitors scoring >= the positive (ties count against the query)"


class NonFiniteScores(ValueError):
    """A tile holds a NaN or infinite score: nothing can be ranked."""


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: its embeddings of the split and how it compares them."""

    emb: Embeddings
    scorer: Scorer  # an XAttnConfig is taken as SCAN's scorer with it

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorer", as_scorer(self.scorer))


@dataclass(frozen=True)
class TilePlan:
    """Image blocks [i0, i1) (never crossing a fold) and the folds [f0, f1) they partition.

    ``within_folds`` (COCO 1K): only the tiles inside a fold are scored, a fifth of the 5K matrix.
    """

    blocks: tuple[tuple[int, int], ...]
    folds: tuple[tuple[int, int], ...]
    caps_per_image: int
    within_folds: bool = False

    @property
    def n_images(self) -> int:
        return self.blocks[-1][1]

    @property
    def n_captions(self) -> int:
        return self.n_images * self.caps_per_image

    def rows(self, a: int) -> slice:
        return slice(*self.blocks[a])

    def cols(self, b: int) -> slice:
        i0, i1 = self.blocks[b]
        return slice(i0 * self.caps_per_image, i1 * self.caps_per_image)

    def fold_of(self, a: int) -> int:
        i0 = self.blocks[a][0]
        return next(f for f, (f0, f1) in enumerate(self.folds) if f0 <= i0 < f1)

    def diagonal_tiles(self, rank: int, world: int) -> list[tuple[int, int]]:
        """Pass 1 of ``rank``: the diagonal tiles of its rows a ≡ rank (mod world)."""
        return [(a, a) for a in range(rank, len(self.blocks), world)]

    def offdiagonal_tiles(self, rank: int, world: int) -> list[tuple[int, int]]:
        """Pass 2 of ``rank``: the rest of its rows (of its folds, when ``within_folds``)."""
        return [(a, b) for a in range(rank, len(self.blocks), world)
                for b in range(len(self.blocks))
                if b != a and (not self.within_folds or self.fold_of(a) == self.fold_of(b))]

    def describe(self) -> dict:
        return {"blocks": [list(b) for b in self.blocks], "folds": [list(f) for f in self.folds],
                "within_folds": self.within_folds,
                "caps_per_image": self.caps_per_image}


def protocol_folds(protocol: str, n_images: int, fold_images: int = COCO_FOLD) -> list[tuple[int, int]]:
    """The image folds of an evaluation protocol; one fold is the whole split.

    COCO 1K and 5K share the five folds of ``fold_images`` images: one run over the 5K tiles
    yields both (a tile inside a fold counts for both, a tile across folds only for 5K).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if n_images < 1:
        raise ValueError(f"eval protocol {protocol!r}: the split has no images")
    if protocol == "f30k1k" and n_images != 1000:
        raise ValueError(f"eval protocol 'f30k1k' expects the 1,000-image Flickr30K test split, "
                         f"got {n_images} images (use protocol 'split' for other splits)")
    if protocol in ("coco1k", "coco5k"):
        if n_images != 5 * fold_images:
            raise ValueError(f"eval protocol {protocol!r} expects five {fold_images}-image folds "
                             f"(the {5 * fold_images}-image COCO test split), got {n_images} images")
        return [(f * fold_images, (f + 1) * fold_images) for f in range(5)]
    return [(0, n_images)]


def make_plan(n_images: int, caps_per_image: int, *, folds: Sequence[tuple[int, int]],
              image_block: int = 0, world: int = 1, within_folds: bool = False) -> TilePlan:
    """Blocks of ``image_block`` images per fold.

    0: about four tile rows per rank (load balance, resume granularity), but at least 32 images
    (smaller tiles spend more time in per-call overhead than in arithmetic).
    """
    if image_block < 0:
        raise ValueError(f"eval.image_block must be >= 0, got {image_block}")
    block = image_block or max(32, math.ceil(n_images / (4 * world)))
    blocks = tuple((i, min(i + block, f1)) for f0, f1 in folds for i in range(f0, f1, block))
    return TilePlan(blocks, tuple(tuple(f) for f in folds), caps_per_image, within_folds)


def score_tile(members: Sequence[Member], rows: slice, cols: slice, *,
               memory_budget_mb: int = 1024) -> torch.Tensor:
    """(rows, cols) float32 scores; an ensemble averages its members' scores (sum, then divide)."""
    total = None
    for m in members:
        e = m.emb
        s = m.scorer(e.images[rows], e.captions[cols], e.cap_lens[cols], e.img_lens[rows],
                     memory_budget_mb=memory_budget_mb).float()
        total = s if total is None else total + s
    assert total is not None
    return total / len(members) if len(members) > 1 else total


def _top_k(scores: torch.Tensor, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (Q, C) scores, the k best (score, global index offset + column).

    A stable descending sort keeps the lower index first among ties, so the export is the same
    whatever the tiling (``torch.topk`` picks among ties arbitrarily).
    """
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.float32), np.zeros((scores.shape[0], 0), np.int64)
    s, i = torch.sort(scores, dim=1, descending=True, stable=True)
    return s[:, :k].cpu().numpy(), (i[:, :k] + offset).cpu().numpy()


def merge_top_k(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, A) candidates → the k best per row, by score then lower index (a stable order)."""
    order = np.lexsort((index, -scores), axis=-1)[:, :k]
    s = np.take_along_axis(scores, order, -1)
    i = np.take_along_axis(index, order, -1)
    missing = k - s.shape[1]
    if missing > 0:
        s = np.pad(s, ((0, 0), (0, missing)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, missing)), constant_values=-1)
    return s, i


@dataclass
class TileRecord:
    """What is kept of tile (a, b) once its scores are gone."""

    a: int
    b: int
    i2t: np.ndarray  # (rows,) int64, competitor captions of block b scoring >= each row's positive
    t2i: np.ndarray  # (cols,) int64, competitor images of block a scoring >= each column's positive
    i2t_eq: np.ndarray  # (rows,) int64, of those, the ones scoring exactly the positive (ties)
    t2i_eq: np.ndarray  # (cols,) int64
    score_range: np.ndarray  # (2,) float32, the tile's lowest and highest score
    pos_img: np.ndarray  # (rows,) float32 positives (diagonal tiles), (0,) otherwise
    pos_cap: np.ndarray  # (cols,) float32 positives (diagonal tiles), (0,) otherwise
    top_row_s: np.ndarray  # (rows, K) float32 best captions per image within the tile
    top_row_i: np.ndarray  # (rows, K) int64 their global caption indices
    top_col_s: np.ndarray  # (cols, K) best images per caption within the tile
    top_col_i: np.ndarray  # (cols, K)


def count_tile(plan: TilePlan, a: int, b: int, scores: torch.Tensor, topk: int,
               pos_img: torch.Tensor | None = None, pos_cap: torch.Tensor | None = None) -> TileRecord:
    """Counts the competitors scoring at least (and exactly) the positive in one tile.
    scores (rows, cols) float32.

    Diagonal tiles take their positives from ``scores`` itself; others need the global positives
    ``pos_img`` (rows,) and ``pos_cap`` (cols,).
    """
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero()[0].tolist()
        r, c = bad[0] + plan.rows(a).start, bad[1] + plan.cols(b).start
        raise NonFiniteScores(f"non-finite similarity in tile ({a}, {b}): image {r}, caption {c} "
                              f"scores {scores[bad[0], bad[1]].item()}; refusing to rank NaN/inf")
    diagonal = a == b
    if diagonal:
        n, cpi = scores.shape[0], plan.caps_per_image
        own = scores.reshape(n, n, cpi).diagonal(dim1=0, dim2=1).T  # (rows, cpi) own captions
        pos_img, pos_cap = own.max(dim=1).values, own.reshape(-1)
    assert pos_img is not None and pos_cap is not None
    ge_img, eq_img = scores >= pos_img[:, None], scores == pos_img[:, None]
    ge_cap, eq_cap = scores >= pos_cap[None, :], scores == pos_cap[None, :]
    if diagonal:  # a query's own captions (own image) are no competitors
        rows = torch.arange(n, device=scores.device).repeat_interleave(cpi)
        cols = torch.arange(n * cpi, device=scores.device)
        for mask in (ge_img, eq_img, ge_cap, eq_cap):
            mask[rows, cols] = False
    i2t, i2t_eq = ge_img.sum(dim=1), eq_img.sum(dim=1)
    t2i, t2i_eq = ge_cap.sum(dim=0), eq_cap.sum(dim=0)
    row_s, row_i = _top_k(scores, plan.cols(b).start, topk)
    col_s, col_i = _top_k(scores.T, plan.rows(a).start, topk)
    empty = np.zeros(0, np.float32)
    score_range = torch.stack([scores.min(), scores.max()]).cpu().numpy().astype(np.float32)
    return TileRecord(a, b, *(c.cpu().numpy().astype(np.int64) for c in (i2t, t2i, i2t_eq, t2i_eq)),
                      score_range,
                      pos_img.cpu().numpy() if diagonal else empty,
                      pos_cap.cpu().numpy() if diagonal else empty, row_s, row_i, col_s, col_i)


@dataclass
class Partial:
    """Accumulated records of some tiles: what ranks (or Ray actors) combine. All numpy."""

    pos_img: np.ndarray  # (N,) float32, -inf where unknown
    pos_cap: np.ndarray  # (M,)
    i2t: np.ndarray  # (N,) int64 over all tiles
    t2i: np.ndarray  # (M,)
    i2t_fold: np.ndarray  # (N,) over tiles inside one fold (COCO 1K)
    t2i_fold: np.ndarray  # (M,)
    ties: dict[str, np.ndarray]  # the tie counts of the four arrays above, under the same names
    score_range: np.ndarray  # (2,) float32, the lowest and highest score of the tiles so far
    top_i2t: tuple[np.ndarray, np.ndarray]  # (N, K) scores, caption indices
    top_t2i: tuple[np.ndarray, np.ndarray]  # (M, K) scores, image indices
    computed: int = 0
    loaded: int = 0

    @classmethod
    def empty(cls, plan: TilePlan, topk: int) -> "Partial":
        n, m = plan.n_images, plan.n_captions

        def top(q: int) -> tuple[np.ndarray, np.ndarray]:
            return np.full((q, topk), -np.inf, np.float32), np.full((q, topk), -1, np.int64)

        def counts() -> tuple[np.ndarray, ...]:
            return np.zeros(n, np.int64), np.zeros(m, np.int64), np.zeros(n, np.int64), np.zeros(m, np.int64)

        return cls(np.full(n, -np.inf, np.float32), np.full(m, -np.inf, np.float32), *counts(),
                   dict(zip(COUNTS, counts())), np.array([np.inf, -np.inf], np.float32), top(n), top(m))

    def add(self, plan: TilePlan, rec: TileRecord, *, loaded: bool) -> None:
        rows, cols = plan.rows(rec.a), plan.cols(rec.b)
        same_fold = plan.fold_of(rec.a) == plan.fold_of(rec.b)
        self.score_range = _union(self.score_range, rec.score_range)
        for ge, eq, where, name in ((rec.i2t, rec.i2t_eq, rows, "i2t"), (rec.t2i, rec.t2i_eq, cols, "t2i")):
            names = (name, f"{name}_fold") if same_fold else (name,)
            for key in names:
                getattr(self, key)[where] += ge
                self.ties[key][where] += eq
        if rec.a == rec.b:
            self.pos_img[rows] = rec.pos_img
            self.pos_cap[cols] = rec.pos_cap
        k = self.top_i2t[0].shape[1]
        if k:
            self.top_i2t[0][rows], self.top_i2t[1][rows] = merge_top_k(
                np.concatenate([self.top_i2t[0][rows], rec.top_row_s], 1),
                np.concatenate([self.top_i2t[1][rows], rec.top_row_i], 1), k)
            self.top_t2i[0][cols], self.top_t2i[1][cols] = merge_top_k(
                np.concatenate([self.top_t2i[0][cols], rec.top_col_s], 1),
                np.concatenate([self.top_t2i[1][cols], rec.top_col_i], 1), k)
        if loaded:
            self.loaded += 1
        else:
            self.computed += 1

    @classmethod
    def combine(cls, parts: Sequence["Partial"]) -> "Partial":
        """The union of disjoint tile sets: positives by max, counts summed, top-K merged."""
        k = parts[0].top_i2t[0].shape[1]

        def top(name: str) -> tuple[np.ndarray, np.ndarray]:
            s = np.concatenate([getattr(p, name)[0] for p in parts], 1)
            i = np.concatenate([getattr(p, name)[1] for p in parts], 1)
            return merge_top_k(s, i, k)

        return cls(np.max([p.pos_img for p in parts], 0), np.max([p.pos_cap for p in parts], 0),
                   *(sum(getattr(p, key) for p in parts) for key in COUNTS),
                   {key: sum(p.ties[key] for p in parts) for key in COUNTS},
                   _union(*(p.score_range for p in parts)),
                   top("top_i2t"), top("top_t2i"),
                   sum(p.computed for p in parts), sum(p.loaded for p in parts))


def _union(*ranges: np.ndarray) -> np.ndarray:
    """The (lowest, highest) of several (2,) score ranges."""
    return np.array([min(r[0] for r in ranges), max(r[1] for r in ranges)], np.float32)


@dataclass
class EvalResult:
    protocol: str
    metrics: Metrics  # the protocol's figures (COCO 1K: mean of the folds)
    full: Metrics | None  # the whole split (COCO 5K: protocol coco5k; coco1k scores folds only)
    folds: list[Metrics]  # per fold (one fold = the whole split)
    i2t_ranks: np.ndarray  # (N,) 0-based, over the whole split
    t2i_ranks: np.ndarray  # (M,)
    tiles_computed: int  # over all ranks, this run
    tiles_loaded: int  # from resume records
    topk: dict = field(default_factory=dict)  # {"i2t": (scores (N,K), idx), "t2i": ...} when topk > 0
    precision: str = "fp32"  # of the embeddings and scores behind the figures (see precision_of)
    score_range: tuple[float, float] = (-math.inf, math.inf)  # lowest, highest score ranked


def precision_of(members: Sequence[Member]) -> str:
    """The precision the figures were computed in: the lowest of the members' embeddings (the
    scores of a tile are computed in its embeddings' dtype)."""
    return lowest({m.emb.images.dtype for m in members})


def finish(plan: TilePlan, total: Partial, protocol: str, precision: str = "fp32") -> EvalResult:
    """Metrics of a fully combined partial (``full`` is None when only fold tiles were scored)."""
    cpi = plan.caps_per_image
    ties = total.ties
    full = None if plan.within_folds else metrics_from_ranks(total.i2t, total.t2i,
                                                             ties["i2t"], ties["t2i"])
    folds = [metrics_from_ranks(total.i2t_fold[f0:f1], total.t2i_fold[f0 * cpi:f1 * cpi],
                                ties["i2t_fold"][f0:f1], ties["t2i_fold"][f0 * cpi:f1 * cpi])
             for f0, f1 in plan.folds]
    metrics = mean_metrics(folds) if protocol == "coco1k" else full
    top = {"i2t": total.top_i2t, "t2i": total.top_t2i} if total.top_i2t[0].shape[1] else {}
    return EvalResult(protocol, metrics, full, folds, total.i2t, total.t2i, total.computed,
                      total.loaded, top, precision, tuple(float(x) for x in total.score_range))


def fingerprint(members: Sequence[Member], plan: TilePlan, topk: int) -> dict:
    return {"plan": plan.describe(), "topk": topk, "rank": RANK_RULE,
            "members": [{"scorer": m.scorer.describe(), "embeddings": m.emb.digest()} for m in members]}


def plan_members(members: Sequence[Member], *, protocol: str, image_block: int = 0,
                 fold_images: int = COCO_FOLD, world: int = 1, save_sims: bool = False) -> TilePlan:
    """The tile plan of an ensemble's split, after checking the members describe the same split.

    COCO 1K scores the five folds' tiles only (coco5k scores all and reports the folds too),
    unless ``save_sims`` asks for the whole matrix."""
    if not members:
        raise ValueError("evaluate_embeddings: no ensemble members")
    first = members[0].emb
    for j, m in enumerate(members):
        if m.emb.image_keys != first.image_keys or m.emb.caps_per_image != first.caps_per_image:
            raise ValueError(f"ensemble member {j} was encoded from a different split (image keys "
                             f"or caps_per_image differ from member 0)")
    return make_plan(first.num_images, first.caps_per_image,
                     folds=protocol_folds(protocol, first.num_images, fold_images),
                     image_block=image_block, world=world,
                     within_folds=protocol == "coco1k" and not save_sims)
