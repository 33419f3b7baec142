"""Retrieval: exact answers on a constructed gallery, the real encode path, and the HTML page."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataio.sources.synthetic import synthetic_samples
from dataio.text import build_vocab
from scan.config import ModelConfig
from scan.eval.encode import Embeddings
from scan.model import SCANModel
from tools.retrieve import (Gallery, ImageQuery, TextQuery, build_gallery, format_results, retrieve,
                              write_html)
from scan.eval.tiles import Member, score_tile
from scan.xattn import XAttnConfig

N, CPI, D = 5, 2, 8


def _onehot(i: int) -> torch.Tensor:
    return torch.eye(D)[i]


def _caption(c: int) -> str:
    return f"caption {c % CPI} of picture {c // CPI}"


def _encode_text(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    # "... picture 3": three words, all the one-hot of image 3, plus one padded position.
    i = int(re.search(r"picture (\d+)", text).group(1))
    words = torch.zeros(1, 4, D)
    words[0, :3] = _onehot(i)
    return words, torch.tensor([3])


@pytest.fixture
def gallery() -> Gallery:
    """Image i: regions all equal to e_i (one padded region); caption c: words e_{c // CPI}.
    Every own pair scores 1 and every other pair 0 (orthogonal features), so answers are known."""
    images = torch.zeros(N, 3, D)
    captions = torch.zeros(N * CPI, 4, D)
    for i in range(N):
        images[i, :2] = _onehot(i)
        images[i, 2] = torch.randn(D)  # beyond img_lens: must be ignored
    for c in range(N * CPI):
        captions[c, : 2 + c % 2] = _onehot(c // CPI)
    emb = Embeddings(images, torch.full((N,), 2), captions, torch.tensor([2, 3] * N),
                     [f"img{i}" for i in range(N)], CPI)
    member = Member(emb, XAttnConfig(direction="t2i", agg="mean"))
    sims = score_tile([member], slice(None), slice(None))
    return Gallery([member], [_caption(c) for c in range(N * CPI)], sims, {}, [_encode_text])


def test_image_query_finds_its_own_captions(gallery):
    res = retrieve(gallery, ImageQuery("img3"), k=3)
    assert res.direction == "i2t" and res.first_relevant == 1
    assert [h.index for h in res.hits[:2]] == [6, 7]  # image 3's two captions, stable order
    assert all(h.relevant for h in res.hits[:2]) and not res.hits[2].relevant
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert res.hits[2].score == pytest.approx(0.0, abs=1e-5)
    assert res.hits[0].text == "caption 0 of picture 3" and res.hits[0].image_key == "img3"


def test_text_query_finds_its_image(gallery):
    res = retrieve(gallery, TextQuery("Caption 1 of picture 4!"), k=2)  # tokenised: same caption
    assert res.direction == "t2i" and res.first_relevant == 1
    assert [h.image_key for h in res.hits] == ["img4", "img0"]  # the rest tie at 0: lowest index
    assert res.hits[0].relevant and not res.hits[1].relevant
    # A text that is no gallery caption still retrieves; it simply has no ground truth.
    other = retrieve(gallery, TextQuery("a new picture 2"), k=1)
    assert other.hits[0].image_key == "img2" and other.first_relevant is None
    text = format_results([res, other])
    assert "1*" in text and "ground truth at rank 1" in text and "no ground truth" in text


def test_first_relevant_counts_the_whole_gallery(gallery):
    sims = gallery.sims.clone()
    sims[1, :] = torch.arange(N * CPI, dtype=torch.float32)  # image 1's own captions (2, 3) score low
    g = Gallery(gallery.members, gallery.captions, sims)
    res = retrieve(g, ImageQuery("img1"), k=2)
    assert [h.index for h in res.hits] == [9, 8] and not any(h.relevant for h in res.hits)
    assert res.first_relevant == N * CPI - 3  # 6 captions score above caption 3
    with pytest.raises(ValueError, match="no query encoders"):
        retrieve(g, TextQuery("picture 1"))
    with pytest.raises(KeyError, match="'img9' is not in the gallery"):
        retrieve(g, ImageQuery("img9"))
    with pytest.raises(ValueError, match="sims has shape"):
        Gallery(gallery.members, gallery.captions, sims[:, :3])


def test_build_gallery_with_a_model_matches_the_sims():
    torch.manual_seed(0)
    records = list(synthetic_samples(6, dim=16, split="val"))
    records[1].meta["file"] = "/photos/one.jpg"  # as the extraction job records its source image
    vocab = build_vocab([t for r in records for t in r.tokens], threshold=1)
    model = SCANModel(ModelConfig(img_dim=16, embed_size=12, word_dim=8), len(vocab))
    cfg = XAttnConfig(direction="i2t", agg="lse", lambda_softmax=4.0, lambda_lse=5.0)
    g = build_gallery([(model, cfg)], records, encode_text=vocab.encode, caps_per_image=5,
                      precision="fp32", batch_size=4)
    assert g.sims.shape == (6, 30) and len(g.captions) == 30 and g.image_keys[0] == "syn-val-000000"
    assert g.image_files == {"syn-val-000001": "/photos/one.jpg"}
    # A free-text query equal to a gallery caption scores exactly like that caption's column.
    res = retrieve(g, TextQuery(records[2].captions[1]), k=6)
    by_image = {h.index: h.score for h in res.hits}
    np.testing.assert_allclose([by_image[i] for i in range(6)], g.sims[:, 11].numpy(), atol=1e-5)
    assert [h.image_key for h in res.hits if h.relevant] == ["syn-val-000002"]
    # An ensemble of the same model twice averages to the same matrix.
    g2 = build_gallery([(model, cfg), (model, cfg)], records, encode_text=vocab.encode,
                       caps_per_image=5, precision="fp32", batch_size=4)
    torch.testing.assert_close(g2.sims, g.sims)


def test_html_escapes_text_and_references_thumbnails(gallery, tmp_path):
    evil = '<script>alert("x")</script> & "quoted"'
    gallery.captions[6] = evil
    photos = tmp_path / "photos"
    photos.mkdir()
    paths = {}
    for i in range(N - 1):  # img4 has no picture (precomputed features)
        paths[f"img{i}"] = photos / f"p {i}.png"  # a space: the link must be URL-quoted
        Image.new("RGB", (400, 300), (40 * i, 100, 200)).save(paths[f"img{i}"])
    results = [retrieve(gallery, ImageQuery("img3"), k=3),
               retrieve(gallery, TextQuery("picture 4 <b>bold</b>"), k=4)]
    page = write_html(results, tmp_path / "out" / "retrieval.html", paths)
    text = page.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text
    assert "picture 4 &lt;b&gt;bold&lt;/b&gt;" in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all(s.startswith("retrieval_files/") for s in srcs)
    for src in srcs:  # relative to the page, and real thumbnails
        with Image.open(page.parent / src) as thumb:
            assert max(thumb.size) <= 160
    assert '<div class="missing">img4</div>' in text  # no picture: a labelled box
    assert sorted(p.name for p in page.parent.iterdir()) == ["retrieval.html", "retrieval_files"]
    # Thumbnails are named by their source: a second page reuses them.
    before = sorted(Path(page.parent / "retrieval_files").iterdir())
    write_html(results, page, paths)
    assert sorted(Path(page.parent / "retrieval_files").iterdir()) == before


@pytest.mark.parametrize("kind", ["vse", "dvsa"])
def test_gallery_of_the_compared_models(kind):
    """VSE++ and DVSA retrieve through the same gallery: a free-text query scores like its column."""
    from scan.scorers import build_scorer

    torch.manual_seed(1)
    records = list(synthetic_samples(6, dim=16, split="val"))
    vocab = build_vocab([t for r in records for t in r.tokens], threshold=1)
    model = SCANModel(ModelConfig(kind=kind, img_dim=16, embed_size=12, word_dim=8), len(vocab))
    g = build_gallery([(model, build_scorer(kind, XAttnConfig()))], records, encode_text=vocab.encode,
                      caps_per_image=5, precision="fp32", batch_size=4)
    assert g.sims.shape == (6, 30)
    if kind == "vse":
        assert g.members[0].emb.images.shape[1] == 1 and int(g.members[0].emb.cap_lens.max()) == 1
    res = retrieve(g, TextQuery(records[3].captions[2]), k=6)
    by_image = {h.index: h.score for h in res.hits}
    np.testing.assert_allclose([by_image[i] for i in range(6)], g.sims[:, 17].numpy(), atol=1e-5)
