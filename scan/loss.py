"""The loss that trains: VSE++ hinge with hardest negatives over any scorer's scores, across devices.

As the reference's ContrastiveLoss (kuanghuei/SCAN), mined over the global micro-batch
(docs/DESIGN.md §3). From the bottom up:

* :func:`directional_hinge`: one direction of the hinge over any (rows × columns) block of scores;
* :func:`contrastive_hinge`: both directions for a rank's B pairs among the G of the global batch,
  the one hinge every path calls (one process: B = G);
* :func:`hardest_negative_loss`: the square-batch loss of one process, as the reference computes it;
* :func:`pair_scores`: the model's scores (``scan.scorers``) of images × captions, each tile
  recomputed in backward;
* :func:`batch_loss`: what a training step back-propagates; it gathers every rank's region and word
  embeddings itself (as open_clip's ``ClipLoss`` gathers its features), so a caller passes only
  its local batch;
* :class:`TrainingLoss`: the loss a training run builds once from plain values (its scorer, margin,
  partition, negatives schedule and region / word dropout; ``scan.builders.loss_for`` fills it from
  an experiment, as open_clip's ``create_loss``) and its step calls on each micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch

from scan.collectives import all_gather_ints, all_reduce_sum, gather_padded, group_world, is_distributed
from scan.pooling import drop_positions
from scan.xattn import XAttnConfig
from scan.ring import ring_row_scores
from scan.scorers import Scorer, as_scorer


class LossSettings(Protocol):
    """What :func:`batch_loss` reads of its settings: a :class:`TrainingLoss`, or the experiment's
    ``loss`` section (``scan.config.LossConfig``), which has the same keys."""
    margin: float
    max_violation: bool
    mask_same_image: bool
    cross_device: bool
    partition: str
    caption_chunk: int
    length_groups: int


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


def contrastive_hinge(i2t: torch.Tensor, t2i: torch.Tensor, positive: torch.Tensor, margin: float,
                      max_violation: bool, local_ids: torch.Tensor | None = None,
                      all_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Caption retrieval + image retrieval for B local pairs among the G pairs of a global batch.

    i2t (B, G): the local images × all captions; t2i (B, G): the local captions × all images;
    positive (B,): the local pairs' indices in G. With ids (local (B,), all (G,)), pairs of the
    same image are never negatives.
    """
    return (directional_hinge(i2t, positive, margin, max_violation, local_ids, all_ids)
            + directional_hinge(t2i, positive, margin, max_violation, local_ids, all_ids))


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
    return contrastive_hinge(scores, scores.t(), diagonal, margin, max_violation, image_ids, image_ids)


