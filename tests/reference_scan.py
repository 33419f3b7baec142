"""A slow, straightforward SCAN scorer: one pair at a time, written like the reference.

It follows kuanghuei/SCAN model.py (func_attention, xattn_score_t2i / xattn_score_i2t, l1norm /
l2norm with eps added to the norm, cosine_similarity clamped at eps) on the unpadded words and
regions of each pair, materialising the attended vectors. Other tests use it as ground truth.
"""
from __future__ import annotations

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
