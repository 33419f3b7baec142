"""The reference's way of scoring: a Python loop over captions (kuanghuei/SCAN model.py).

For each caption it repeats the caption over all images, runs batched attention with bmm,
materialises the attended vectors (N, queryL, d) and takes their cosine with the queries.
Benchmarks time it against ``scan.xattn.xattn_scores`` on the same inputs. Images are
unpadded, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scan.xattn import XAttnConfig

_EPS = 1e-8


def _first_norm(attn: Tensor, kind: str) -> Tensor:
    """attn (batch, sourceL, queryL) normalised over queryL, as func_attention does."""
    if kind == "softmax":
        return torch.softmax(attn, dim=2)
    if kind.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    if kind.endswith("l2norm"):
        return attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + _EPS)
    if kind.endswith("l1norm"):
        return attn / (attn.abs().sum(dim=2, keepdim=True) + _EPS)
    return attn  # "clipped" or "no_norm"


def _func_attention(query: Tensor, context: Tensor, cfg: XAttnConfig) -> Tensor:
    """query (batch, queryL, d), context (batch, sourceL, d) -> attended (batch, queryL, d)."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (batch, sourceL, queryL)
    attn = _first_norm(attn, cfg.raw_feature_norm)
    attn = torch.softmax(attn.transpose(1, 2) * cfg.lambda_softmax, dim=2)  # (batch, queryL, sourceL)
    return torch.bmm(attn, context)


def reference_loop_scores(images: Tensor, captions: Tensor, cap_lens: Tensor,
                          cfg: XAttnConfig) -> Tensor:
    """(N, M) scores of images (N, k, d) against captions (M, n, d), one caption at a time."""
    n_image = images.shape[0]
    columns = []
    for j in range(captions.shape[0]):
        cap = captions[j, : int(cap_lens[j])].unsqueeze(0).repeat(n_image, 1, 1)  # (N, n_j, d)
        query, context = (cap, images) if cfg.direction == "t2i" else (images, cap)
        attended = _func_attention(query, context, cfg)
        row = F.cosine_similarity(query, attended, dim=2, eps=_EPS)  # (N, queryL)
        if cfg.agg == "lse":
            row = torch.log(torch.exp(row * cfg.lambda_lse).sum(dim=1)) / cfg.lambda_lse
        elif cfg.agg == "max":
            row = row.max(dim=1).values
        elif cfg.agg == "sum":
            row = row.sum(dim=1)
        else:
            row = row.mean(dim=1)
        columns.append(row)
    return torch.stack(columns, dim=1)
