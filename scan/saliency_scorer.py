"""Saliency-guided SCAN (``model.kind: scan_sal``): SVA and STA over t2i stacked cross attention.

One image i (regions v_r with saliency s_r ∈ [0, 1], r < k_i) and one caption j (words e_t, t < n_j),
all vectors l2-normalised, d the embedding size, ε = ``SAL_EPS``:

* **SVA** (saliency-weighted visual attention): SCAN's t2i attention with the saliency as a prior,
  ``α_rt = (s_r + ε) exp(λ1 z_rt) / Σ_r' (s_r' + ε) exp(λ1 z_r't)``, i.e. log(s_r + ε) added to the
  logits, where ``z_rt`` is the first normalisation (``xattn.raw_feature_norm``) over the words of
  ``v_r · e_t``. Attended vector ``a_t = Σ_r α_rt v_r``, relevance ``R_t = cos(e_t, a_t)``.
* **STA** (saliency-guided textual attention): the guidance of the pair comes from a gated fusion
  unit over the saliency-weighted mean region ``v̄_i = Σ_r (s_r + ε) v_r / Σ_r (s_r + ε)`` and the
  mean word ``t̄_j``:
  ``z = σ(W_z [v̄_i; t̄_j] + b_z)``, ``g_ij = z ⊙ tanh(W_v v̄_i + b_v) + (1 − z) ⊙ tanh(W_t t̄_j + b_t)``
  (d each); word weights ``β_jt = softmax_t(e_t · g_ij)`` over the real words.
* Score ``S(i, j) = Σ_t β_jt R_t`` (β replaces xattn.agg's mean).

The GFU's parameters belong to the model (:class:`SaliencyGuidance`, ``SCANModel.guidance``), so
the DeepSpeed engine trains them: W_z [v̄; t̄] = W_z,v v̄ + W_z,t t̄ splits into a per-image and a
per-caption part, and the encoders (inside the engine's forward) compute every per-side term once.
The embeddings carry them as extra channels, replicated at every position, so the cross-device
gather, region / word dropout, the evaluator's store and its tiles move them unchanged:

    images   (N, k, 3d + 1) = [v_r (d) | s_r (1) | W_z,v v̄_i + b_z (d) | tanh(W_v v̄_i + b_v) (d)]
    captions (M, n, 3d)     = [e_t (d) | W_z,t t̄_j (d) | tanh(W_t t̄_j + b_t) (d)]

and :class:`SaliencyScorer`, parameter-free, reads the per-side terms at position 0 (always real)
and does the per-pair part: the gate σ(·), g, β and SVA. Padded positions are zero everywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from scan.pooling import length_mask
from scan.xattn import XAttnConfig

SAL_EPS = 1e-6  # added to each saliency: log(s + ε) stays finite, v̄ defined for an all-zero map
SAL_NORMS = ("clipped_l2norm", "l2norm", "no_norm")  # the first normalisations SVA supports
_EPS = 1e-8  # the reference's eps (l2norm, cosine_similarity)
_TINY = 1e-30  # floor inside square roots (sqrt(0) has an infinite gradient)
_BUFFERS = 8  # (k · n)-sized buffers per pair: s, z, e, G·e and autograd's saved tensors
# Inference on a CPU keeps tiles near the caches, as scan.xattn does (its measured _FAST_TILE_BYTES,
# here with headroom for this scorer's unfused passes); training tiles go up to the budget.
_CPU_INFERENCE_TILE_BYTES = 64 * 2**20


def _xavier(fc: nn.Linear) -> nn.Linear:
    r = math.sqrt(6.0) / math.sqrt(fc.in_features + fc.out_features)
    nn.init.uniform_(fc.weight, -r, r)
    nn.init.zeros_(fc.bias)
    return fc


def _mask(lens: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    return length_mask(lens, width).to(dtype)  # (B, width)


class SaliencyGuidance(nn.Module):
    """The gated fusion unit's parameters and the per-side terms the encoders append (module doc)."""

    def __init__(self, embed_size: int):
        super().__init__()
        d = embed_size
        self.gate = _xavier(nn.Linear(2 * d, d))  # W_z over [v̄; t̄], b_z
        self.visual = _xavier(nn.Linear(d, d))  # W_v, b_v
        self.textual = _xavier(nn.Linear(d, d))  # W_t, b_t

    def images(self, v: Tensor, saliency: Tensor, lens: Tensor) -> Tensor:
        """v (B, k, d) region embeddings, saliency (B, k), lens (B,) -> (B, k, 3d + 1)."""
        if saliency.shape != v.shape[:2]:
            raise ValueError(f"saliency: expected {tuple(v.shape[:2])} (one value per region), "
                             f"got {tuple(saliency.shape)}")
        mask = _mask(lens, v.shape[1], v.dtype)
        sal = saliency.to(v.dtype) * mask
        w = (sal + SAL_EPS) * mask  # (B, k)
        v_bar = (w[..., None] * v).sum(1) / w.sum(1, keepdim=True)  # (B, d)
        d = v.shape[-1]
        pre_gate = F.linear(v_bar, self.gate.weight[:, :d], self.gate.bias)  # W_z,v v̄ + b_z
        visual = torch.tanh(self.visual(v_bar))
        extra = torch.cat([pre_gate, visual], -1)[:, None].expand(-1, v.shape[1], -1)
        return torch.cat([v, sal[..., None], extra * mask[..., None]], -1)

    def captions(self, e: Tensor, lens: Tensor) -> Tensor:
        """e (B, n, d) word embeddings, lens (B,) -> (B, n, 3d)."""
        mask = _mask(lens, e.shape[1], e.dtype)
        t_bar = (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, d)
        d = e.shape[-1]
        pre_gate = F.linear(t_bar, self.gate.weight[:, d:])  # W_z,t t̄
        textual = torch.tanh(self.textual(t_bar))
        extra = torch.cat([pre_gate, textual], -1)[:, None].expand(-1, e.shape[1], -1)
        return torch.cat([e, extra * mask[..., None]], -1)


