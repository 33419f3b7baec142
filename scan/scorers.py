"""How each model of the family compares an image with a caption: one interface for all.

A scorer maps a tile of embeddings to its scores,

    scorer(images (N, k, d), captions (M, n, d), cap_lens (M,), img_lens (N,) | None) -> (N, M),

so the training loss (over the gathered global batch), the sharded evaluator, ``retrieve`` and
``explain`` call every model alike. Padded positions need not be zero on input (each scorer masks
them). Scores are float32 (float64 for float64 inputs).

* :class:`CrossAttentionScorer` (``model.kind: scan``): SCAN's stacked cross attention,
  ``scan.xattn.xattn_scores``.
* :class:`GlobalScorer` (``vse``): the encoders already pooled each side into ONE vector, so the
  inputs are (N, 1, d) and (M, 1, d) and a tile is one matrix product, the cosine of VSE++
  (the vectors are l2-normalised by the model).
* :class:`DVSAScorer` (``dvsa``): Karpathy & Fei-Fei (2015), eq. 8 as published:
  S(i, j) = Σ_t max_r v_r · s_t over the words t of caption j and the regions r of image i: every
  word is aligned to its best region, no softmax. (Eq. 7's rectifier max(0, ·) inside the max, as
  this scorer once had, lets a model die: once every v·s ≤ 0 all scores are 0 and no gradient
  flows; docs/RESULTS.md, "DVSA".)
* :class:`scan.saliency_scorer.SaliencyScorer` (``scan_sal``): SCAN t2i with saliency-weighted
  visual attention (SVA) and saliency-guided textual attention (STA) through a gated fusion unit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from scan.pooling import length_mask, masked_mean
from scan.saliency_scorer import SaliencyScorer
from scan.xattn import XAttnConfig, xattn_scores

ModelKind = Literal["scan", "vse", "dvsa", "scan_sal"]


class Scorer(Protocol):
    kind: str
    # How per-word attention rows merge into a word (``tools.explain``): "t2i" rows are one
    # distribution over the regions per word piece, "i2t" rows are the pieces' weights per region.
    attention_direction: str
    label: str  # for pictures and logs

    def __call__(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None = None,
                 *, memory_budget_mb: float = 1024, checkpoint: bool = False) -> Tensor: ...

    def attention(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                  pairs: Tensor) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def _masked(x: Tensor, lens: Tensor | None) -> Tensor:
    """(B, L, d) with the positions at or beyond ``lens`` set to zero."""
    if lens is None:
        return x
    return x * length_mask(lens.to(x.device), x.shape[1])[..., None].to(x.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _l2_mean(x: Tensor, lens: Tensor | None) -> Tensor:
    """(B, L, d) → (B, d): the l2-normalised mean over the valid positions (MeanPool's mean)."""
    mean = masked_mean(x, lens)
    return mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def global_cosine(images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None) -> Tensor:
    """(N, M) cosine of each image's mean region with each caption's mean word (VSE++'s mean
    pooling of the embeddings a cross-attention scorer sees)."""
    cdtype = _compute_dtype(images)
    return _l2_mean(images.to(cdtype), img_lens) @ _l2_mean(captions.to(cdtype), cap_lens).t()


@dataclass(frozen=True)
class CrossAttentionScorer:
    """SCAN: t2i or i2t stacked cross attention with AVG / LSE pooling (``XAttnConfig``)."""

    xattn: XAttnConfig
    kind: str = "scan"

    @property
    def attention_direction(self) -> str:
        return self.xattn.direction

    @property
    def label(self) -> str:
        extra = f" + {self.xattn.global_weight:g} global" if self.xattn.global_weight else ""
        return f"{self.xattn.direction}, {self.xattn.agg}{extra}"

    def __call__(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None = None,
                 *, memory_budget_mb: float = 1024, checkpoint: bool = False) -> Tensor:
        scores = xattn_scores(images, captions, cap_lens, self.xattn, img_lens,
                              memory_budget_mb=memory_budget_mb, checkpoint=checkpoint)
        if self.xattn.global_weight:
            scores = scores + self.xattn.global_weight * global_cosine(images, captions, cap_lens, img_lens)
        return scores

    def attention(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                  pairs: Tensor) -> Tensor:
        """(P, n, k) words × regions of the pairs (image index, caption index) (P, 2); for i2t the
        regions' attention over the words, transposed into the same layout."""
        _, attn = xattn_scores(images, captions, cap_lens, self.xattn, img_lens, attention_pairs=pairs)
        return attn if self.xattn.direction == "t2i" else attn.transpose(1, 2)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "xattn": asdict(self.xattn)}


