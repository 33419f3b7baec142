"""One tile of SCAN scores (``scan.xattn``): the per-pair passes after the tile's one matrix
product, and the attention weights of given pairs.

For a tile of A context owners and B query owners with every dot product s (A, c, B, q):
e = exp(λ1 · norm_q(s) − shift), then q·a_q, |a_q|² and R_q per query, aggregated over the valid
queries (docs/DESIGN.md §2). Three ways to run the passes: autograd's (training), one in-place
buffer (inference), or compiled into fused kernels (``xattn.fused``). ``scan.xattn`` plans the
tiles and calls here.
"""
from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

_EPS = 1e-8  # the reference's eps in l1norm / l2norm / cosine_similarity
_TINY = 1e-30  # floor inside square roots: sqrt(0) has an infinite gradient (docs/DESIGN.md §2)
# First normalisations whose output lies in [-1, 1]: λ1·z ∈ [-λ1, λ1]. For λ1 ≤ _MAX_UNSHIFTED,
# e = exp(λ1·z) lies in [e^-20, e^20] and the products e·e·G in α^T G α in [e^-40, e^40]·|G|, far
# inside fp32's range (e^±87): the max subtraction is provably unnecessary there and its pass is
# skipped (the result is mathematically identical: softmax is shift-invariant). Otherwise the max
# over contexts is subtracted.
_BOUNDED_NORMS = frozenset({"clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "softmax"})
_MAX_UNSHIFTED = 20.0


class TileSettings(Protocol):
    """What a tile reads of its ``scan.xattn.XAttnConfig``."""
    raw_feature_norm: str
    lambda_softmax: float
    agg: str
    lambda_lse: float


def tile_scores(ctx: Tensor, gram: Tensor, ctx_mask: Tensor | None, qry: Tensor, q_norm: Tensor,
                qry_mask: Tensor | None, cfg: TileSettings, cdtype: torch.dtype) -> Tensor:
    """Scores (A, B) of one tile: ctx (A, c, d), gram (A, c, c), qry (B, q, d), q_norm (B, q)."""
    A, c, d = ctx.shape
    B, q, _ = qry.shape
    ctx_pad_rows = None if ctx_mask is None else torch.nonzero(~ctx_mask.reshape(-1)).squeeze(1)
    qry_bias = None if qry_mask is None else _mask_bias(qry_mask, cdtype).view(1, 1, B, q)
    ctx_flat, qry_flat = ctx.reshape(A * c, d), qry.reshape(B * q, d)
    if torch.is_grad_enabled() and (ctx.requires_grad or qry.requires_grad):
        # (A*c, d) @ (d, B*q): every dot product of the tile in one product, in the input dtype.
        s = torch.mm(ctx_flat, qry_flat.t()).to(cdtype).view(A, c, B, q)
        e = _attention_exp(s, cfg, ctx_pad_rows, qry_bias)
        ge = torch.bmm(gram, e.view(A, c, B * q)).view(A, c, B, q)
        qa, aa, z = (s * e).sum(1), (ge * e).sum(1), e.sum(1)
    else:
        # Inference: one buffer w = [s, G·e, e] (3, A, c, B*q), filled in place, so the per-pair
        # passes after the product are: first norm (2-3), exp, G·e, one multiply, one sum.
        w = torch.empty(3, A, c, B * q, dtype=cdtype, device=ctx.device)
        if ctx.dtype == cdtype:
            torch.mm(ctx_flat, qry_flat.t(), out=w[0].view(A * c, B * q))
        else:
            w[0].view(A * c, B * q).copy_(torch.mm(ctx_flat, qry_flat.t()))
        e = _attention_exp(w[0].view(A, c, B, q), cfg, ctx_pad_rows, qry_bias,
                           out=w[2].view(A, c, B, q))
        torch.bmm(gram, w[2], out=w[1])
        w[:2].mul_(w[2])  # [s·e, (G·e)·e, e]
        qa, aa, z = w.sum(2).view(3, A, B, q)  # Σ_c of each: (A, B, q)
    # α = e / Z, so q·a_q = qa / Z and |a_q|² = aa / Z²; R_q = q·a_q / max(|q| |a_q|, eps).
    a_norm = (aa / (z * z)).clamp_min(_TINY).sqrt()
    r = (qa / z) / (q_norm[None] * a_norm).clamp_min(_EPS)
    return _aggregate(r, qry_mask, cfg)


def fused_tile_scores(ctx: Tensor, gram: Tensor, ctx_mask: Tensor | None, qry: Tensor,
                      q_norm: Tensor, qry_mask: Tensor | None, cfg: TileSettings,
                      cdtype: torch.dtype) -> Tensor:
    """``tile_scores`` with the per-pair passes compiled into fused kernels (``cfg.fused``).

    The compiled graph depends only on the first normalisation, whether the max is subtracted,
    the dtypes and the device: λ1 travels as a 0-d tensor, the masks are always given (all
    valid where nothing is padded) and every size is symbolic (``dynamic=True``), so new batch
    shapes, caption lengths and λ1 values reuse it. The aggregation over the q queries of each
    pair ((A, B, q) numbers, not (A, c, B, q)) stays eager."""
    A, c, _ = ctx.shape
    B, q, _ = qry.shape
    ctx_valid = torch.ones(A, c, dtype=torch.bool, device=ctx.device) if ctx_mask is None else ctx_mask
    qry_valid = torch.ones(B, q, dtype=torch.bool, device=qry.device) if qry_mask is None else qry_mask
    lam = torch.tensor(cfg.lambda_softmax, dtype=cdtype, device=ctx.device)
    shift = not (cfg.raw_feature_norm in _BOUNDED_NORMS and cfg.lambda_softmax <= _MAX_UNSHIFTED)
    args = (ctx, gram, ctx_valid, qry, q_norm, qry_valid, lam, cfg.raw_feature_norm, shift, cdtype)
    r = _compiled_tile()(*args) if _COMPILE_STATE["ok"] else None
    if r is None:
        r = _tile_per_query(*args)
    return _aggregate(r, qry_mask, cfg)


def _tile_per_query(ctx: Tensor, gram: Tensor, ctx_valid: Tensor, qry: Tensor, q_norm: Tensor,
                    qry_valid: Tensor, lam: Tensor, norm: str, shift: bool,
                    cdtype: torch.dtype) -> Tensor:
    """Per-query similarities R (A, B, q) of one tile, written for torch.compile: no in-place
    buffers, no data-dependent shapes (padded contexts are masked, not indexed)."""
    A, c, d = ctx.shape
    B, q, _ = qry.shape
    s = torch.mm(ctx.reshape(A * c, d), qry.reshape(B * q, d).t()).to(cdtype).view(A, c, B, q)
    qry_bias = torch.zeros(B, q, dtype=cdtype, device=s.device).masked_fill(~qry_valid, -math.inf)
    x = _scaled_first_norm(s, norm, lam, qry_bias.view(1, 1, B, q), None)
    x = x.masked_fill(~ctx_valid.view(A, c, 1, 1), -math.inf)
    if shift:
        x = x - x.amax(dim=1, keepdim=True)
    e = x.exp()
    ge = torch.bmm(gram, e.view(A, c, B * q)).view(A, c, B, q)
    qa, aa, z = (s * e).sum(1), (ge * e).sum(1), e.sum(1)
    a_norm = (aa / (z * z)).clamp_min(_TINY).sqrt()
    return (qa / z) / (q_norm[None] * a_norm).clamp_min(_EPS)


# One compiled _tile_per_query per process; "ok" turns False (eager from then on) when compiling
# fails, e.g. without a C++ compiler for inductor's CPU kernels.
_COMPILE_STATE: dict = {"fn": None, "ok": True}


def _compiled_tile():
    if _COMPILE_STATE["fn"] is None:
        _COMPILE_STATE["fn"] = torch.compile(_tile_per_query, dynamic=True)
    compiled = _COMPILE_STATE["fn"]

    def call(*args):
        try:
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, say so once
            _COMPILE_STATE["ok"] = False
            logger.warning("xattn.fused: torch.compile failed (%s: %s); the eager passes run instead",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
    return call


def _mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where valid, -inf where padded (same shape as mask)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _attention_exp(s: Tensor, cfg: TileSettings, ctx_pad_rows: Tensor | None,
                   qry_bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Unnormalised attention e (A, c, B, q) from dot products s (A, c, B, q).

    e = exp(λ1 · norm_q(s) − shift), 0 for padded contexts (flat rows of (A*c) in ctx_pad_rows);
    α = e / Σ_c e is the reference's softmax over contexts. qry_bias (.., B, q) is -inf at padded
    queries (their s is already 0, which leaves L1/L2 norms unchanged; only softmax needs it).
    With ``out`` (inference only) every step writes into that buffer instead of allocating.
    """
    inplace = out is not None
    x = _scaled_first_norm(s, cfg.raw_feature_norm, cfg.lambda_softmax, qry_bias, out)
    if ctx_pad_rows is not None:
        A, c, B, q = x.shape
        x = x.view(A * c, B * q)
        x = (x.index_fill_(0, ctx_pad_rows, -math.inf) if inplace
             else x.index_fill(0, ctx_pad_rows, -math.inf)).view(A, c, B, q)
    if not (cfg.raw_feature_norm in _BOUNDED_NORMS and cfg.lambda_softmax <= _MAX_UNSHIFTED):
        shift = x.amax(dim=1, keepdim=True)
        x = x.sub_(shift) if inplace else x - shift
    return x.exp_() if inplace else x.exp()


def _scaled_first_norm(s: Tensor, kind: str, lam: float | Tensor, qry_bias: Tensor | None,
                       out: Tensor | None) -> Tensor:
    """λ1 · (first normalisation ``kind`` of s over the query axis, the last one); into ``out``
    if given. ``lam`` may be a 0-d tensor (the fused path: one compiled graph for every λ1)."""
    if kind == "softmax":
        return torch.mul(torch.softmax(s if qry_bias is None else s + qry_bias, dim=-1), lam, out=out)
    if kind == "no_norm":
        return torch.mul(s, lam, out=out)
    base = s
    if kind.startswith("clipped"):
        base = F.leaky_relu(s, 0.1) if out is None else torch.ops.aten.leaky_relu.out(s, 0.1, out=out)
    if kind.endswith("l2norm"):
        factor = lam / (torch.linalg.vector_norm(base, dim=-1, keepdim=True) + _EPS)
    elif kind.endswith("l1norm"):
        factor = lam / (torch.linalg.vector_norm(base, ord=1, dim=-1, keepdim=True) + _EPS)
    else:  # clipped
        factor = lam
    if out is not None and base is out:
        return out.mul_(factor)
    return torch.mul(base, factor, out=out)


def _aggregate(r: Tensor, qry_mask: Tensor | None, cfg: TileSettings) -> Tensor:
    """(A, B, q) per-query similarities -> (A, B), over valid queries only."""
    if cfg.agg in ("mean", "sum"):
        if qry_mask is None:
            return r.mean(-1) if cfg.agg == "mean" else r.sum(-1)
        total = (r * qry_mask.to(r.dtype)).sum(-1)
        return total / qry_mask.sum(-1).to(r.dtype) if cfg.agg == "mean" else total
    if qry_mask is not None:
        r = r.masked_fill(~qry_mask, -math.inf)
    if cfg.agg == "max":
        return r.amax(-1)
    return torch.logsumexp(r * cfg.lambda_lse, dim=-1) / cfg.lambda_lse


def pair_attention(ctx: Tensor, ctx_mask: Tensor | None, qry: Tensor, qry_mask: Tensor | None,
                   cfg: TileSettings, cdtype: torch.dtype) -> Tensor:
    """Attention weights (P, q, c) of P pairs: ctx (P, c, d) against qry (P, q, d)."""
    P, c, _ = ctx.shape
    q = qry.shape[1]
    s = torch.bmm(ctx, qry.transpose(1, 2)).to(cdtype).view(P, c, 1, q)
    ctx_pad_rows = None if ctx_mask is None else torch.nonzero(~ctx_mask.reshape(-1)).squeeze(1)
    qry_bias = None if qry_mask is None else _mask_bias(qry_mask, cdtype).view(P, 1, 1, q)
    e = _attention_exp(s, cfg, ctx_pad_rows, qry_bias)
    alpha = (e / e.sum(1, keepdim=True)).view(P, c, q).transpose(1, 2)  # (P, q, c)
    if qry_mask is not None:
        alpha = alpha * qry_mask[:, :, None].to(alpha.dtype)
    return alpha