def split_images(images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(N, k, 3d + 1) -> regions (N, k, d), saliency (N, k), pre-gate (N, d), visual (N, d)."""
    d = (images.shape[-1] - 1) // 3
    if images.shape[-1] != 3 * d + 1 or d < 1:
        raise ValueError(f"scan_sal image embeddings: expected (N, k, 3d + 1) channels (regions, saliency, "
                         f"guidance; model.kind 'scan_sal'), got {tuple(images.shape)}")
    return images[..., :d], images[..., d], images[:, 0, d + 1:2 * d + 1], images[:, 0, 2 * d + 1:]


def split_captions(captions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(M, n, 3d) -> words (M, n, d), pre-gate (M, d), textual (M, d)."""
    d = captions.shape[-1] // 3
    if captions.shape[-1] != 3 * d or d < 1:
        raise ValueError(f"scan_sal caption embeddings: expected (M, n, 3d) channels (words, guidance; "
                         f"model.kind 'scan_sal'), got {tuple(captions.shape)}")
    return captions[..., :d], captions[:, 0, d:2 * d], captions[:, 0, 2 * d:]


def _first_norm(s: Tensor, cfg: XAttnConfig) -> Tensor:
    """λ1 · the first normalisation of s (..., n) over its last axis, the words."""
    if cfg.raw_feature_norm == "no_norm":
        return s * cfg.lambda_softmax
    x = F.leaky_relu(s, 0.1) if cfg.raw_feature_norm == "clipped_l2norm" else s
    return x * (cfg.lambda_softmax / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + _EPS))


def _sva(v: Tensor, sal: Tensor, img_mask: Tensor, e: Tensor, cfg: XAttnConfig
         ) -> tuple[Tensor, Tensor, Tensor]:
    """Dot products s (A, k, B, n) and unnormalised SVA weights e (A, k, B, n) (0 at padded
    regions) of regions v (A, k, d) against words e (B, n, d); and their sums over k, Z (A, B, n)."""
    A, k, d = v.shape
    B, n, _ = e.shape
    s = torch.mm(v.reshape(A * k, d), e.reshape(B * n, d).t()).view(A, k, B, n)
    z = _first_norm(s, cfg)
    pad = (img_mask == 0).view(A, k, 1, 1)
    shift = z.masked_fill(pad, -math.inf).amax(1, keepdim=True)  # (A, 1, B, n)
    w = ((sal + SAL_EPS) * img_mask).view(A, k, 1, 1)
    ex = torch.exp(z - shift) * w
    return s, ex, ex.sum(1)


def _tile(v: Tensor, sal: Tensor, img_mask: Tensor, gram: Tensor, pre_v: Tensor, vis: Tensor,
          e: Tensor, cap_mask: Tensor, e_norm: Tensor, pre_t: Tensor, txt: Tensor,
          cfg: XAttnConfig) -> Tensor:
    """Scores (A, B) of one tile: images v (A, k, d), sal / img_mask (A, k), gram (A, k, k), per-image
    terms (A, d); captions e (B, n, d), cap_mask / e_norm (B, n), per-caption terms (B, d)."""
    A, k, _ = v.shape
    B, n, _ = e.shape
    s, ex, z = _sva(v, sal, img_mask, e, cfg)
    # q·a_t = Σ_r α s and |a_t|² = α^T G α with α = ex / Z (docs/DESIGN.md §2).
    qa = (ex * s).sum(1)
    aa = (torch.bmm(gram, ex.view(A, k, B * n)).view(A, k, B, n) * ex).sum(1)
    a_norm = (aa / (z * z)).clamp_min(_TINY).sqrt()
    r = (qa / z) / (e_norm[None] * a_norm).clamp_min(_EPS)  # (A, B, n)
    gate = torch.sigmoid(pre_v[:, None] + pre_t[None])  # (A, B, d)
    g = gate * (vis[:, None] - txt[None]) + txt[None]  # z ⊙ tanh(W_v v̄) + (1 − z) ⊙ tanh(W_t t̄)
    logits = torch.einsum("bnd,abd->abn", e, g).masked_fill(cap_mask[None] == 0, -math.inf)
    beta = torch.softmax(logits, dim=-1)  # (A, B, n), 0 at padded words
    return (beta * r).sum(-1)


