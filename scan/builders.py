"""What an experiment config builds in the library: its scorer and its training loss.

The library's pieces take plain values (``scan.scorers.build_scorer(kind, xattn)``,
``scan.loss.TrainingLoss(scorer, margin=...)``); this module is where the experiment schema
(``scan.config.ExperimentConfig``) is read to fill them, once per run, as open_clip's
``create_loss(args)``.
"""
from __future__ import annotations

from scan.config import ExperimentConfig
from scan.loss import TrainingLoss
from scan.scorers import Scorer, build_scorer


def scorer_for(cfg: ExperimentConfig) -> Scorer:
    """The scorer of an experiment config (``model.kind`` and ``xattn``)."""
    return build_scorer(cfg.model.kind, cfg.xattn)


def loss_for(cfg: ExperimentConfig) -> TrainingLoss:
    """The training loss of an experiment config: its scorer, ``loss.*`` (margin, negatives
    schedule, partition across ranks, tiling) and ``model.region_dropout`` / ``word_dropout``."""
    lc = cfg.loss
    return TrainingLoss(scorer_for(cfg), margin=lc.margin, max_violation=lc.max_violation,
                        warmup_epochs=lc.warmup_epochs, mask_same_image=lc.mask_same_image,
                        cross_device=lc.cross_device, partition=lc.partition,
                        caption_chunk=lc.caption_chunk, length_groups=lc.length_groups,
                        region_dropout=cfg.model.region_dropout, word_dropout=cfg.model.word_dropout)
