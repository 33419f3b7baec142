"""xattn_scores against the per-pair reference: all 56 variants, gradients, tiling, dtypes, bad input."""
from __future__ import annotations

import itertools
import math
from typing import get_args

import pytest
import torch

from reference_scan import reference_attention, reference_scores
import scan.xattn_tile as xattn_module  # one tile's passes, the fused one's compile state
from scan.xattn import Aggregation, Direction, RawFeatureNorm, XAttnConfig, xattn_scores

NORMS = get_args(RawFeatureNorm)
AGGS = get_args(Aggregation)
DIRECTIONS = get_args(Direction)


def make_inputs(n_img=3, n_cap=4, k=5, n=6, d=8, dtype=torch.float64, seed=0):
    """Unnormalised features with padded captions and padded regions (lengths include 1 and full)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, k, d, generator=g, dtype=dtype)
    captions = torch.randn(n_cap, n, d, generator=g, dtype=dtype)
    cap_lens = torch.tensor([n, 2, 4, 1, 3, 5][:n_cap])
    img_lens = torch.tensor([k, 3, 1, 4, 2][:n_img])
    # Garbage in the padding must not matter.
    for j, length in enumerate(cap_lens):
        captions[j, length:] = 1e3
    for i, length in enumerate(img_lens):
        images[i, length:] = -1e3
    return images, captions, cap_lens, img_lens


@pytest.mark.parametrize("direction,agg,norm", list(itertools.product(DIRECTIONS, AGGS, NORMS)))
def test_matches_reference_float64(direction, agg, norm):
    images, captions, cap_lens, img_lens = make_inputs()
    cfg = XAttnConfig(direction=direction, agg=agg, lambda_softmax=4.0, lambda_lse=6.0,
                      raw_feature_norm=norm)
    got = xattn_scores(images, captions, cap_lens, cfg, img_lens, validate=True)
    want = reference_scores(images, captions, cap_lens, cfg, img_lens)
    assert got.dtype == torch.float64 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["clipped_l2norm", "no_norm", "softmax"])
def test_large_lambda_and_unpadded_inputs_match_reference(norm):
    """λ1 beyond the static-shift bound (max subtraction path) and img_lens=None."""
    images, captions, cap_lens, _ = make_inputs(seed=1)
    cfg = XAttnConfig(direction="i2t", agg="lse", lambda_softmax=50.0, lambda_lse=20.0,
                      raw_feature_norm=norm)
    got = xattn_scores(images, captions, cap_lens, cfg)
    want = reference_scores(images, captions, cap_lens, cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tiled_equals_untiled(direction):
    images, captions, cap_lens, img_lens = make_inputs(n_img=5, n_cap=6, seed=2)
    cfg = XAttnConfig(direction=direction, agg="lse", raw_feature_norm="clipped_l2norm")
    whole = xattn_scores(images, captions, cap_lens, cfg, img_lens)
    tiny = xattn_scores(images, captions, cap_lens, cfg, img_lens, memory_budget_mb=1e-6)
    torch.testing.assert_close(tiny, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole, reference_scores(images, captions, cap_lens, cfg, img_lens),
                               rtol=0, atol=1e-9)


def ragged_inputs(device: str = "cpu"):
    """9 images of 1..9 regions and 70 captions of shuffled lengths 1..12 (three query groups and a
    part on a CPU), float64, garbage in all padding."""
    g = torch.Generator().manual_seed(11)
    images = torch.randn(9, 9, 8, generator=g, dtype=torch.float64)
    captions = torch.randn(70, 12, 8, generator=g, dtype=torch.float64)
    cap_lens = torch.randint(1, 13, (70,), generator=g)
    cap_lens[[5, 40]] = torch.tensor([12, 1])
    img_lens = torch.tensor([9, 3, 1, 7, 2, 9, 5, 4, 8])
    for j, n in enumerate(cap_lens.tolist()):
        captions[j, n:] = 1e3
    for i, k in enumerate(img_lens.tolist()):
        images[i, k:] = -1e3
    return images.to(device), captions.to(device), cap_lens.to(device), img_lens.to(device)


LENGTH_SORTED_VARIANTS = [("t2i", "clipped_l2norm"), ("i2t", "clipped_l2norm"), ("t2i", "softmax"),
                          ("i2t", "no_norm")]


@pytest.mark.parametrize("direction,norm", LENGTH_SORTED_VARIANTS)
@pytest.mark.parametrize("budget_mb", [1024, 1e-3], ids=["one-tile-rows", "tiny-tiles"])
def test_length_sorted_inference_matches_reference(direction, norm, budget_mb):
    """Inference sorts the padded owners by length and cuts each tile to its longest owner: the
    scores of ragged inputs against the per-pair reference, rows and columns in input order."""
    images, captions, cap_lens, img_lens = ragged_inputs()
    cfg = XAttnConfig(direction=direction, agg="mean", lambda_softmax=4.0, raw_feature_norm=norm)
    got = xattn_scores(images, captions, cap_lens, cfg, img_lens, memory_budget_mb=budget_mb)
    want = reference_scores(images, captions, cap_lens, cfg, img_lens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction,norm", LENGTH_SORTED_VARIANTS[:2])
def test_length_sorted_fused_inference_matches_reference(direction, norm):
    """The fused (compiled) tile through the length-sorted path: every tile has its own widths,
    which the dynamic-shape graph takes, compiled (no fall back to eager)."""
    images, captions, cap_lens, img_lens = ragged_inputs()
    cfg = XAttnConfig(direction=direction, agg="mean", lambda_softmax=4.0, raw_feature_norm=norm,
                      fused=True)
    got = xattn_scores(images, captions, cap_lens, cfg, img_lens, memory_budget_mb=1e-3)
    want = reference_scores(images, captions, cap_lens, cfg, img_lens)
    assert xattn_module._COMPILE_STATE["ok"], "the fused path fell back to eager"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA tile shapes need a GPU")
@pytest.mark.parametrize("direction,norm,fused",
                         [(d, n, False) for d, n in LENGTH_SORTED_VARIANTS]
                         + [(d, n, True) for d, n in LENGTH_SORTED_VARIANTS[:2]])
def test_cuda_length_sorted_inference_matches_reference(direction, norm, fused):
    """The length-sorted path on CUDA, where query owners are not grouped by 32 and tiles are
    sized for the GPU (eager, and fused through Triton), float64 against the CPU reference. The
    fused case keeps to one first normalisation: each is its own Triton graph to compile, inside
    gpu_check.sh's budget."""
    images, captions, cap_lens, img_lens = ragged_inputs("cuda")
    cfg = XAttnConfig(direction=direction, agg="mean", lambda_softmax=4.0, raw_feature_norm=norm,
                      fused=fused)
    want = reference_scores(images.cpu(), captions.cpu(), cap_lens.cpu(), cfg, img_lens.cpu())
    for budget_mb in (1024, 1e-3):
        got = xattn_scores(images, captions, cap_lens, cfg, img_lens, memory_budget_mb=budget_mb)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-9)
    assert not fused or xattn_module._COMPILE_STATE["ok"], "the fused path fell back to eager"