@dataclass(frozen=True)
class GlobalScorer:
    """VSE++: the cosine of one pooled vector per image and per caption, a tile in one product."""

    kind: str = "vse"
    attention_direction: str = "t2i"
    label: str = "VSE++, cosine"

    def __call__(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None = None,
                 *, memory_budget_mb: float = 1024, checkpoint: bool = False) -> Tensor:
        if images.dim() != 3 or captions.dim() != 3 or images.shape[1] != 1 or captions.shape[1] != 1:
            raise ValueError(f"global scorer: expected pooled (N, 1, d) and (M, 1, d) embeddings, got "
                             f"{tuple(images.shape)} and {tuple(captions.shape)} (model.kind 'vse' pools)")
        cdtype = _compute_dtype(images)
        return images[:, 0].to(cdtype) @ captions[:, 0].to(cdtype).t()

    def attention(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                  pairs: Tensor) -> Tensor:
        raise ValueError("model.kind 'vse' compares one pooled vector per side: it has no per-word "
                         "attention over regions to show (explain needs 'scan' or 'dvsa')")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class DVSAScorer:
    """DVSA: each word's best region dot product, summed over the caption's words (eq. 8)."""

    kind: str = "dvsa"
    attention_direction: str = "t2i"
    label: str = "DVSA, sum of best region per word"

    def __call__(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None = None,
                 *, memory_budget_mb: float = 1024, checkpoint: bool = False) -> Tensor:
        cdtype = _compute_dtype(images)
        # Padded words become zero vectors, so they add 0; padded regions must never be a word's best
        # (their product 0 may beat every real one), so their products are pushed to -inf below.
        imgs = images.to(cdtype)
        caps = _masked(captions, cap_lens).to(cdtype)
        pad = None if img_lens is None else ~length_mask(img_lens.to(imgs.device), imgs.shape[1])
        N, k, d = imgs.shape
        M, n, _ = caps.shape
        per_caption = N * k * n * torch.finfo(cdtype).bits // 8 * (3 if checkpoint or torch.is_grad_enabled() else 1)
        block = max(1, min(M, int(memory_budget_mb * 2**20 // max(per_caption, 1))))
        parts = []
        for c in range(0, M, block):
            part = caps[c:c + block]
            if checkpoint and torch.is_grad_enabled():
                parts.append(torch_checkpoint(_dvsa_tile, imgs, part, pad, use_reentrant=False))
            else:
                parts.append(_dvsa_tile(imgs, part, pad))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def attention(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                  pairs: Tensor) -> Tensor:
        """(P, n, k): 1 at each word's aligned region (its best), else 0; padded words and regions 0."""
        imgs, caps = _masked(images, img_lens).float(), _masked(captions, cap_lens).float()
        dots = torch.einsum("pkd,pnd->pnk", imgs[pairs[:, 0]], caps[pairs[:, 1]])  # (P, n, k)
        if img_lens is not None:
            valid = length_mask(img_lens[pairs[:, 0]].to(dots.device), dots.shape[2])
            dots = dots.masked_fill(~valid[:, None, :], float("-inf"))
        best = dots.argmax(-1, keepdim=True)
        hit = torch.zeros_like(dots).scatter_(-1, best, 1.0)
        if cap_lens is not None:
            hit = hit * length_mask(cap_lens[pairs[:, 1]].to(hit.device), hit.shape[1])[..., None].to(hit.dtype)
        return hit

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


def _dvsa_tile(imgs: Tensor, caps: Tensor, pad: Tensor | None) -> Tensor:
    """(N, k, d) × (B, n, d) → (N, B): one matrix product, max over the real regions (``pad``
    (N, k) marks the padded ones), sum over words (padded words are zero vectors: they add 0)."""
    N, k, d = imgs.shape
    B, n, _ = caps.shape
    dots = (imgs.reshape(N * k, d) @ caps.reshape(B * n, d).t()).view(N, k, B, n)
    if pad is not None:
        dots = dots.masked_fill(pad[:, :, None, None], float("-inf"))
    return dots.amax(dim=1).sum(dim=-1)


def build_scorer(kind: str, xattn: XAttnConfig) -> Scorer:
    """The scorer of ``model.kind``."""
    if kind == "scan":
        return CrossAttentionScorer(xattn)
    if kind == "vse":
        return GlobalScorer()
    if kind == "dvsa":
        return DVSAScorer()
    if kind == "scan_sal":
        return SaliencyScorer(xattn)
    raise ValueError(f"config key 'model.kind': {kind!r} is not allowed; expected one of "
                     "'scan', 'vse', 'dvsa', 'scan_sal'")


def as_scorer(scorer: "Scorer | XAttnConfig") -> Scorer:
    """A scorer; an ``XAttnConfig`` alone means SCAN's cross attention with it."""
    return CrossAttentionScorer(scorer) if isinstance(scorer, XAttnConfig) else scorer
