"""Recall metrics of image–text retrieval from a similarity matrix or from ranks.

Conventions (as the reference, kuanghuei/SCAN evaluation.py, except for ties):
- sims is (N images, M captions) with M = N * caps_per_image; caption j belongs to image
  j // caps_per_image.
- A rank is 0-based and counts the COMPETITORS scoring at least as high as the positive: a
  competitor that ties with the positive ranks above it (ties count against the query). A model
  that gives every pair one score therefore gets the recall of the worst order (i2t R@K = 0 once
  the other images' captions number K or more, t2i likewise), never a perfect one. The reference
  sorts with ``np.argsort(...)[::-1]``, so its tie order depends on the sort and the indices: our
  ranks equal its ranks on tie-free matrices and are never better than its on matrices with ties.
  Counting is order-free, exact, and what the sharded evaluator can do tile by tile.
- i2t: an image's rank is the best rank among its own captions, i.e. the number of OTHER images'
  captions scoring at least its best-scoring own caption (its own captions are not competitors).
  t2i: the number of other images scoring at least the caption's own image.
- Ties are reported: ``metrics["ties"]`` counts the queries with at least one competitor scoring
  exactly the positive's score, per direction (``tie_warning`` words it above 1% of the queries:
  a low precision, or a collapsed model).
- R@K = 100 · fraction of queries with rank < K; medr = floor(median(rank)) + 1 and
  meanr = mean(rank) + 1 (1-based, as the reference); rsum = the sum of the six recalls.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Metrics = dict  # {"i2t": {"r1","r5","r10","medr","meanr"}, "t2i": {...}, "rsum": float}
RECALLS = ("r1", "r5", "r10")
FIELDS = RECALLS + ("medr", "meanr")


def _as_numpy(sims: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(sims, torch.Tensor):
        sims = sims.detach().cpu()
        if sims.dtype in (torch.float16, torch.bfloat16):
            sims = sims.float()  # numpy has no bfloat16; the upcast keeps every comparison exact
        sims = sims.numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims: expected a 2-D (images, captions) matrix, got shape {sims.shape}")
    if not np.issubdtype(sims.dtype, np.floating):
        raise ValueError(f"sims: expected floating-point scores, got dtype {sims.dtype}")
    return sims


def _check_sims(sims: np.ndarray, caps_per_image: int) -> None:
    n, m = sims.shape
    if caps_per_image < 1 or m != n * caps_per_image:
        raise ValueError(f"sims has shape ({n}, {m}) but {n} images × caps_per_image "
                         f"{caps_per_image} = {n * caps_per_image} captions are expected")
    bad = ~np.isfinite(sims)
    if bad.any():
        # NaN compares False with everything, so it would silently rank first or last.
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"sims contains {int(bad.sum())} non-finite value(s), "
                         f"e.g. sims[{i}, {j}] = {sims[i, j]}")


def _direction(ranks: np.ndarray) -> dict[str, float]:
    # 100 · count / queries, in the reference's order of operations: the same float to the last bit.
    out = {f"r{k}": 100.0 * int(np.count_nonzero(ranks < k)) / ranks.size for k in (1, 5, 10)}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


TIE_WARN_FRACTION = 0.01  # above this share of queries with a tied competitor, outputs warn


def metrics_from_ranks(i2t_ranks: np.ndarray | torch.Tensor, t2i_ranks: np.ndarray | torch.Tensor,
                       i2t_ties: np.ndarray | torch.Tensor | None = None,
                       t2i_ties: np.ndarray | torch.Tensor | None = None) -> Metrics:
    """0-based integer ranks (N,) of the image queries and (M,) of the caption queries → metrics.

    ``i2t_ties`` / ``t2i_ties``: per query, the competitors scoring exactly the positive's score;
    given, ``metrics["ties"]`` counts the queries that have any.
    """
    parts = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        ranks = _int_array(ranks, f"{name}_ranks")
        if ranks.min() < 0:
            raise ValueError(f"{name}_ranks: ranks are 0-based counts, got {int(ranks.min())}")
        parts[name] = _direction(ranks)
    out = {**parts, "rsum": sum(parts[d][r] for d in ("i2t", "t2i") for r in RECALLS)}
    if i2t_ties is not None and t2i_ties is not None:
        i2t_t, t2i_t = _int_array(i2t_ties, "i2t_ties"), _int_array(t2i_ties, "t2i_ties")
        out["ties"] = {"i2t": int((i2t_t > 0).sum()), "t2i": int((t2i_t > 0).sum()),
                       "queries": int(i2t_t.size + t2i_t.size)}
    return out


def _int_array(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name}: expected a non-empty 1-D integer array, got dtype "
                         f"{values.dtype} shape {values.shape}")
    return values


def tie_fraction(metrics: Metrics) -> float | None:
    """The share of queries (both directions) that had a competitor tied with their positive."""
    ties = metrics.get("ties")
    return (ties["i2t"] + ties["t2i"]) / ties["queries"] if ties and ties["queries"] else None


def tie_warning(metrics: Metrics) -> str | None:
    """A warning in words when more than 1% of the queries had a tied competitor, else None."""
    frac = tie_fraction(metrics)
    if frac is None or frac <= TIE_WARN_FRACTION:
        return None
    t = metrics["ties"]
    return (f"{100 * frac:.1f}% of the queries ({t['i2t']} image and {t['t2i']} caption queries) "
            f"had a competitor scoring exactly their positive's score; ties count against the "
            f"query, so these recalls are a floor. Many ties mean scores computed at too low a "
            f"precision (try eval.precision=fp32) or a collapsed model that scores pairs alike")


def rank_counts(sims: np.ndarray | torch.Tensor, caps_per_image: int = 5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sims (N, M) → 0-based ranks (i2t (N,), t2i (M,)) and tie counts (i2t (N,), t2i (M,)).

    A rank counts the competitors scoring at least the positive (ties against the query); a tie
    count, the competitors scoring exactly the positive.
    """
    sims = _as_numpy(sims)
    _check_sims(sims, caps_per_image)
    n, m = sims.shape
    images = np.arange(n)
    # (N, N, cpi)[i, i] = the scores of image i's own captions → best own caption per image (N,).
    own = sims.reshape(n, n, caps_per_image)[images, images]
    best_own = own.max(axis=1)
    # Own captions are no competitors: take those reaching the best out of the counts.
    i2t = (sims >= best_own[:, None]).sum(axis=1) - (own >= best_own[:, None]).sum(axis=1)
    i2t_eq = (sims == best_own[:, None]).sum(axis=1) - (own == best_own[:, None]).sum(axis=1)
    captions = np.arange(m)
    positive = sims[captions // caps_per_image, captions]  # (M,) score of each caption's image
    t2i = (sims >= positive[None, :]).sum(axis=0) - 1  # the own image is no competitor
    t2i_eq = (sims == positive[None, :]).sum(axis=0) - 1
    return i2t, t2i, i2t_eq, t2i_eq


def retrieval_ranks(sims: np.ndarray | torch.Tensor,
                    caps_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """sims (N, M) → (i2t ranks (N,), t2i ranks (M,)), 0-based, ties counted against the query."""
    return rank_counts(sims, caps_per_image)[:2]


def recall_metrics(sims: np.ndarray | torch.Tensor, caps_per_image: int = 5) -> Metrics:
    """R@1/5/10, medr, meanr both ways, rsum and tied queries of one (N, N * cpi) matrix."""
    return metrics_from_ranks(*rank_counts(sims, caps_per_image))


def mean_metrics(metrics: Sequence[Metrics]) -> Metrics:
    """Field-by-field mean of several metric dicts; rsum is the sum of the six MEAN recalls (which
    equals the mean of their rsums); tied queries are summed."""
    if not metrics:
        raise ValueError("mean_metrics: no metrics to average")
    parts = {d: {f: float(np.mean([m[d][f] for m in metrics])) for f in FIELDS}
             for d in ("i2t", "t2i")}
    out = {**parts, "rsum": sum(parts[d][r] for d in ("i2t", "t2i") for r in RECALLS)}
    if all("ties" in m for m in metrics):  # the folds' tied queries, added up
        out["ties"] = {k: sum(m["ties"][k] for m in metrics) for k in ("i2t", "t2i", "queries")}
    return out


def coco_1k_folds(sims: np.ndarray | torch.Tensor, caps_per_image: int = 5,
                  folds: int = 5) -> dict[str, Metrics | list[Metrics]]:
    """COCO 1K: metrics of each diagonal block of ``folds`` equal image folds, and their mean.

    sims (5000, 25000) for COCO 5K test: fold f is images [1000 f, 1000 (f + 1)) against their own
    captions [5000 f, 5000 (f + 1)), as the reference's ``evalrank(fold5=True)``.
    Returns {"folds": [metrics per fold], "mean": mean_metrics(folds)}.

    The reference's mean rsum is wrong: each fold's row is [r(5), ri(5), ar, ari, rsum] and the mean
    prints ``rsum = mean[10] * 6``, i.e. six times the mean i2t average recall (ignoring t2i), and
    labels mean[11] (the t2i average) as the i2t average and mean[12] (the mean rsum) as the t2i
    average. Here rsum is the sum of the six mean recalls (which equals the mean of the fold rsums).
    """
    sims = _as_numpy(sims)
    n = sims.shape[0]
    if folds < 1 or n % folds:
        raise ValueError(f"sims has {n} images, which do not split into {folds} equal folds")
    _check_sims(sims, caps_per_image)
    size = n // folds
    per_fold = [
        recall_metrics(sims[f * size:(f + 1) * size,
                            f * size * caps_per_image:(f + 1) * size * caps_per_image], caps_per_image)
        for f in range(folds)
    ]
    return {"folds": per_fold, "mean": mean_metrics(per_fold)}
