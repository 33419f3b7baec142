"""The length mask: which positions of a padded batch are real. The one helper every layer uses
(the data's batches, the library's pooling and cross attention)."""
from __future__ import annotations

import torch


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True at real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]
