"""Region and word dropout (``scan.pooling.drop_positions``, applied by ``scan.loss.TrainingLoss``)
and the text encoder's lower lr group."""
from __future__ import annotations

import pytest
import torch

from scan.config import ConfigError, load_experiment
from scan.pooling import drop_positions, length_mask
from trainer.engine import param_groups


def test_kept_positions_move_to_the_front_in_order_and_padding_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 4 * 6 + 1, dtype=torch.float32).reshape(4, 6, 1).repeat(1, 1, 3)
    lens = torch.tensor([6, 4, 1, 5])
    out, new = drop_positions(x, lens, 0.5, g)
    assert out.shape == x.shape and bool((new >= 1).all()) and bool((new <= lens).all())
    for b in range(4):
        kept = out[b, : int(new[b]), 0]
        assert bool((kept[1:] > kept[:-1]).all())  # original order
        # every kept vector is one of this row's valid positions, unchanged
        assert set(kept.tolist()) <= set(x[b, : int(lens[b]), 0].tolist())
        assert torch.equal(out[b, int(new[b]):], torch.zeros(6 - int(new[b]), 3))


def test_dropout_rate_and_at_least_one_kept():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 10, 4)
    lens = torch.full((2000,), 10)
    _, new = drop_positions(x, lens, 0.2, g)
    assert float(new.float().mean()) == pytest.approx(8.0, abs=0.1)
    _, none_left = drop_positions(x[:50], lens[:50], 0.999, g)
    assert bool((none_left == 1).all())
    same, same_lens = drop_positions(x, lens, 0.0)
    assert same is x and same_lens is lens


def test_gradient_reaches_only_kept_positions():
    x = torch.randn(3, 5, 2, requires_grad=True)
    out, new = drop_positions(x, torch.tensor([5, 5, 3]), 0.4, torch.Generator().manual_seed(2))
    out.sum().backward()
    assert torch.equal(x.grad.sum(-1) != 0, _kept_mask(x.detach(), out.detach(), new))


def _kept_mask(x, out, new):
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    for b in range(x.shape[0]):
        for v in out[b, : int(new[b])]:
            mask[b] |= (x[b] == v).all(-1)
    return mask & length_mask(torch.tensor([5, 5, 3]), 5)


def test_text_layers_get_their_own_lr(tiny_bert_dir):
    from scan.model import build_model

    cfg = load_experiment(None, ["model.text_encoder=hf", f"model.hf_path={tiny_bert_dir}",
                                 "model.hf_freeze=true", "model.hf_finetune_layers=1", "model.img_dim=8",
                                 "model.embed_size=8", "optim.lr=1e-3", "optim.text_lr_scale=0.1"])
    groups = param_groups(cfg, build_model(cfg.model, vocab_size=50))
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    assert sum(p.numel() for p in groups[1]["params"]) > 0


@pytest.mark.parametrize("override, message", [
    ("model.region_dropout=1.0", "model.region_dropout"),
    ("model.word_dropout=-0.1", "model.word_dropout"),
    ("optim.text_lr_scale=0", "optim.text_lr_scale"),
    ("model.hf_finetune_layers=1", "needs model.text_encoder 'hf'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, [override])