@dataclass(frozen=True)
class SaliencyScorer:
    """scan_sal: SVA + STA (module doc) over embeddings laid out by :class:`SaliencyGuidance`."""

    xattn: XAttnConfig
    kind: str = "scan_sal"
    attention_direction: str = "t2i"

    @property
    def label(self) -> str:
        return "SCAN t2i + saliency (SVA, STA)"

    def _inputs(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None):
        cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        v, sal, pre_v, vis = (x.to(cdtype) for x in split_images(images))
        e, pre_t, txt = (x.to(cdtype) for x in split_captions(captions))
        if v.shape[-1] != e.shape[-1]:
            raise ValueError(f"scan_sal: image embeddings have d={v.shape[-1]}, captions d={e.shape[-1]}")
        N, k = v.shape[:2]
        img_lens = torch.full((N,), k, device=v.device) if img_lens is None else img_lens.to(v.device)
        img_mask = _mask(img_lens, k, cdtype)
        cap_mask = _mask(cap_lens.to(e.device), e.shape[1], cdtype)
        v, sal, e = v * img_mask[..., None], sal * img_mask, e * cap_mask[..., None]
        return v, sal, img_mask, pre_v, vis, e, cap_mask, pre_t, txt

    def __call__(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None = None,
                 *, memory_budget_mb: float = 1024, checkpoint: bool = False) -> Tensor:
        v, sal, img_mask, pre_v, vis, e, cap_mask, pre_t, txt = self._inputs(images, captions, cap_lens, img_lens)
        N, k, d = v.shape
        M, n, _ = e.shape
        gram = torch.bmm(v, v.transpose(1, 2))  # (N, k, k), once per image
        e_norm = (e * e).sum(-1).clamp_min(_TINY).sqrt()  # (M, n)
        # One tile's per-pair intermediates within the budget, as scan.xattn tiles: k·n buffers
        # for SVA plus the d-sized gate, guidance and its product for STA.
        pair_bytes = (k * n * _BUFFERS + 4 * d + 4 * n) * torch.finfo(v.dtype).bits // 8
        budget = memory_budget_mb * 2**20
        if v.device.type == "cpu" and not (torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad)):
            budget = min(budget, _CPU_INFERENCE_TILE_BYTES)
        pairs = max(1, int(budget // pair_bytes))
        tile_b = min(M, pairs)
        tile_a = max(1, min(N, pairs // tile_b))
        grad = checkpoint and torch.is_grad_enabled()
        rows = []
        for a0 in range(0, N, tile_a):
            ia = slice(a0, a0 + tile_a)
            cols = []
            for b0 in range(0, M, tile_b):
                ib = slice(b0, b0 + tile_b)
                args = (v[ia], sal[ia], img_mask[ia], gram[ia], pre_v[ia], vis[ia],
                        e[ib], cap_mask[ib], e_norm[ib], pre_t[ib], txt[ib], self.xattn)
                cols.append(torch_checkpoint(_tile, *args, use_reentrant=False) if grad else _tile(*args))
            rows.append(torch.cat(cols, 1) if len(cols) > 1 else cols[0])
        return torch.cat(rows, 0) if len(rows) > 1 else rows[0]

    def attention(self, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor | None,
                  pairs: Tensor) -> Tensor:
        """(P, n, k): the SVA weights α_rt of the pairs (image index, caption index) (P, 2), words ×
        regions, zero at padded words and regions."""
        v, sal, img_mask, _, _, e, cap_mask, _, _ = self._inputs(images, captions, cap_lens, img_lens)
        pairs = pairs.to(v.device)
        out = []
        for i, j in pairs.tolist():
            _, ex, z = _sva(v[i:i + 1], sal[i:i + 1], img_mask[i:i + 1], e[j:j + 1], self.xattn)
            alpha = (ex / z[:, None])[0, :, 0].t()  # (n, k)
            out.append(alpha * cap_mask[j][:, None])
        return torch.stack(out)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "xattn": asdict(self.xattn), "saliency_eps": SAL_EPS}
