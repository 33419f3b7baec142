"""A slow, straightforward SCAN scorer and the reference's recall functions, written like the reference.

It follows kuanghuei/SCAN model.py (func_attention, xattn_score_t2i / xattn_score_i2t, l1norm /
l2norm with eps added to the norm, cosine_similarity clamped at eps) on the unpadded words and
regions of each pair, materialising the attended vectors; and evaluation.py's ``i2t`` / ``t2i``
(argsort per query, the rank of the first positive) and the COCO 1K fold summary of ``evalrank``.
Other tests use them as ground truth and as a peer.
"""
from __future__ import annotations

import numpy
import torch
import torch.nn.functional as F
from torch import Tensor

from scan.xattn import XAttnConfig

EPS = 1e-8


def _l2norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _l1norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + EPS)


def _cosine(x1: Tensor, x2: Tensor, dim: int) -> Tensor:
    w12 = (x1 * x2).sum(dim)
    return w12 / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=EPS)


def func_attention(query: Tensor, context: Tensor, cfg: XAttnConfig) -> tuple[Tensor, Tensor]:
    """query (queryL, d), context (sourceL, d) -> attended (queryL, d), attn (queryL, sourceL)."""
    attn = context @ query.t()  # (sourceL, queryL)
    kind = cfg.raw_feature_norm
    if kind == "softmax":
        attn = torch.softmax(attn, dim=1)
    elif kind == "l2norm":
        attn = _l2norm(attn, 1)
    elif kind == "clipped_l2norm":
        attn = _l2norm(F.leaky_relu(attn, 0.1), 1)
    elif kind == "l1norm":
        attn = _l1norm(attn, 1)
    elif kind == "clipped_l1norm":
        attn = _l1norm(F.leaky_relu(attn, 0.1), 1)
    elif kind == "clipped":
        attn = F.leaky_relu(attn, 0.1)
    elif kind != "no_norm":
        raise ValueError(f"unknown raw_feature_norm {kind!r}")
    attn = torch.softmax(attn.t() * cfg.lambda_softmax, dim=1)  # (queryL, sourceL)
    return attn @ context, attn


def pair_score(regions: Tensor, words: Tensor, cfg: XAttnConfig) -> Tensor:
    """Score of one image (k_i, d) with one caption (n_j, d), both unpadded."""
    query, context = (words, regions) if cfg.direction == "t2i" else (regions, words)
    attended, _ = func_attention(query, context, cfg)
    row = _cosine(query, attended, dim=1)  # (queryL,)
    if cfg.agg == "lse":
        return torch.log(torch.exp(row * cfg.lambda_lse).sum()) / cfg.lambda_lse
    if cfg.agg == "max":
        return row.max()
    if cfg.agg == "sum":
        return row.sum()
    return row.mean()


def reference_scores(images: Tensor, captions: Tensor, cap_lens: Tensor, cfg: XAttnConfig,
                     img_lens: Tensor | None = None) -> Tensor:
    """(N, M) scores by a double loop over pairs; padding removed by slicing."""
    N, M = images.shape[0], captions.shape[0]
    out = torch.empty(N, M, dtype=images.dtype)
    for i in range(N):
        regions = images[i, : (images.shape[1] if img_lens is None else int(img_lens[i]))]
        for j in range(M):
            out[i, j] = pair_score(regions, captions[j, : int(cap_lens[j])], cfg)
    return out


def reference_attention(regions: Tensor, words: Tensor, cfg: XAttnConfig) -> Tensor:
    """Attention weights of one unpadded pair, query × context."""
    query, context = (words, regions) if cfg.direction == "t2i" else (regions, words)
    return func_attention(query, context, cfg)[1]


# ---------------------------------------------------------------- evaluation.py, ported to Python 3
# Only what Python 3 needs changed: print statements, xrange. The embeddings' arguments, used by the
# reference only for their first dimension (npts), become ``npts``; ``cpi`` is the reference's 5.

def i2t(npts: int, sims: numpy.ndarray, return_ranks: bool = False, cpi: int = 5):
    """Images->Text (Image Annotation). sims: (N, 5N) matrix of similarity im-cap."""
    ranks = numpy.zeros(npts)
    top1 = numpy.zeros(npts)
    for index in range(npts):
        inds = numpy.argsort(sims[index])[::-1]
        # Score
        rank = 1e20
        for i in range(cpi * index, cpi * index + cpi, 1):
            tmp = numpy.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
        top1[index] = inds[0]

    # Compute metrics
    r1 = 100.0 * len(numpy.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(numpy.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(numpy.where(ranks < 10)[0]) / len(ranks)
    medr = numpy.floor(numpy.median(ranks)) + 1
    meanr = ranks.mean() + 1
    if return_ranks:
        return (r1, r5, r10, medr, meanr), (ranks, top1)
    return (r1, r5, r10, medr, meanr)


def t2i(npts: int, sims: numpy.ndarray, return_ranks: bool = False, cpi: int = 5):
    """Text->Images (Image Search). sims: (N, 5N) matrix of similarity im-cap."""
    ranks = numpy.zeros(cpi * npts)
    top1 = numpy.zeros(cpi * npts)

    # --> (5N(caption), N(image))
    sims = sims.T

    for index in range(npts):
        for i in range(cpi):
            inds = numpy.argsort(sims[cpi * index + i])[::-1]
            ranks[cpi * index + i] = numpy.where(inds == index)[0][0]
            top1[cpi * index + i] = inds[0]

    # Compute metrics
    r1 = 100.0 * len(numpy.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(numpy.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(numpy.where(ranks < 10)[0]) / len(ranks)
    medr = numpy.floor(numpy.median(ranks)) + 1
    meanr = ranks.mean() + 1
    if return_ranks:
        return (r1, r5, r10, medr, meanr), (ranks, top1)
    return (r1, r5, r10, medr, meanr)


def evalrank_fold5(sims: numpy.ndarray, cpi: int = 5) -> dict:
    """``evalrank(fold5=True)``'s loop over five 1000-image folds of a (5000, 25000) matrix (here
    any five equal folds), and what it prints: its "rsum" is ``mean_metrics[10] * 6``, six times
    the mean i2t AVERAGE recall (column 10 is ``ar``), not the sum of the six mean recalls."""
    n = sims.shape[0] // 5
    results = []
    for i in range(5):
        block = sims[i * n:(i + 1) * n, i * n * cpi:(i + 1) * n * cpi]
        r = i2t(n, block, cpi=cpi)
        ri = t2i(n, block, cpi=cpi)
        ar = (r[0] + r[1] + r[2]) / 3
        ari = (ri[0] + ri[1] + ri[2]) / 3
        rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
        results += [list(r) + list(ri) + [ar, ari, rsum]]
    mean_metrics = tuple(numpy.array(results).mean(axis=0).flatten())
    return {"printed_rsum": mean_metrics[10] * 6, "i2t": mean_metrics[:5], "t2i": mean_metrics[5:10],
            "mean_rsum": mean_metrics[12]}
