"""The family's scorers (scan.scorers) against slow float64 per-pair implementations, and the pooling
of ``model.kind: vse`` (scan.pooling)."""
from __future__ import annotations

import pytest
import torch

from scan.builders import scorer_for
from scan.config import load_experiment
from scan.loss import batch_loss
from scan.model import build_model
from scan.pooling import GPO, MeanPool
from scan.scorers import DVSAScorer, GlobalScorer, build_scorer
from scan.xattn import XAttnConfig


def _inputs(seed: int, N: int = 5, M: int = 7, k: int = 6, n: int = 9, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, k, d, generator=g, dtype=torch.float64)
    captions = torch.randn(M, n, d, generator=g, dtype=torch.float64)
    img_lens = torch.randint(1, k + 1, (N,), generator=g)
    cap_lens = torch.randint(1, n + 1, (M,), generator=g)
    img_lens[0], cap_lens[0] = k, n  # one full row each
    return images, img_lens, captions, cap_lens


def _dvsa_pair(regions: torch.Tensor, words: torch.Tensor) -> float:
    """Karpathy & Fei-Fei eq. 8, one word at a time: each word's best region product, summed."""
    total = 0.0
    for s_t in words:
        total += max(float(v_r @ s_t) for v_r in regions)
    return total


def test_dvsa_scores_below_zero_still_rank_and_train():
    """With every region-word product negative the scores stay distinct and the gradient flows
    (the rectified score of eq. 7 was 0 for every pair there: a dead model, all pairs tied)."""
    g = torch.Generator().manual_seed(1)
    images = -torch.rand(3, 4, 6, generator=g, dtype=torch.float64) - 0.1
    captions = torch.rand(5, 3, 6, generator=g, dtype=torch.float64).requires_grad_()
    lens = torch.tensor([3, 2, 3, 1, 3])
    scores = DVSAScorer()(images, captions, lens, torch.tensor([4, 2, 3]))
    assert (scores < 0).all() and scores.unique().numel() == 15
    scores.sum().backward()
    assert captions.grad.abs().sum() > 0


def test_dvsa_equals_the_per_pair_definition():
    images, img_lens, captions, cap_lens = _inputs(0)
    # Garbage in the padding must not matter.
    scores = DVSAScorer()(images, captions, cap_lens, img_lens)
    assert scores.dtype == torch.float64 and scores.shape == (5, 7)
    for i in range(5):
        for j in range(7):
            ref = _dvsa_pair(images[i, :img_lens[i]], captions[j, :cap_lens[j]])
            assert float(scores[i, j]) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_dvsa_tiles_and_checkpoint_change_nothing():
    images, img_lens, captions, cap_lens = _inputs(1, N=6, M=11)
    whole = DVSAScorer()(images, captions, cap_lens, img_lens)
    tiny = DVSAScorer()(images, captions, cap_lens, img_lens, memory_budget_mb=1e-4)  # 1 caption a tile
    torch.testing.assert_close(whole, tiny, rtol=1e-12, atol=1e-12)  # BLAS blocking may differ
    a = images.clone().requires_grad_(True)
    b = captions.clone().requires_grad_(True)
    DVSAScorer()(a, b, cap_lens, img_lens, checkpoint=True, memory_budget_mb=1e-3).sum().backward()
    a2 = images.clone().requires_grad_(True)
    b2 = captions.clone().requires_grad_(True)
    DVSAScorer()(a2, b2, cap_lens, img_lens).sum().backward()
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)


def test_dvsa_gradcheck():
    images, img_lens, captions, cap_lens = _inputs(2, N=3, M=4, k=4, n=5, d=3)
    torch.autograd.gradcheck(lambda a, b: DVSAScorer()(a, b, cap_lens, img_lens),
                             (images.requires_grad_(True), captions.requires_grad_(True)))


def test_dvsa_attention_marks_each_words_aligned_region():
    images, img_lens, captions, cap_lens = _inputs(3)
    pairs = torch.tensor([[1, 2], [4, 0]])
    attn = DVSAScorer().attention(images, captions, cap_lens, img_lens, pairs)  # (P, n, k)
    for p, (i, j) in enumerate(pairs.tolist()):
        for t in range(int(cap_lens[j])):
            dots = captions[j, t] @ images[i, :img_lens[i]].t()
            expect = torch.zeros(images.shape[1], dtype=attn.dtype)
            if float(dots.max()) > 0:
                expect[int(dots.argmax())] = 1
            assert torch.equal(attn[p, t], expect)
        assert float(attn[p, int(cap_lens[j]):].abs().sum()) == 0


