"""VSE++ hinge loss with hardest negatives, as the reference's ContrastiveLoss (kuanghuei/SCAN).

``directional_hinge`` is one direction of it over any (rows × columns) block of scores, which is what
cross-device mining needs: rank r scores its local images against all gathered captions (rows =
local images) and all gathered images against its local captions (rows = local captions, i.e. the
transposed block). ``hardest_negative_loss`` is the single-process, square-batch loss.
"""
from __future__ import annotations

import torch


def directional_hinge(scores: torch.Tensor, positive_col: torch.Tensor, margin: float,
                      max_violation: bool, row_ids: torch.Tensor | None = None,
                      col_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_rows of [margin − S(r, p_r) + S(r, c)]₊ over the negatives c of each row r.

    scores (R, C); positive_col (R,) long: the positive's column of each row. The negatives of row
    r are all columns but ``positive_col[r]``, and, when ids are given, all but the columns whose
    ``col_ids`` equal ``row_ids[r]`` (another caption of the same image is never a negative).
    ``max_violation``: only the hardest negative of each row counts, else all are summed.
    Returns a scalar (0 for a row left with no negatives).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: expected (R, C), got {tuple(scores.shape)}")
    rows, cols = scores.shape
    if positive_col.shape != (rows,):
        raise ValueError(f"positive_col: expected shape ({rows},), got {tuple(positive_col.shape)}")
    if (row_ids is None) != (col_ids is None):
        raise ValueError("row_ids and col_ids must be given together")
    positive_col = positive_col.to(device=scores.device, dtype=torch.long)
    positive = scores.gather(1, positive_col[:, None])  # (R, 1)
    cost = (margin + scores - positive).clamp(min=0)  # (R, C)
    not_negative = torch.zeros_like(cost, dtype=torch.bool)
    not_negative.scatter_(1, positive_col[:, None], True)
    if row_ids is not None:
        if row_ids.shape != (rows,) or col_ids.shape != (cols,):
            raise ValueError(f"row_ids/col_ids: expected shapes ({rows},)/({cols},), got "
                             f"{tuple(row_ids.shape)}/{tuple(col_ids.shape)}")
        not_negative |= row_ids.to(scores.device)[:, None] == col_ids.to(scores.device)[None, :]
    # Filling with 0 is exact: every cost is >= 0, so a zero never beats a real violation.
    cost = cost.masked_fill(not_negative, 0)
    per_row = cost.max(dim=1).values if max_violation else cost.sum(dim=1)
    return per_row.sum()


def hardest_negative_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                          image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reference loss on a square batch: scores (B, B), row i = image of pair i, column j =
    caption of pair j, the diagonal positive. Caption retrieval (rows) + image retrieval (columns).

    With ``image_ids`` (B,), pairs whose images are equal are never negatives; without it the result
    equals the reference's ContrastiveLoss exactly.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square (B, B) matrix, got {tuple(scores.shape)}")
    diagonal = torch.arange(scores.shape[0], device=scores.device)
    caption_retrieval = directional_hinge(scores, diagonal, margin, max_violation, image_ids, image_ids)
    image_retrieval = directional_hinge(scores.t(), diagonal, margin, max_violation, image_ids, image_ids)
    return caption_retrieval + image_retrieval
