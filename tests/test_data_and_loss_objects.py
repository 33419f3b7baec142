"""The objects built once per run (issue 34): the training loss from its config, the loader spec
from its config, and the one place the launcher's rank is read."""
from __future__ import annotations

import pytest
import torch

from dataio.epoch_plan import epoch_plan
from dataio.pipeline import LoaderSpec, resolve_shards
from dataio.ranks import env_ranks, rank_world
from scan.builders import loss_for, scorer_for
from scan.config import ExperimentConfig
from scan.loss import TrainingLoss, batch_loss
from scan.pooling import drop_positions


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(6, 5, 8, generator=g, dtype=torch.float64)
    cap = torch.randn(6, 7, 8, generator=g, dtype=torch.float64)
    img_lens, cap_lens = torch.tensor([5, 3, 5, 4, 2, 5]), torch.tensor([7, 2, 4, 7, 5, 1])
    return img, img_lens, cap, cap_lens, torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("kind", ["scan", "dvsa"])
def test_training_loss_is_the_configured_batch_loss(kind):
    """loss_for(cfg) reads every loss key once: its call equals batch_loss with the epoch's
    negatives (all of them in the warm-up epochs) after region / word dropout, drawn from the same
    random stream as the step drew them before the loss object."""
    cfg = ExperimentConfig()
    cfg.model.kind, cfg.loss.warmup_epochs, cfg.loss.margin = kind, 1, 0.3
    cfg.model.region_dropout, cfg.model.word_dropout = 0.3, 0.2
    loss_fn = loss_for(cfg)
    assert isinstance(loss_fn, TrainingLoss) and loss_fn.margin == 0.3 and loss_fn.warmup_epochs == 1
    assert loss_fn.scorer == scorer_for(cfg)
    img, img_lens, cap, cap_lens, ids = _batch()
    for epoch, hardest in ((0, False), (1, True)):
        torch.manual_seed(epoch)
        got, got_total = loss_fn(img, img_lens, cap, cap_lens, ids, epoch)
        torch.manual_seed(epoch)
        i, il = drop_positions(img, img_lens, 0.3)
        c, cl = drop_positions(cap, cap_lens, 0.2)
        want, want_total = batch_loss(i, il, c, cl, ids, cfg.loss.at_epoch(epoch), scorer_for(cfg))
        assert loss_fn.at_epoch(epoch).max_violation is hardest
        assert float(got) == float(want) and float(got_total) == float(want_total)
    # the warm-up sums over all negatives: a different value from the hardest-negative loss
    warm, hard = (float(loss_fn(img, img_lens, cap, cap_lens, ids, epoch)[0]) for epoch in (0, 1))
    assert warm != hard


def test_loader_spec_plans_as_the_epoch_plan(generated_shards):
    """LoaderSpec holds the loader's choices once; its plan of any epoch and resume point is the
    epoch plan of those choices, and its batches follow that plan."""
    spec = LoaderSpec(generated_shards, batch_size=16, encode=lambda toks, raw: [1] * len(toks), seed=3,
                      rank=1, world=2, num_workers=0, caps_per_image=2)
    shards = resolve_shards(generated_shards)
    for epoch, segments in ((0, ()), (1, [(2, 32)])):
        want = epoch_plan(shards, batch_size=16, seed=3, epoch=epoch, rank=1, world=2, caps_per_image=2,
                          segments=segments)
        got = spec.plan(epoch, segments)
        assert got.slots.tolist() == want.slots.tolist() and got.num_batches == want.num_batches
    batches = list(spec.batches(1, [(2, 32)]))
    assert len(batches) == want.num_batches and sum(len(b) for b in batches) == want.rank_captions
    with pytest.raises(ValueError, match="no caption encoder"):
        LoaderSpec(generated_shards, batch_size=16).batches(0)


def test_the_launcher_rank_is_read_in_one_place(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_ranks() == (0, 1, 0) and rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_ranks() == (2, 4, 0) and rank_world() == (2, 4) and rank_world(1, 2) == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        env_ranks()
    with pytest.raises(ValueError, match=r"rank 3 is not in \[0, world=2\)"):
        rank_world(3, 2)
