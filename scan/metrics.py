"""Recall metrics of image–text retrieval from a similarity matrix or from ranks.

Conventions (as the reference, kuanghuei/SCAN evaluation.py, except for ties):
- sims is (N images, M captions) with M = N * caps_per_image; caption j belongs to image
  j // caps_per_image.
- A rank is 0-based and counts the candidates scoring STRICTLY higher than the positive. Ties are
  therefore resolved in the query's favour: a candidate that ties with the positive does not push it
  down. (The reference sorts with ``np.argsort(...)[::-1]``, so its tie order depends on the sort
  algorithm and the indices; counting is order-free, exact, and what the sharded evaluator can do
  tile by tile.)
- i2t: an image's rank is the best rank among its own captions, i.e. the number of captions scoring
  strictly higher than its best-scoring own caption. t2i: the number of images scoring strictly
  higher than the caption's image.
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
    out = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def metrics_from_ranks(i2t_ranks: np.ndarray | torch.Tensor,
                       t2i_ranks: np.ndarray | torch.Tensor) -> Metrics:
    """0-based integer ranks (N,) of the image queries and (M,) of the caption queries → metrics."""
    parts = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        ranks = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
        if ranks.ndim != 1 or ranks.size == 0 or not np.issubdtype(ranks.dtype, np.integer):
            raise ValueError(f"{name}_ranks: expected a non-empty 1-D integer array, got dtype "
                             f"{ranks.dtype} shape {ranks.shape}")
        if ranks.min() < 0:
            raise ValueError(f"{name}_ranks: ranks are 0-based counts, got {int(ranks.min())}")
        parts[name] = _direction(ranks)
    return {**parts, "rsum": sum(parts[d][r] for d in ("i2t", "t2i") for r in RECALLS)}


def retrieval_ranks(sims: np.ndarray | torch.Tensor,
                    caps_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """sims (N, M) → (i2t ranks (N,), t2i ranks (M,)), 0-based counts of strictly better candidates."""
    sims = _as_numpy(sims)
    _check_sims(sims, caps_per_image)
    n, m = sims.shape
    images = np.arange(n)
    # (N, N, cpi)[i, i] = the scores of image i's own captions → best own caption per image (N,).
    best_own = sims.reshape(n, n, caps_per_image)[images, images].max(axis=1)
    i2t = (sims > best_own[:, None]).sum(axis=1)
    captions = np.arange(m)
    positive = sims[captions // caps_per_image, captions]  # (M,) score of each caption's image
    t2i = (sims > positive[None, :]).sum(axis=0)
    return i2t, t2i


def recall_metrics(sims: np.ndarray | torch.Tensor, caps_per_image: int = 5) -> Metrics:
    """R@1/5/10, medr, meanr both ways and rsum of one (N, N * caps_per_image) similarity matrix."""
    return metrics_from_ranks(*retrieval_ranks(sims, caps_per_image))


def mean_metrics(metrics: Sequence[Metrics]) -> Metrics:
    """Field-by-field mean of several metric dicts; rsum is the sum of the six MEAN recalls."""
    if not metrics:
        raise ValueError("mean_metrics: no metrics to average")
    parts = {d: {f: float(np.mean([m[d][f] for m in metrics])) for f in FIELDS}
             for d in ("i2t", "t2i")}
    return {**parts, "rsum": sum(parts[d][r] for d in ("i2t", "t2i") for r in RECALLS)}


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
