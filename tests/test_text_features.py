"""Frozen transformers token features: computed once per caption, the same bits however reached."""
from __future__ import annotations

import pytest
import torch

from scan.model import HFTextEncoder, length_mask
from scan.text_features import STORE_DTYPE, FrozenTokenFeatures, cache_file, precompute


def _captions(seed: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 50, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 12, (count,), generator=g)]


def test_rows_equal_the_backbone_on_each_caption_alone(tiny_bert_dir):
    """Length-bucketed batches (padding masked) give each caption's own features, up to float16."""
    feats = FrozenTokenFeatures(str(tiny_bert_dir))
    captions = _captions(1, 40)
    feats.compute(captions, batch_size=7)
    assert len(feats) == len({tuple(c) for c in captions}) and feats.computed == len(feats)
    for ids in captions[:10]:
        alone = feats.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
        row = feats.rows[tuple(ids)]
        assert row.dtype == STORE_DTYPE and row.shape == (len(ids), 16)
        torch.testing.assert_close(row.float(), alone, rtol=2e-3, atol=2e-3)


def test_lookup_pads_with_zeros_and_computes_each_caption_once(tiny_bert_dir):
    feats = FrozenTokenFeatures(str(tiny_bert_dir))
    ids = torch.tensor([[7, 8, 9, 0], [11, 12, 0, 0]])
    lengths = torch.tensor([3, 2])
    out = feats.lookup(ids, lengths, torch.float32)
    assert out.shape == (2, 4, 16) and out.dtype == torch.float32
    assert torch.equal(out[0, 3], torch.zeros(16)) and torch.equal(out[1, 2:], torch.zeros(2, 16))
    assert feats.computed == 2
    again = feats.lookup(ids, lengths, torch.bfloat16)  # a hit: no backbone run, same values
    assert feats.computed == 2 and again.dtype == torch.bfloat16
    assert torch.equal(again.float(), out.bfloat16().float())


def test_save_and_load_round_trip_and_merge(tiny_bert_dir, tmp_path):
    first = FrozenTokenFeatures(str(tiny_bert_dir))
    first.compute(_captions(2, 25))
    first.save(tmp_path / "f.pt")
    second = FrozenTokenFeatures(str(tiny_bert_dir))
    second.compute(_captions(3, 5))
    assert second.load(tmp_path / "f.pt") == len(first.rows.keys() - {tuple(c) for c in _captions(3, 5)})
    for key, row in first.rows.items():
        assert torch.equal(second.rows[key], row)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt: not a frozen text feature file"):
        second.load(tmp_path / "bad.pt")


def test_precompute_writes_once_and_a_second_run_computes_nothing(tiny_bert_dir, tmp_path, monkeypatch):
    import scan.text_features as tf

    monkeypatch.setattr(tf, "_INSTANCES", {})
    captions = _captions(4, 30)
    feats = precompute(str(tiny_bert_dir), captions, tmp_path, progress=False)
    path = cache_file(tmp_path, str(tiny_bert_dir))
    assert path.is_file() and feats.computed == len(feats)
    monkeypatch.setattr(tf, "_INSTANCES", {})  # a new process
    again = precompute(str(tiny_bert_dir), captions, tmp_path, progress=False)
    assert again.computed == 0 and len(again) == len(feats)
    mtime = path.stat().st_mtime_ns
    precompute(str(tiny_bert_dir), captions[:5], tmp_path, progress=False)
    assert path.stat().st_mtime_ns == mtime  # nothing added: not rewritten


def test_frozen_encoders_of_one_model_share_the_features(tiny_bert_dir, monkeypatch):
    """The training model and each validation model reach the same rows: the same embeddings."""
    import scan.text_features as tf

    monkeypatch.setattr(tf, "_INSTANCES", {})  # a fresh process
    a = HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=True)
    b = HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=True)
    b.load_state_dict(a.state_dict())
    assert a.frozen is b.frozen
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = length_mask(torch.tensor([4, 2]), 4).long()
    computed = a.frozen.computed
    out = a(ids, mask)
    assert a.frozen.computed == computed + 2
    assert torch.equal(b(ids, mask), out) and a.frozen.computed == computed + 2


def test_fine_tuned_top_layers_start_from_the_pretrained_model(tiny_bert_dir, monkeypatch):
    """The cached rows enter the trained copy of the top layer: before any step the encoder's output
    is the full frozen model's (up to float16 storage), padding masked; only ``top`` and ``fc`` train."""
    import scan.text_features as tf

    monkeypatch.setattr(tf, "_INSTANCES", {})
    top1 = HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=True, finetune_layers=1)
    full = HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=True)
    full.fc.load_state_dict(top1.fc.state_dict())
    assert top1.frozen is not full.frozen and top1.frozen.trained_top_layers == 1
    top1.eval()  # the layer's own dropout off, as at validation
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]])
    mask = length_mask(torch.tensor([5, 3]), 5).long()
    torch.testing.assert_close(top1(ids, mask), full(ids, mask), rtol=5e-3, atol=5e-3)
    assert torch.equal(top1(ids, mask)[1, 3:], torch.zeros(2, 8))
    trainable = {n for n, p in top1.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("top.0.", "fc.")) for n in trainable)
    assert any(n.startswith("top.0.") for n in trainable)
    with pytest.raises(ValueError, match="has 2 layers"):
        HFTextEncoder(tiny_bert_dir, embed_size=8, freeze=True, finetune_layers=3)


def test_feature_files_of_different_cuts_never_mix(tiny_bert_dir, tmp_path):
    assert cache_file(tmp_path, str(tiny_bert_dir), 1) != cache_file(tmp_path, str(tiny_bert_dir))
    assert cache_file(tmp_path, str(tiny_bert_dir), 0) == cache_file(tmp_path, str(tiny_bert_dir))
