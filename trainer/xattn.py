"""Stacked cross attention scores (SCAN), exact to the reference semantics, without per-pair loops.

See ../shared/DESIGN.md §2 for the semantics and the fast formulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["t2i", "i2t"]
Aggregation = Literal["mean", "lse", "max", "sum"]
RawFeatureNorm = Literal[
    "clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "no_norm", "softmax"
]


@dataclass
class XAttnConfig:
    """How one image and one caption are compared (the paper's t2i/i2t, AVG/LSE, λ1, λ2)."""

    direction: Direction = "t2i"
    agg: Aggregation = "mean"
    lambda_softmax: float = 9.0  # λ1: inverse temperature of the attention softmax
    lambda_lse: float = 6.0  # λ2: only used when agg == "lse"
    raw_feature_norm: RawFeatureNorm = "clipped_l2norm"
