"""Catching a collapsed run while it trains.

A model that scores every pair alike has stopped learning: the hinge's gradient through equal
scores is the same for every negative, and a dead DVSA (every v·s ≤ 0, every score 0) gets no
gradient at all. Its recalls mean nothing (docs/DESIGN.md §4: ties count against the query), so the
run should not spend its budget on it silently. Two signs, checked as the run goes:

- the training loss sits at its collapse value, the loss of a batch whose scores are all equal:
  ``margin`` times the number of hinge terms (2·G·margin for G captions with hardest negatives;
  2·margin·(negative pairs) while the warm-up sums all negatives), for ``train.collapse_steps``
  consecutive micro-batches;
- a validation's scores are constant (or not finite).

Either is logged, written to the run log (an ``alert`` record) and to the validation's metrics,
and stops the run with :class:`CollapseError` unless ``train.on_collapse`` is ``continue``.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

import torch

from scan.collectives import all_gather_objects
from scan.loss import TrainingLoss
from trainer.telemetry import Telemetry, alert

log = logging.getLogger(__name__)

REL_TOL = 1e-5  # |loss - collapse value| within this fraction of the value counts as "at" it


class CollapseError(FloatingPointError):
    """The run collapsed (train.on_collapse: stop): like a non-finite loss, its numbers are
    degenerate, and the ``scan`` command reports both as "training stopped"."""


def collapse_value(ids_per_rank: Sequence[Sequence[int]], margin: float, max_violation: bool,
                   mask_same_image: bool, cross_device: bool) -> float:
    """The loss of a micro-batch whose scores are all equal: every hinge term is ``margin``.

    ``ids_per_rank``: each rank's image ids. Negatives are mined over the gathered global batch
    (``cross_device``) or within each rank's batch; a pair of the same image is no negative when
    ``mask_same_image`` (else only the pair itself). Rows and columns count alike (2×).
    """
    groups = [[i for ids in ids_per_rank for i in ids]] if cross_device else ids_per_rank
    terms = 0
    for ids in groups:
        count = Counter(ids)
        negatives = [len(ids) - (count[i] if mask_same_image else 1) for i in ids]
        terms += 2 * (sum(n > 0 for n in negatives) if max_violation else sum(negatives))
    return margin * terms


class CollapseGuard:
    """Counts consecutive micro-batches at the collapse value; checks validation scores.

    Every rank holds one and sees the same (all-reduced) loss, so every rank decides alike.
    """

    def __init__(self, loss_fn: TrainingLoss, *, steps: int, on_collapse: str,
                 telemetry: Telemetry) -> None:
        self.loss_fn, self.steps, self.on_collapse, self.telemetry = loss_fn, steps, on_collapse, telemetry
        self.run = 0  # consecutive micro-batches at the collapse value

    def observe_loss(self, loss: float, image_ids: torch.Tensor, *, step: int, epoch: int) -> None:
        """``loss``: the micro-batch's loss summed over ranks; ``image_ids``: this rank's (B,)."""
        if self.steps <= 0:
            return
        # A collapsed loss is margin × an integer: only then gather the ids to count the terms.
        margin = self.loss_fn.margin
        terms = loss / margin if margin > 0 else math.nan
        if not (math.isfinite(terms) and terms >= 1 and abs(terms - round(terms)) <= REL_TOL * terms):
            self.run = 0
            return
        ids = all_gather_objects(image_ids.tolist())
        fn = self.loss_fn.at_epoch(epoch)
        value = collapse_value(ids, fn.margin, fn.max_violation, fn.mask_same_image, fn.cross_device)
        self.run = self.run + 1 if abs(loss - value) <= REL_TOL * value else 0
        if self.run == self.steps:
            self.report(
                f"the training loss has sat at its collapse value {value:.6g} (every score of the "
                f"batch equal: margin {fn.margin} x {round(value / fn.margin)} hinge terms) for "
                f"{self.steps} consecutive micro-batches (train.collapse_steps)", step=step, epoch=epoch)

    def scores_collapsed(self, lo: float, hi: float) -> str | None:
        """A validation's score range [lo, hi] → what is wrong when constant or non-finite, else None."""
        if self.steps <= 0:
            return None
        if math.isfinite(lo) and math.isfinite(hi) and hi - lo > 1e-6 * max(1.0, abs(hi), abs(lo)):
            return None
        what = ("not finite" if not (math.isfinite(lo) and math.isfinite(hi))
                else f"constant ({lo:.6g} for every pair)")
        return (f"the validation's scores are {what}: the model scores every image-caption pair "
                "alike, so its recalls are those of the worst order")

    def report(self, what: str, *, step: int, epoch: int) -> None:
        """Logs and records a collapse; raises :class:`CollapseError` unless on_collapse is continue."""
        message = (f"collapsed model at epoch {epoch}, step {step}: {what}. Check the learning rate, "
                   "the margin and the encoders' initialisation (docs/DESIGN.md)")
        alert(self.telemetry, kind="collapse", step=step, epoch=epoch, message=message)
        if self.on_collapse == "stop":
            log.error("%s; stopping (train.on_collapse=continue trains on)", message)
            raise CollapseError(f"{message}; set train.on_collapse=continue to train on anyway")
        log.warning("%s; training on (train.on_collapse=continue)", message)