def pair_scores(images: torch.Tensor, img_lens: torch.Tensor, captions: torch.Tensor,
                cap_lens: torch.Tensor, scorer: Scorer | XAttnConfig, caption_chunk: int,
                length_groups: int = 1) -> torch.Tensor:
    """(N, M) scores, each tile recomputed in backward; ``caption_chunk`` > 0 bounds the
    captions per scorer call (0: the scorer tiles by its memory budget alone). ``length_groups``
    > 1: the captions sorted by length into that many equal groups, each cut to its own longest
    caption (padding adds nothing to a score, so only the work changes); columns in input order."""
    scorer = as_scorer(scorer)
    M = captions.shape[0]
    if length_groups > 1 and M > 1:
        sorted_lens, order = torch.sort(cap_lens, stable=True)
        n = min(length_groups, M)  # groups of sorted neighbours, none empty
        # each group's last length is its longest; one host sync for all groups (a CUDA step)
        widths = torch.stack([lens[-1] for lens in sorted_lens.tensor_split(n)]).tolist()
        parts = [pair_scores(images, img_lens, captions[g, :w], cap_lens[g], scorer, caption_chunk)
                 for g, w in zip(order.tensor_split(n), widths)]
        return torch.cat(parts, dim=1)[:, torch.argsort(order)]
    step = caption_chunk if caption_chunk > 0 else M
    parts = [scorer(images, captions[c:c + step], cap_lens[c:c + step], img_lens, checkpoint=True)
             for c in range(0, M, step)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def batch_loss(img_emb: torch.Tensor, img_lens: torch.Tensor, cap_emb: torch.Tensor,
               cap_lens: torch.Tensor, image_ids: torch.Tensor, loss_cfg: LossSettings,
               scorer: Scorer | XAttnConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss to back-propagate, and the loss summed over all ranks (detached, for logs).

    img_emb (B, k, d), cap_emb (B, n, d): pair i is (image of caption i, caption i); image_ids (B,).
    Ranks may hold different B, k and n. With ``loss.cross_device`` in a process group the hinge is
    mined over the G = Σ B_r pairs of all ranks, and its value and gradients are one process's on
    the concatenated batch (docs/DESIGN.md §3.3): ``loss.partition`` "rows" scores this rank's
    images against all captions only (B·G pairs); "ring" the same with the caption blocks passed
    around a ring instead of gathered (``scan.ring``); "rows_and_columns" also all images against
    this rank's captions. The result is multiplied by the world size because DeepSpeed averages
    gradients over ranks. Otherwise the B local pairs are mined among themselves.
    """
    scorer = as_scorer(scorer)
    ids = image_ids if loss_cfg.mask_same_image else None
    margin, hardest = loss_cfg.margin, loss_cfg.max_violation
    if not (loss_cfg.cross_device and is_distributed()):
        scores = pair_scores(img_emb, img_lens, cap_emb, cap_lens, scorer, loss_cfg.caption_chunk,
                             loss_cfg.length_groups)
        diagonal = torch.arange(img_emb.shape[0], device=img_emb.device)
        loss = contrastive_hinge(scores, scores.t(), diagonal, margin, hardest, ids, ids)
        return loss, all_reduce_sum(loss)
    if loss_cfg.partition in ("rows", "ring"):
        loss = _row_partitioned_loss(img_emb, img_lens, cap_emb, cap_lens, image_ids, ids is not None,
                                     loss_cfg, scorer)
    else:
        loss = _rows_and_columns_loss(img_emb, img_lens, cap_emb, cap_lens, ids, loss_cfg, scorer)
    # Gradients of every rank's loss reach this rank's embeddings through the gathers' backward.
    return loss * group_world()[1], all_reduce_sum(loss)


def _rows_and_columns_loss(img_emb: torch.Tensor, img_lens: torch.Tensor, cap_emb: torch.Tensor,
                           cap_lens: torch.Tensor, ids: torch.Tensor | None, loss_cfg: LossSettings,
                           scorer: Scorer) -> torch.Tensor:
    """Local images × all captions (B, G) and all images × local captions (G, B): each direction's
    hardest negative comes from a block this rank scored itself."""
    rank, _ = group_world()
    B = img_emb.shape[0]
    sizes = all_gather_ints([B, img_emb.shape[1], cap_emb.shape[1]], img_emb.device)  # (W, 3)
    counts = sizes[:, 0].tolist()
    k_max, n_max = int(sizes[:, 1].max()), int(sizes[:, 2].max())
    all_img = gather_padded(img_emb, counts, k_max)  # (G, k_max, d)
    all_cap = gather_padded(cap_emb, counts, n_max)  # (G, n_max, d)
    all_img_lens, all_cap_lens = gather_padded(img_lens, counts), gather_padded(cap_lens, counts)
    all_ids = gather_padded(ids, counts) if ids is not None else None
    positive = sum(counts[:rank]) + torch.arange(B, device=img_emb.device)  # our pairs in G
    i2t = pair_scores(img_emb, img_lens, all_cap, all_cap_lens, scorer, loss_cfg.caption_chunk,
                      loss_cfg.length_groups)  # (B, G)
    t2i = pair_scores(all_img, all_img_lens, cap_emb, cap_lens, scorer, loss_cfg.caption_chunk,
                      loss_cfg.length_groups)  # (G, B)
    return contrastive_hinge(i2t, t2i.t(), positive, loss_cfg.margin, loss_cfg.max_violation,
                             ids, all_ids)


def _row_partitioned_loss(img_emb: torch.Tensor, img_lens: torch.Tensor, cap_emb: torch.Tensor,
                          cap_lens: torch.Tensor, image_ids: torch.Tensor, mask_same_image: bool,
                          loss_cfg: LossSettings, scorer: Scorer) -> torch.Tensor:
    """This rank's rows of the global score matrix, S_r (B, G) = local images × all captions, and its
    share of both hinges (docs/DESIGN.md §3.3):

    * caption retrieval (rows): every negative of a local image is in S_r: the local hinge;
    * image retrieval (columns): caption c's cost against row i is [m + S(i, c) − S(c, c)]₊ over the
      negatives i. S(c, c) lives on c's owner: the G positives are gathered (autograd-aware, so
      their gradient returns to the owner). With ``max_violation`` each rank takes its column maxima
      over its rows; the costs of all ranks are gathered (W, G) and column c counts on the lowest
      rank holding the global maximum (one process's max keeps the first row among ties), so the
      gradient reaches exactly the row one process would pick. Without it, every rank sums its rows.
    """
    rank, world = group_world()
    B, device = img_emb.shape[0], img_emb.device
    sizes = all_gather_ints([B, cap_emb.shape[1]], device)  # (W, 2)
    counts, n_sizes = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    all_cap_lens = gather_padded(cap_lens, counts, differentiable=False)
    positive = sum(counts[:rank]) + torch.arange(B, device=device)  # our pairs in G
    if loss_cfg.partition == "ring":  # caption blocks passed around the ring (scan.ring)
        scores = ring_row_scores(img_emb, img_lens, cap_emb, all_cap_lens, counts, n_sizes, scorer)
    else:
        all_cap = gather_padded(cap_emb, counts, max(n_sizes))  # (G, n_max, d), differentiable
        scores = pair_scores(img_emb, img_lens, all_cap, all_cap_lens, scorer, loss_cfg.caption_chunk,
                             loss_cfg.length_groups)  # (B, G)
    margin, hardest = loss_cfg.margin, loss_cfg.max_violation
    local_ids = image_ids if mask_same_image else None
    all_ids = gather_padded(image_ids, counts, differentiable=False) if mask_same_image else None
    rows = directional_hinge(scores, positive, margin, hardest, local_ids, all_ids)

    diagonal = gather_padded(scores[torch.arange(B, device=device), positive], counts)  # (G,)
    cost = (margin + scores - diagonal[None, :]).clamp(min=0)  # (B, G): row i, column c
    not_negative = positive[:, None] == torch.arange(cost.shape[1], device=device)[None, :]
    if mask_same_image:
        not_negative |= local_ids.to(device)[:, None] == all_ids.to(device)[None, :]
    cost = cost.masked_fill(not_negative, 0)  # exact: costs are >= 0 (as directional_hinge)
    if not hardest:
        return rows + cost.sum()
    best = cost.max(dim=0).values if B else cost.new_zeros(cost.shape[1])  # (G,)
    every = gather_padded(best.detach()[None], [1] * world, differentiable=False)  # (W, G)
    winner = every.argmax(dim=0)  # the first (lowest) rank holding the maximum
    return rows + best[winner == rank].sum()




@dataclass(frozen=True)
class TrainingLoss:
    """The training loss, built once per run from plain values and called by every micro-batch's
    step: ``loss(img_emb, img_lens, cap_emb, cap_lens, image_ids, epoch) -> (loss, summed)``.

    A call drops regions and words (``region_dropout`` / ``word_dropout``, training only), then
    returns :func:`batch_loss` with the epoch's negatives: all of them (the hinge summed) during the
    first ``warmup_epochs``, then the hardest when ``max_violation``. The gathers across ranks happen
    inside, so a step passes only its local batch.
    """
    scorer: Scorer
    margin: float = 0.2
    max_violation: bool = True
    warmup_epochs: int = 0  # epochs at the start that sum the hinge over all negatives
    mask_same_image: bool = True
    cross_device: bool = True
    partition: Literal["rows", "ring", "rows_and_columns"] = "rows"
    caption_chunk: int = 0
    length_groups: int = 1
    region_dropout: float = 0.0
    word_dropout: float = 0.0

    def at_epoch(self, epoch: int) -> "TrainingLoss":
        """The loss of ``epoch``: all negatives during the warm-up epochs, then as built."""
        return replace(self, max_violation=False) if epoch < self.warmup_epochs else self

    def __call__(self, img_emb: torch.Tensor, img_lens: torch.Tensor, cap_emb: torch.Tensor,
                 cap_lens: torch.Tensor, image_ids: torch.Tensor,
                 epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        img_emb, img_lens = drop_positions(img_emb, img_lens, self.region_dropout)
        cap_emb, cap_lens = drop_positions(cap_emb, cap_lens, self.word_dropout)
        return batch_loss(img_emb, img_lens, cap_emb, cap_lens, image_ids, self.at_epoch(epoch), self.scorer)
