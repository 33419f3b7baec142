"""Pooling a set of region or word vectors into one (``model.kind: vse``).

* ``mean``: the mean of the valid vectors (VSE++ with precomputed features).
* ``gpo``: the Generalized Pooling Operator of VSE∞ (Chen et al., CVPR 2021): per feature
  dimension the valid values are sorted in decreasing order and summed with weights θ_l that
  depend only on the rank l and the set size. θ comes from a small BiGRU over sinusoidal
  encodings of the ranks 0..L-1, a linear score per rank and a softmax at temperature 0.1, so it
  learns anything between max pooling (θ on rank 0) and mean pooling (θ uniform).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dataio.masks import length_mask


def drop_positions(x: Tensor, lens: Tensor, p: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Region / word dropout: each valid position of (B, n, d) leaves with probability ``p`` (one
    stays at least); the kept ones move to the front in order, the rest is zero padding as every
    encoder output. Returns the new (B, n, d) and lengths (B,)."""
    if p <= 0:
        return x, lens
    batch, n = x.shape[:2]
    valid = length_mask(lens, n)
    keep = valid & (torch.rand(batch, n, generator=generator, device=x.device) >= p)
    first = torch.arange(batch, device=x.device)
    keep[first, 0] |= ~keep.any(1)  # nothing kept: the first position stays
    # Stable sort puts the kept positions first in their order: (B, n) gather indices.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    new_lens = keep.sum(1).to(lens.dtype)
    out = torch.gather(x, 1, order[..., None].expand_as(x))
    return out * length_mask(new_lens, n)[..., None].to(x.dtype), new_lens


def masked_mean(x: Tensor, lens: Tensor | None) -> Tensor:
    """(B, L, d), (B,) → (B, d): the mean over the valid positions (all L when ``lens`` is None)."""
    if lens is None:
        return x.mean(dim=1)
    lens = lens.to(x.device)
    mask = length_mask(lens, x.shape[1])[..., None].to(x.dtype)
    return (x * mask).sum(1) / lens.to(x.dtype).clamp(min=1)[:, None]


class MeanPool(nn.Module):
    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        """(B, L, d), (B,) → (B, d): the mean over the valid positions."""
        return masked_mean(x, lens)


def positional_encoding(length: int, dim: int, device: torch.device) -> Tensor:
    """(length, dim) sinusoidal encodings of the positions 0..length-1 (Vaswani et al.)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class GPO(nn.Module):
    """VSE∞'s Generalized Pooling Operator (module doc)."""

    TEMPERATURE = 0.1

    def __init__(self, pe_dim: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)

    def weights(self, lens: Tensor, width: int) -> Tensor:
        """(B,) set sizes → (B, width, 1) weights per rank, summing to 1 over each set's ranks."""
        mask = length_mask(lens, width)
        pe = positional_encoding(width, self.pe_dim, lens.device).to(self.score.weight.dtype)
        pe = pe[None].expand(lens.shape[0], -1, -1) * mask[..., None].to(pe.dtype)
        packed = pack_padded_sequence(pe, lens.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)  # (B, width, 2h)
        half = out.shape[-1] // 2
        scores = self.score((out[..., :half] + out[..., half:]) / 2)  # (B, width, 1)
        scores = scores.masked_fill(~mask[..., None], float("-inf"))
        wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16 scores: fp32 softmax
        return torch.softmax(wide / self.TEMPERATURE, dim=1).to(out.dtype)

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        """(B, L, d), (B,) → (B, d)."""
        mask = length_mask(lens, x.shape[1])[..., None]
        # Padding sorts last (-inf), then becomes 0 under a zero weight.
        ranked = x.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask, 0.0)
        return (ranked * self.weights(lens, x.shape[1]).to(x.dtype)).sum(1)


def build_pool(kind: str) -> nn.Module:
    if kind == "mean":
        return MeanPool()
    if kind == "gpo":
        return GPO()
    raise ValueError(f"config key 'model.pooling': {kind!r} is not allowed; expected 'mean' or 'gpo'")