GRAD_VARIANTS = [
    ("t2i", "mean", "clipped_l2norm", False),
    ("i2t", "lse", "clipped_l2norm", False),
    ("t2i", "max", "softmax", False),
    ("i2t", "sum", "l1norm", False),
    ("t2i", "lse", "no_norm", False),
    ("i2t", "mean", "clipped_l2norm", False),
]
# checkpoint=True recomputes tiles with reentrant checkpointing, which supports .backward() but not
# torch.autograd.grad (what gradcheck calls): its gradients are checked against the plain ones below.


@pytest.mark.parametrize("direction,agg,norm,use_checkpoint", GRAD_VARIANTS)
def test_gradcheck(direction, agg, norm, use_checkpoint):
    images, captions, cap_lens, img_lens = make_inputs(n_img=2, n_cap=3, k=4, n=5, d=4, seed=3)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    cfg = XAttnConfig(direction=direction, agg=agg, lambda_softmax=4.0, lambda_lse=5.0,
                      raw_feature_norm=norm)

    def fn(im, cap):
        return xattn_scores(im, cap, cap_lens, cfg, img_lens, checkpoint=use_checkpoint,
                            memory_budget_mb=1e-6 if use_checkpoint else 1024)

    assert torch.autograd.gradcheck(fn, (images, captions), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("direction,agg,norm", [("t2i", "mean", "clipped_l2norm"),
                                                ("i2t", "mean", "clipped_l2norm"),
                                                ("t2i", "lse", "no_norm"), ("i2t", "max", "softmax")])
def test_checkpoint_gradients_equal_plain(direction, agg, norm):
    images, captions, cap_lens, img_lens = make_inputs(n_img=4, n_cap=5, seed=4)
    cfg = XAttnConfig(direction=direction, agg=agg, raw_feature_norm=norm)
    grads = []
    for use_checkpoint in (False, True):
        im = images.clone().requires_grad_(True)
        cap = captions.clone().requires_grad_(True)
        xattn_scores(im, cap, cap_lens, cfg, img_lens, checkpoint=use_checkpoint,
                     memory_budget_mb=1e-6).square().sum().backward()
        grads.append((im.grad, cap.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    # Padded words and regions take no part: their gradient is exactly zero.
    for j, length in enumerate(cap_lens):
        assert bool((grads[0][1][j, length:] == 0).all())
    for i, length in enumerate(img_lens):
        assert bool((grads[0][0][i, length:] == 0).all())


def test_zero_vectors_give_finite_gradients():
    """Exactly-zero regions and words (seen in real grid features) must not produce NaN."""
    images, captions, cap_lens, img_lens = make_inputs(seed=5, dtype=torch.float32)
    images[0, 1] = 0
    images[1, :] = 0  # a whole image of zero regions
    captions[0, 0] = 0
    for direction in DIRECTIONS:
        im = images.clone().requires_grad_(True)
        cap = captions.clone().requires_grad_(True)
        scores = xattn_scores(im, cap, cap_lens, XAttnConfig(direction=direction), img_lens)
        scores.sum().backward()
        assert torch.isfinite(scores).all()
        assert torch.isfinite(im.grad).all() and torch.isfinite(cap.grad).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_bf16_inputs_close_to_fp32(direction):
    images, captions, cap_lens, img_lens = make_inputs(n_img=4, n_cap=5, k=10, n=8, d=64,
                                                       dtype=torch.float32, seed=6)
    images = torch.nn.functional.normalize(images, dim=-1)
    captions = torch.nn.functional.normalize(captions, dim=-1)
    cfg = XAttnConfig(direction=direction, agg="lse", lambda_lse=6.0)
    fp32 = xattn_scores(images, captions, cap_lens, cfg, img_lens)
    bf16 = xattn_scores(images.bfloat16(), captions.bfloat16(), cap_lens, cfg, img_lens)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.03)


def _half_matmul_runs(dtype: torch.dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        torch.bmm(torch.ones(1, 2, 2, dtype=dtype), torch.ones(1, 2, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lambda_lse_20_half_inputs_finite(dtype, direction):
    if not _half_matmul_runs(dtype):
        pytest.skip(f"{dtype} matrix products are not supported on this CPU build")
    images, captions, cap_lens, img_lens = make_inputs(n_img=4, n_cap=5, k=10, n=8, d=32,
                                                       dtype=torch.float32, seed=7)
    # Large, identical features: λ2·R near 20 per word, exp(20·R) overflows fp16 (max 65504).
    captions[:, :, :] = images[0, 0]
    cfg = XAttnConfig(direction=direction, agg="lse", lambda_softmax=20.0, lambda_lse=20.0,
                      raw_feature_norm="no_norm")
    im = (images * 30).to(dtype).requires_grad_(True)
    cap = (captions * 30).to(dtype).requires_grad_(True)
    scores = xattn_scores(im, cap, cap_lens, cfg, img_lens)
    scores.sum().backward()
    assert torch.isfinite(scores).all()
    assert torch.isfinite(im.grad.float()).all() and torch.isfinite(cap.grad.float()).all()
    want = reference_scores(im.detach().double(), cap.detach().double(), cap_lens, cfg, img_lens)
    torch.testing.assert_close(scores.double(), want, rtol=0, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA fp16/bf16 path needs a GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_matches_reference(dtype, fused):
    images, captions, cap_lens, img_lens = make_inputs(n_img=4, n_cap=5, k=10, n=8, d=64,
                                                       dtype=torch.float32, seed=8)
    cfg = XAttnConfig(direction="t2i", agg="lse", lambda_lse=20.0, fused=fused)  # fused: Triton
    got = xattn_scores(images.cuda().to(dtype), captions.cuda().to(dtype), cap_lens.cuda(), cfg,
                       img_lens.cuda())
    want = reference_scores(images.to(dtype).double(), captions.to(dtype).double(), cap_lens, cfg,
                            img_lens)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=0.05)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("norm", ["clipped_l2norm", "softmax"])
def test_attention_pairs_equal_reference(direction, norm):
    images, captions, cap_lens, img_lens = make_inputs(seed=9)
    cfg = XAttnConfig(direction=direction, raw_feature_norm=norm, lambda_softmax=9.0)
    pairs = torch.tensor([[0, 0], [1, 1], [2, 3], [0, 2], [1, 0]])
    scores, attn = xattn_scores(images, captions, cap_lens, cfg, img_lens, attention_pairs=pairs)
    torch.testing.assert_close(scores, xattn_scores(images, captions, cap_lens, cfg, img_lens))
    n_query, n_context = (6, 5) if direction == "t2i" else (5, 6)
    assert attn.shape == (len(pairs), n_query, n_context)
    for p, (i, j) in enumerate(pairs.tolist()):
        k_i, n_j = int(img_lens[i]), int(cap_lens[j])
        want = reference_attention(images[i, :k_i], captions[j, :n_j], cfg)
        q_len, c_len = (n_j, k_i) if direction == "t2i" else (k_i, n_j)
        torch.testing.assert_close(attn[p, :q_len, :c_len], want, rtol=0, atol=1e-12)
        assert bool((attn[p, q_len:] == 0).all()) and bool((attn[p, :, c_len:] == 0).all())


def test_no_grad_path_equals_autograd_path():
    """The in-place inference path and the autograd path compute the same numbers."""
    images, captions, cap_lens, img_lens = make_inputs(seed=10)
    for direction, norm in itertools.product(DIRECTIONS, NORMS):
        cfg = XAttnConfig(direction=direction, raw_feature_norm=norm)
        with torch.no_grad():
            fast = xattn_scores(images, captions, cap_lens, cfg, img_lens)
        slow = xattn_scores(images.clone().requires_grad_(True), captions, cap_lens, cfg, img_lens)
        torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-12)


def _bad_inputs():
    images, captions, cap_lens, img_lens = make_inputs()
    nan_images = images.clone()
    nan_images[0, 0, 0] = math.nan
    inf_caps = captions.clone()
    inf_caps[1, 0, 0] = math.inf
    return [
        ("feature size d differs", (images, captions[..., :4], cap_lens, img_lens)),
        ("cap_lens\\[3\\]=0", (images, captions, torch.tensor([6, 2, 4, 0]), img_lens)),
        ("cap_lens\\[1\\]=7 is outside", (images, captions, torch.tensor([6, 7, 4, 1]), img_lens)),
        ("img_lens\\[2\\]=6 is outside", (images, captions, cap_lens, torch.tensor([5, 3, 6]))),
        ("img_lens\\[0\\]=0", (images, captions, cap_lens, torch.tensor([0, 3, 1]))),
        ("images contains NaN", (nan_images, captions, cap_lens, img_lens)),
        ("captions contains NaN or inf", (images, inf_caps, cap_lens, img_lens)),
        ("images must be a 3-d tensor", (images[0], captions, cap_lens, img_lens)),
        ("must be floating point", (images.long(), captions.long(), cap_lens, img_lens)),
        ("dtype", (images.float(), captions, cap_lens, img_lens)),
        ("cap_lens must be a 1-d integer", (images, captions, cap_lens.double(), img_lens)),
        ("cap_lens has 3 entries for 4 rows", (images, captions, cap_lens[:3], img_lens)),
    ]


@pytest.mark.parametrize("message,args", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise(message, args):
    images, captions, cap_lens, img_lens = args
    with pytest.raises(ValueError, match=message):
        xattn_scores(images, captions, cap_lens, XAttnConfig(), img_lens, validate=True)


def test_bad_attention_pairs_raise():
    images, captions, cap_lens, img_lens = make_inputs()
    with pytest.raises(ValueError, match="attention_pairs index out of range"):
        xattn_scores(images, captions, cap_lens, XAttnConfig(), img_lens,
                     attention_pairs=torch.tensor([[3, 0]]), validate=True)


@pytest.mark.parametrize("field,value,message", [
    ("direction", "both", "XAttnConfig.direction='both' is not allowed; choose one of \\['t2i', 'i2t'\\]"),
    ("agg", "median", "XAttnConfig.agg='median'.*'mean', 'lse', 'max', 'sum'"),
    ("raw_feature_norm", "l3norm", "XAttnConfig.raw_feature_norm='l3norm'.*'clipped_l2norm'"),
    ("lambda_softmax", 0.0, "XAttnConfig.lambda_softmax=0.0 is not allowed; it must be a finite"),
    ("lambda_lse", math.inf, "XAttnConfig.lambda_lse=inf"),
    ("fused", "yes", "XAttnConfig.fused='yes' is not allowed; it must be true or false"),
])
def test_config_validate(field, value, message):
    cfg = XAttnConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    images, captions, cap_lens, _ = make_inputs()
    with pytest.raises(ValueError, match=message):
        xattn_scores(images, captions, cap_lens, cfg)


# The fused path (xattn.fused: each tile's passes compiled by torch.compile / inductor) is held to
# the same oracle: all 56 variants, gradients, checkpointing, and one graph across shapes.
@pytest.mark.parametrize("direction,agg,norm", list(itertools.product(DIRECTIONS, AGGS, NORMS)))
def test_fused_matches_reference_float64(direction, agg, norm):
    images, captions, cap_lens, img_lens = make_inputs()
    cfg = XAttnConfig(direction=direction, agg=agg, lambda_softmax=4.0, lambda_lse=6.0,
                      raw_feature_norm=norm, fused=True)
    got = xattn_scores(images, captions, cap_lens, cfg, img_lens, validate=True)
    want = reference_scores(images, captions, cap_lens, cfg, img_lens)
    assert xattn_module._COMPILE_STATE["ok"], "the fused path fell back to eager"
    assert got.dtype == torch.float64 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction,agg,norm", [("t2i", "mean", "clipped_l2norm"),
                                                ("i2t", "lse", "softmax")])
def test_fused_gradcheck(direction, agg, norm):
    # gradcheck runs backward several times over one graph (retain_graph); training never does,
    # and inductor's backward may then write into the forward's saved buffers (donated buffers,
    # in-place reuse). Both are turned off for this test's graphs only.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    images, captions, cap_lens, img_lens = make_inputs(n_img=2, n_cap=3, k=4, n=5, d=4, seed=3)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    cfg = XAttnConfig(direction=direction, agg=agg, lambda_softmax=4.0, lambda_lse=5.0,
                      raw_feature_norm=norm, fused=True)
    with functorch_config.patch(donated_buffer=False), inductor_config.patch(inplace_buffers=False):
        assert torch.autograd.gradcheck(lambda im, cap: xattn_scores(im, cap, cap_lens, cfg, img_lens),
                                        (images, captions), eps=1e-6, atol=1e-6)
    assert xattn_module._COMPILE_STATE["ok"]


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_fused_fp32_training_equals_eager(use_checkpoint):
    """The training path in fp32 (what the loss runs): scores and gradients of the fused tiles equal
    the eager ones up to fp32 rounding, checkpointed (reentrant recompute) or not."""
    images, captions, cap_lens, img_lens = make_inputs(n_img=5, n_cap=6, k=9, n=8, d=16, seed=6,
                                                       dtype=torch.float32)
    out = []
    for fused in (False, True):
        im = images.clone().requires_grad_(True)
        cap = captions.clone().requires_grad_(True)
        cfg = XAttnConfig(direction="t2i", fused=fused)
        scores = xattn_scores(im, cap, cap_lens, cfg, img_lens, checkpoint=use_checkpoint,
                              memory_budget_mb=1e-3)
        scores.square().sum().backward()
        out.append((scores.detach(), im.grad, cap.grad))
    for eager, fused in zip(*out):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_fused_compiles_once_across_shapes_and_lambdas():
    """New batch shapes, caption lengths, tile sizes and λ1 reuse the compiled graphs, forward
    and backward."""
    from torch._dynamo.utils import counters

    def both_passes(images, captions, cap_lens, cfg):
        """Scores without grad, and with grad plus the backward (the training graph)."""
        with torch.no_grad():
            scores = xattn_scores(images, captions, cap_lens, cfg)
        im, cap = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
        xattn_scores(im, cap, cap_lens, cfg).sum().backward()
        return scores, im.grad, cap.grad

    both_passes(*make_inputs(n_img=3, n_cap=4, k=5, n=6, dtype=torch.float32)[:3],
                XAttnConfig(direction="t2i", fused=True))  # warm: both graphs compile here
    before = counters["stats"]["unique_graphs"]
    for n_img, n_cap, k, n, lam in ((5, 2, 7, 3, 9.0), (2, 5, 3, 5, 4.0), (4, 3, 6, 4, 15.0)):
        images, captions, cap_lens, _ = make_inputs(n_img=n_img, n_cap=n_cap, k=k, n=n,
                                                    dtype=torch.float32, seed=n_img)
        got = both_passes(images, captions, cap_lens, XAttnConfig(lambda_softmax=lam, fused=True))
        want = both_passes(images, captions, cap_lens, XAttnConfig(lambda_softmax=lam))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == before


def test_fused_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(xattn_module._COMPILE_STATE, "fn", broken)
    monkeypatch.setitem(xattn_module._COMPILE_STATE, "ok", True)
    images, captions, cap_lens, img_lens = make_inputs()
    cfg = XAttnConfig(fused=True)
    with caplog.at_level("WARNING", logger="scan.xattn"):
        got = xattn_scores(images, captions, cap_lens, cfg, img_lens)
    assert "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text
    assert not xattn_module._COMPILE_STATE["ok"]
    torch.testing.assert_close(got, reference_scores(images, captions, cap_lens, cfg, img_lens),
                               rtol=0, atol=1e-9)
