"""Stacked cross attention scores (SCAN), exact to the reference semantics, without per-pair loops.

See docs/DESIGN.md §2 for the semantics and the fast formulation.

Both directions share one computation. The "context owners" (images for t2i, captions for i2t)
give the context axis c, the "query owners" (captions for t2i, images for i2t) the query axis q.
For a tile of A context owners and B query owners, one matrix product gives every dot product
laid out as (A, c, B, q); then, per pair, with x the context vectors:

- first normalisation over q (``raw_feature_norm``), times λ1: z (A, c, B, q)
- e = exp(z − shift), padded contexts 0; Z = Σ_c e: the softmax over c is α = e / Z
- q · a_q = Σ_c α s,  |a_q|² = α^T G α with G = x x^T per context owner (A, c, c)
- R_q = q·a_q / max(|q| |a_q|, 1e-8), aggregated over the valid q.

The attended vectors a_q (A·B·q·d numbers) are never formed.

This module plans the tiles (their sizes, the length-sorted inference tiles, checkpointing);
one tile's passes are ``scan.xattn_tile``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from dataio.masks import length_mask
from scan.xattn_tile import _TINY, fused_tile_scores, pair_attention, tile_scores

Direction = Literal["t2i", "i2t"]
Aggregation = Literal["mean", "lse", "max", "sum"]
RawFeatureNorm = Literal[
    "clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "no_norm", "softmax"
]

# Buffers of c·q numbers kept per pair: s, e, G·e (+ autograd's saved tensors when training).
_BUFFERS_INFERENCE = 3
_BUFFERS_TRAINING = 8
# Tile size for speed on CPU: the elementwise passes after the matrix product run over the tile
# several times, so a tile near the caches beats one huge tile, while tiles much smaller make the
# matrix product inefficient (measured with benchmarks/xattn.py). GPUs take the whole budget.
_FAST_TILE_BYTES = 16 * 2**20
# Query owners per group of the length-sorted inference tiles on a CPU: groups of near lengths.
# Measured at the demo's val (1,000 × 5,000, 49 regions, 256-d, t2i, 1 thread): 32 per group 47 s,
# 16: 49 s, 64: 48 s, 128: 63 s; the whole block padded to its longest caption: 136 s.
_QUERY_GROUP = 32


@dataclass
class XAttnConfig:
    """How one image and one caption are compared (the paper's t2i/i2t, AVG/LSE, λ1, λ2)."""

    direction: Direction = "t2i"
    agg: Aggregation = "mean"
    lambda_softmax: float = 9.0  # λ1: inverse temperature of the attention softmax
    lambda_lse: float = 6.0  # λ2: only used when agg == "lse"
    raw_feature_norm: RawFeatureNorm = "clipped_l2norm"
    # Implementation, not semantics: compile each tile's passes after the matrix product into
    # fused kernels (torch.compile / inductor: C++/OpenMP on CPU, Triton on CUDA). Same scores;
    # falls back to the eager passes, with a warning, where compilation fails (docs/DESIGN.md §2.5).
    fused: bool = False
    # Weight w of a global alignment term added to the cross-attention score (0: SCAN alone):
    # S(i, j) = S_xattn(i, j) + w · cos(mean of image i's regions, mean of caption j's words), both
    # means over the same (projected, normalised) embeddings the attention sees, so no parameter is
    # added. Grid cells of a classifier (unlike object regions) carry a strong whole-image signal
    # that per-word attention averages away; this keeps it (docs/DESIGN.md §2.9).
    global_weight: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the allowed values."""
        for name, choices in (("direction", Direction), ("agg", Aggregation),
                              ("raw_feature_norm", RawFeatureNorm)):
            value = getattr(self, name)
            if value not in get_args(choices):
                raise ValueError(f"XAttnConfig.{name}={value!r} is not allowed; "
                                 f"choose one of {list(get_args(choices))}")
        for name in ("lambda_softmax", "lambda_lse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"XAttnConfig.{name}={value!r} is not allowed; "
                                 "it must be a finite number > 0")
        gw = self.global_weight
        if isinstance(gw, bool) or not isinstance(gw, (int, float)) or not math.isfinite(gw) or gw < 0:
            raise ValueError(f"XAttnConfig.global_weight={gw!r} is not allowed; it must be a finite number >= 0")
        if not isinstance(self.fused, bool):
            raise ValueError(f"XAttnConfig.fused={self.fused!r} is not allowed; it must be true or false")


def xattn_scores(
    images: Tensor,
    captions: Tensor,
    cap_lens: Tensor,
    cfg: XAttnConfig,
    img_lens: Tensor | None = None,
    *,
    memory_budget_mb: float = 1024,
    checkpoint: bool = False,
    attention_pairs: Tensor | None = None,
    validate: bool = False,
    length_sorted: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """SCAN similarity of every image with every caption.

    images (N, k, d) regions, padded to k with ``img_lens`` (N,) or all valid when None;
    captions (M, n, d) words, padded to n with ``cap_lens`` (M,). Inputs need not be normalised.
    Returns scores (N, M) in float32 (float64 for float64 inputs).

    ``memory_budget_mb`` bounds the per-pair intermediates of one tile (image block × caption
    block). ``checkpoint=True`` recomputes each tile in backward (use ``.backward()``), so training keeps one tile's
    intermediates instead of all of them. With ``attention_pairs`` (P, 2) long of (image index,
    caption index) it returns ``(scores, attn)``: attn (P, queries, contexts) are the attention
    weights of those pairs, query × context (t2i: (P, n, k) words × regions; i2t: (P, k, n)),
    zero at padded queries and padded contexts. ``validate=True`` checks shapes, dtypes, lengths
    and finiteness first (ValueError); it costs a pass over the inputs. ``length_sorted`` (inference
    only): tiles of padded owners sorted by length, each cut to its longest owner (the same scores,
    2-4x faster on a val split's captions); False pads every tile to the longest of all.
    """
    cfg.validate()
    if validate:
        _validate_inputs(images, captions, cap_lens, img_lens, attention_pairs)
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    img_mask = _valid_mask(img_lens, images.shape[0], images.shape[1], images.device)
    cap_mask = _valid_mask(cap_lens, captions.shape[0], captions.shape[1], captions.device)
    images, captions = _zero_padding(images, img_mask), _zero_padding(captions, cap_mask)
    if cfg.direction == "t2i":
        ctx, ctx_mask, qry, qry_mask = images, img_mask, captions, cap_mask
    else:
        ctx, ctx_mask, qry, qry_mask = captions, cap_mask, images, img_mask

    scores = _tiled_scores(ctx, ctx_mask, qry, qry_mask, cfg, cdtype, memory_budget_mb, checkpoint,
                           length_sorted)
    if cfg.direction == "i2t":
        scores = scores.t()  # (M, N) -> (N, M)
    if attention_pairs is None:
        return scores
    pairs = attention_pairs.to(images.device)
    ctx_idx, qry_idx = (pairs[:, 0], pairs[:, 1]) if cfg.direction == "t2i" else (pairs[:, 1], pairs[:, 0])
    attn = pair_attention(ctx[ctx_idx], _index(ctx_mask, ctx_idx), qry[qry_idx],
                           _index(qry_mask, qry_idx), cfg, cdtype)
    return scores, attn


def _valid_mask(lens: Tensor | None, count: int, width: int, device: torch.device) -> Tensor | None:
    """(count, width) bool of valid positions, or None when nothing is padded."""
    if lens is None:
        return None
    lens = lens.to(device=device)
    if bool((lens >= width).all()):
        return None
    return length_mask(lens, width)


def _zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero padded vectors so that their dot products are exactly 0 and add nothing to norms."""
    return x if mask is None else x * mask[..., None].to(x.dtype)


def _index(mask: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if mask is None else mask[idx]


def _tiled_scores(ctx: Tensor, ctx_mask: Tensor | None, qry: Tensor, qry_mask: Tensor | None,
                  cfg: XAttnConfig, cdtype: torch.dtype, memory_budget_mb: float,
                  checkpoint: bool, length_sorted: bool = True) -> Tensor:
    """Scores (A, B) of context owners ctx (A, c, d) against query owners qry (B, q, d)."""
    A, c, _ = ctx.shape
    B, q, _ = qry.shape
    # Squared norms of the queries (B, q) and Gram matrices of the contexts (A, c, c), once.
    q32 = qry.to(cdtype)
    q_norm = (q32 * q32).sum(-1).clamp_min(_TINY).sqrt()
    gram = torch.bmm(ctx, ctx.transpose(1, 2)).to(cdtype)
    grad = torch.is_grad_enabled() and (ctx.requires_grad or qry.requires_grad)
    # A checkpointed tile holds the training intermediates while it is recomputed in backward.
    tile_fn = fused_tile_scores if cfg.fused else tile_scores
    if length_sorted and not grad and (ctx_mask is not None or qry_mask is not None):
        return _length_sorted_scores(ctx, gram, ctx_mask, qry, q_norm, qry_mask, cfg, cdtype,
                                     memory_budget_mb, tile_fn)
    tile_a, tile_b = _tile_shape(A, B, c * q * torch.finfo(cdtype).bits // 8, memory_budget_mb,
                                 grad, ctx.device.type == "cpu")
    rows = []
    for a0 in range(0, A, tile_a):
        a1 = min(A, a0 + tile_a)
        cols = []
        for b0 in range(0, B, tile_b):
            b1 = min(B, b0 + tile_b)
            args = (ctx[a0:a1], gram[a0:a1], None if ctx_mask is None else ctx_mask[a0:a1],
                    qry[b0:b1], q_norm[b0:b1], None if qry_mask is None else qry_mask[b0:b1])
            if checkpoint and grad:
                # Reentrant: keeps only the tile's inputs (measured: 0.67 vs 1.33 GB at a batch of 256,
                # and 3x faster than use_reentrant=False); it needs .backward(), not autograd.grad.
                cols.append(torch_checkpoint(tile_fn, *args, cfg, cdtype, use_reentrant=True))
            else:
                cols.append(tile_fn(*args, cfg, cdtype))
        rows.append(torch.cat(cols, 1) if len(cols) > 1 else cols[0])
    return torch.cat(rows, 0) if len(rows) > 1 else rows[0]


def _length_sorted_scores(ctx: Tensor, gram: Tensor, ctx_mask: Tensor | None, qry: Tensor,
                          q_norm: Tensor, qry_mask: Tensor | None, cfg: XAttnConfig,
                          cdtype: torch.dtype, memory_budget_mb: float, tile_fn) -> Tensor:
    """Inference scores (A, B) of padded owners, each tile cut to its own longest owner.

    Owners are sorted by length, so that a tile of neighbours needs little more than its own
    lengths instead of the longest of all (a val split's captions: 14.4 word pieces on average,
    36 at most, so a tile padded to the longest does 2.5 times the work). Padded positions add
    nothing to a score, so the scores are those of the padded tiles; the order is undone on
    writing them. On a CPU, query owners come in groups of at most ``_QUERY_GROUP`` (near lengths);
    each group's tile rows are as many context owners as its own widths fit in the budget."""
    A, c, _ = ctx.shape
    B, q, _ = qry.shape
    ctx_order, ctx_width = _length_order(ctx_mask, A, c, ctx.device)
    qry_order, qry_width = _length_order(qry_mask, B, q, qry.device)
    ctx, gram, ctx_mask = ctx[ctx_order], gram[ctx_order], _index(ctx_mask, ctx_order)
    qry, q_norm, qry_mask = qry[qry_order], q_norm[qry_order], _index(qry_mask, qry_order)
    on_cpu = ctx.device.type == "cpu"
    elem = torch.finfo(cdtype).bits // 8
    scores = torch.empty(A, B, dtype=cdtype, device=ctx.device)
    _, group = _tile_shape(A, B, c * q * elem, memory_budget_mb, False, on_cpu)
    if on_cpu:
        group = min(group, _QUERY_GROUP)
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        qw = qry_width[b1 - 1]
        # rows of this group's tiles: sized by the longest context and this group's queries
        tile_a, _ = _tile_shape(A, b1 - b0, c * qw * elem, memory_budget_mb, False, on_cpu)
        cols = qry_order[b0:b1]
        for a0 in range(0, A, tile_a):
            a1 = min(A, a0 + tile_a)
            cw = ctx_width[a1 - 1]
            tile = tile_fn(ctx[a0:a1, :cw], gram[a0:a1, :cw, :cw], _tile_mask(ctx_mask, a0, a1, cw),
                           qry[b0:b1, :qw], q_norm[b0:b1, :qw], _tile_mask(qry_mask, b0, b1, qw),
                           cfg, cdtype)
            scores[ctx_order[a0:a1, None], cols[None, :]] = tile
    return scores


def _length_order(mask: Tensor | None, count: int, width: int,
                  device: torch.device) -> tuple[Tensor, list[int]]:
    """Owners of a (count, width) validity mask (valid positions first) sorted by length, the
    shortest first: (order (count,), the sorted lengths as ints). No mask: all are ``width`` long."""
    if mask is None:
        return torch.arange(count, device=device), [width] * count
    sorted_lens, order = torch.sort(mask.sum(1), stable=True)
    return order, sorted_lens.tolist()


def _tile_mask(mask: Tensor | None, i0: int, i1: int, width: int) -> Tensor | None:
    """Rows [i0, i1) of a validity mask cut to ``width``; None when nothing in it is padded."""
    if mask is None:
        return None
    tile = mask[i0:i1, :width]
    return None if bool(tile.all()) else tile


def _tile_shape(A: int, B: int, pair_bytes: int, memory_budget_mb: float, training: bool,
                on_cpu: bool) -> tuple[int, int]:
    """Context owners × query owners per tile so that one tile's intermediates fit the budget.

    Inference on a CPU also keeps tiles cache-sized (its one in-place buffer is fastest there);
    training tiles go up to the budget, since autograd's per-tile overhead dominates small tiles."""
    buffers = _BUFFERS_TRAINING if training else _BUFFERS_INFERENCE
    budget = memory_budget_mb * 2**20
    if on_cpu and not training:
        budget = min(budget, _FAST_TILE_BYTES)
    pairs = max(1, int(budget // (pair_bytes * buffers)))
    tile_b = min(B, pairs)
    tile_a = max(1, min(A, pairs // tile_b))
    return tile_a, tile_b


def _validate_inputs(images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                     attention_pairs: Tensor | None) -> None:
    """Clear ValueErrors for inputs that would silently give wrong scores."""
    for name, x in (("images", images), ("captions", captions)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"xattn_scores: {name} must be a 3-d tensor (count, length, d), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"xattn_scores: {name} must be floating point, got dtype {x.dtype}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"xattn_scores: {name} has an empty dimension: shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"xattn_scores: {name} contains NaN or inf")
    if images.dtype != captions.dtype:
        raise ValueError(f"xattn_scores: images dtype {images.dtype} != captions dtype {captions.dtype}")
    if images.shape[2] != captions.shape[2]:
        raise ValueError(f"xattn_scores: feature size d differs: images d={images.shape[2]}, "
                         f"captions d={captions.shape[2]}")
    for name, lens, owner, width_name in (("cap_lens", cap_lens, captions, "n"),
                                           ("img_lens", img_lens, images, "k")):
        if lens is None:
            continue
        if not isinstance(lens, Tensor) or lens.dim() != 1 or lens.is_floating_point() or lens.is_complex():
            raise ValueError(f"xattn_scores: {name} must be a 1-d integer tensor, got "
                             f"{getattr(lens, 'dtype', type(lens).__name__)} "
                             f"shape {tuple(getattr(lens, 'shape', ()))}")
        if lens.shape[0] != owner.shape[0]:
            raise ValueError(f"xattn_scores: {name} has {lens.shape[0]} entries for "
                             f"{owner.shape[0]} rows")
        width = owner.shape[1]
        bad = (lens < 1) | (lens > width)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"xattn_scores: {name}[{i}]={int(lens[i])} is outside 1..{width_name}"
                             f"={width} (zero-length or longer than the padded length)")
    if attention_pairs is not None:
        p = attention_pairs
        if p.dim() != 2 or p.shape[1] != 2 or p.is_floating_point():
            raise ValueError(f"xattn_scores: attention_pairs must be (P, 2) integer, got "
                             f"{p.dtype} shape {tuple(p.shape)}")
        if p.numel() and (bool((p < 0).any()) or int(p[:, 0].max()) >= images.shape[0]
                          or int(p[:, 1].max()) >= captions.shape[0]):
            raise ValueError("xattn_scores: attention_pairs index out of range for "
                             f"{images.shape[0]} images × {captions.shape[0]} captions")