def test_global_is_the_cosine_of_pooled_vectors():
    g = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(5, 1, 8, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(7, 1, 8, generator=g, dtype=torch.float64), dim=-1)
    scores = GlobalScorer()(img, cap, torch.ones(7, dtype=torch.long), torch.ones(5, dtype=torch.long))
    for i in range(5):
        for j in range(7):
            ref = float(img[i, 0] @ cap[j, 0]) / (float(img[i, 0].norm()) * float(cap[j, 0].norm()))
            assert float(scores[i, j]) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="pooled"):
        GlobalScorer()(torch.randn(2, 3, 8), cap.float(), torch.ones(7, dtype=torch.long))
    with pytest.raises(ValueError, match="no per-word attention"):
        GlobalScorer().attention(img, cap, None, None, torch.zeros(1, 2, dtype=torch.long))


def test_mean_pool_and_gpo_ignore_padding():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 3, generator=g)
    lens = torch.tensor([6, 2, 4, 1])
    mean = MeanPool()(x, lens)
    gpo = GPO()
    pooled = gpo(x, lens)
    junk = x.clone()
    for b, n in enumerate(lens.tolist()):
        assert torch.allclose(mean[b], x[b, :n].mean(0))
        junk[b, n:] = 1e6
    assert torch.allclose(gpo(junk, lens), pooled)
    w = gpo.weights(lens, 6)[..., 0].detach()  # (B, 6)
    assert torch.allclose(w.sum(1), torch.ones(4)) and float(w[1, 2:].abs().sum()) == 0
    # Each dimension: a weighted sum of its sorted values, so between the min and the max.
    for b, n in enumerate(lens.tolist()):
        assert bool((pooled[b] <= x[b, :n].max(0).values + 1e-6).all())
        assert bool((pooled[b] >= x[b, :n].min(0).values - 1e-6).all())


@pytest.mark.parametrize("kind, pooling", [("vse", "mean"), ("vse", "gpo"), ("dvsa", "mean")])
def test_models_of_each_kind_train_through_the_common_loss(kind, pooling):
    cfg = load_experiment(None, [f"model.kind={kind}", f"model.pooling={pooling}", "model.img_dim=10",
                                 "model.embed_size=8", "model.word_dim=6"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=30)
    regions, img_lens = torch.randn(4, 5, 10), torch.tensor([5, 3, 5, 2])
    tokens, cap_lens = torch.randint(1, 30, (4, 7)), torch.tensor([7, 4, 2, 5])
    img, cap = model(regions, img_lens, tokens, cap_lens)
    if kind == "vse":
        assert img.shape == (4, 1, 8) and cap.shape == (4, 1, 8)
        assert torch.allclose(img.norm(dim=-1), torch.ones(4, 1))
    else:
        assert img.shape == (4, 5, 8) and cap.shape == (4, 7, 8)
    loss, _ = batch_loss(img, model.output_lens(img_lens), cap, model.output_lens(cap_lens),
                         torch.arange(4), cfg.loss, scorer_for(cfg))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_kind_names_the_key():
    with pytest.raises(ValueError, match="model.kind"):
        build_scorer("clip", XAttnConfig())


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_global_weight_adds_the_mean_pooled_cosine(direction):
    """xattn.global_weight w: S = S_xattn + w · cos(mean valid region, mean valid word), checked
    against a float64 per-pair loop, with junk in the padding; w = 0 is SCAN alone."""
    images, img_lens, captions, cap_lens = _inputs(3)
    images[1, img_lens[1]:] = 1e3  # padding must not reach the means
    captions[2, cap_lens[2]:] = -1e3
    base = build_scorer("scan", XAttnConfig(direction=direction))(images, captions, cap_lens, img_lens)
    mixed = build_scorer("scan", XAttnConfig(direction=direction, global_weight=0.7))(
        images, captions, cap_lens, img_lens)
    expected = torch.empty_like(base)
    for i in range(images.shape[0]):
        for j in range(captions.shape[0]):
            v = images[i, : img_lens[i]].mean(0)
            s = captions[j, : cap_lens[j]].mean(0)
            expected[i, j] = base[i, j] + 0.7 * torch.dot(v, s) / (v.norm() * s.norm())
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)
    assert "global" in build_scorer("scan", XAttnConfig(global_weight=0.7)).label


def test_global_weight_gradients_and_bad_values():
    images, img_lens, captions, cap_lens = _inputs(4, N=3, M=4, k=4, n=5, d=6)
    scorer = build_scorer("scan", XAttnConfig(global_weight=1.0))
    images.requires_grad_(True)
    captions.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: scorer(a, b, cap_lens, img_lens), (images, captions))
    for bad in (-0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="global_weight"):
            XAttnConfig(global_weight=bad).validate()
