"""Caption pipeline: node/worker split, exactly-once, equal batches, resume and re-planning on
another world size, uniform batch composition, resampling, collate."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dataio.pipeline import caption_batches, image_id, image_records, iter_tokens, resolve_shards
from dataio.sources.synthetic import synthetic_samples, write_synthetic
from dataio.text import build_vocab

WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def vocab(generated_shards):
    return build_vocab(iter_tokens(generated_shards))


def _epoch(spec, vocab, *, rank, world=WORLD, workers=WORKERS, **kw):
    kw = {"batch_size": 16, "seed": 3, "epoch": 0, **kw}
    return list(caption_batches(spec, encode=vocab, rank=rank, world=world, num_workers=workers, **kw))


def _captions(batches) -> list[tuple[str, tuple[int, ...]]]:
    """(image key, caption token ids) of every row, in delivery order."""
    out = []
    for b in batches:
        for key, toks, n in zip(b.keys, b.tokens.tolist(), b.cap_lens.tolist()):
            out.append((key, tuple(toks[:n])))
    return out


def _all_captions(spec, vocab) -> Counter:
    return Counter((s.key, tuple(vocab.encode(t))) for s in image_records(spec, rank=0, world=1) for t in s.tokens)


def test_two_ranks_two_workers_exactly_once(generated_shards, vocab):
    expected = _all_captions(generated_shards, vocab)
    assert sum(expected.values()) == 600
    per_rank = [_epoch(generated_shards, vocab, rank=r) for r in range(WORLD)]
    got = Counter(c for bs in per_rank for c in _captions(bs))
    assert got == expected  # 600 captions over 2 ranks: every one exactly once
    assert len(per_rank[0]) == len(per_rank[1]) == 19  # 300 per rank, batches of 16 -> 18 full + 12
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]]


def test_epochs_are_shuffled_differently_but_reproducibly(generated_shards, vocab):
    a = _captions(_epoch(generated_shards, vocab, rank=0, epoch=1))
    b = _captions(_epoch(generated_shards, vocab, rank=0, epoch=1))
    c = _captions(_epoch(generated_shards, vocab, rank=0, epoch=2))
    assert a == b
    assert a != c
    noshuf = _captions(_epoch(generated_shards, vocab, rank=0, world=1, workers=0, shuffle=False))
    assert [k for k, _ in noshuf][:5] == ["syn-train-000000"] * 5  # manifest order without shuffling


def test_fewer_shards_than_ranks_times_workers_gives_equal_batches(tmp_path, vocab):
    # 2 shards, 3 ranks x 2 workers = 6 readers; 13 images x 5 = 65 captions -> 21 per rank (2 left out)
    spec = write_synthetic(str(tmp_path / "tiny"), 13, seed=5, dim=64, shard_size=7)
    assert len(resolve_shards(spec)) == 2
    runs = [_epoch(spec, vocab, rank=r, world=3, batch_size=4) for r in range(3)]
    assert [len(r) for r in runs] == [6, 6, 6]
    assert all([len(b) for b in r] == [4, 4, 4, 4, 4, 1] for r in runs)
    got = Counter(c for r in runs for c in _captions(r))
    assert max(got.values()) == 1 and sum(got.values()) == 63
    # drop_last: every rank leaves out the same partial batch
    assert [len(_epoch(spec, vocab, rank=r, world=3, batch_size=4, drop_last=True)) for r in range(3)] == [5, 5, 5]


def test_one_shard_many_ranks(tmp_path, vocab):
    spec = write_synthetic(str(tmp_path / "one"), 4, seed=6, dim=64, shard_size=10)
    runs = [_epoch(spec, vocab, rank=r, world=4, batch_size=2) for r in range(4)]
    assert [len(r) for r in runs] == [3] * 4  # 20 captions / 4 ranks = 5 each
    assert sum(Counter(c for r in runs for c in _captions(r)).values()) == 20


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
@pytest.mark.parametrize("workers,consumed", [(2, 5), (2, 6), (0, 7), (3, 4)])
def test_resume_gives_the_remaining_batches_in_order(generated_shards, vocab, workers, consumed):
    full = _epoch(generated_shards, vocab, rank=1, workers=workers, epoch=4)
    resumed = _epoch(generated_shards, vocab, rank=1, workers=workers, epoch=4,
                     segments=[(WORLD, 16 * consumed)])
    assert _captions(resumed) == _captions(full[consumed:])
    for a, b in zip(full[consumed:], resumed):
        torch.testing.assert_close(a.regions, b.regions)


@pytest.mark.parametrize("new_world,new_batch,new_workers", [(4, 16, 2), (3, 7, 1), (1, 32, 0)])
def test_resume_on_another_world_size_sees_every_caption_once(generated_shards, vocab, new_world,
                                                               new_batch, new_workers):
    """Issue 10: 2 -> 4 ranks used to leave captions unseen and show others twice."""
    expected = _all_captions(generated_shards, vocab)
    before = [_epoch(generated_shards, vocab, rank=r)[:5] for r in range(WORLD)]  # 5 batches of 16
    after = [_epoch(generated_shards, vocab, rank=r, world=new_world, workers=new_workers,
                    batch_size=new_batch, segments=[(WORLD, 80)]) for r in range(new_world)]
    seen = Counter(c for bs in before + after for c in _captions(bs))
    assert max(seen.values()) == 1  # nothing twice
    left_out = sum(expected.values()) - sum(seen.values())
    assert 0 <= left_out < new_world  # at most the remainder that does not divide over the ranks
    assert len({len(r) for r in after}) == 1  # equal batch counts on the new ranks
    # a second re-plan later in the same epoch keeps it exact
    third = [_epoch(generated_shards, vocab, rank=r, world=2, batch_size=5,
                    segments=[(WORLD, 80), (new_world, new_batch)]) for r in range(2)]
    again = Counter(c for bs in before + [a[:1] for a in after] + third for c in _captions(bs))
    assert max(again.values()) == 1
    assert sum(expected.values()) - sum(again.values()) <= new_world + 1


def test_a_checkpoint_at_the_epochs_last_partial_batch_resumes(generated_shards, vocab):
    """Issue 10: start_sample=300 (the rank's whole share, not a multiple of 16) was refused."""
    full = _epoch(generated_shards, vocab, rank=0)
    assert sum(len(b) for b in full) == 300 and len(full[-1]) == 12
    assert _epoch(generated_shards, vocab, rank=0, segments=[(WORLD, 300)]) == []
    rest = _epoch(generated_shards, vocab, rank=0, segments=[(WORLD, 290)])
    assert _captions(rest) == _captions(full)[290:]


def test_a_resume_position_that_does_not_fit_the_data_is_refused(generated_shards, vocab):
    with pytest.raises(ValueError, match=r"segment \(world=2, consumed=301\).*data set or "
                                         r"data.caps_per_image changed"):
        caption_batches(generated_shards, batch_size=16, encode=vocab, seed=0, epoch=0, rank=0,
                        world=2, segments=[(2, 301)])


def test_batches_are_a_uniform_shuffle_of_the_epoch(generated_shards, vocab):
    """Issue 10: a 1,000-caption buffer over contiguous spans put 11.5% of a batch's captions with
    another caption of their image, and drew each batch from a few hundred neighbouring images."""
    batches = [b for r in range(WORLD) for b in _epoch(generated_shards, vocab, rank=r, drop_last=True)]
    shared = sum(sum(n for n in Counter(b.keys).values() if n > 1) for b in batches) / (16 * len(batches))
    uniform = 1 - (1 - 15 / 599) ** 4  # each of a caption's 4 siblings among the batch's other 15
    assert 0.3 * uniform < shared < 2 * uniform, (shared, uniform)
    shards = [len({int(k.rsplit("-", 1)[1]) // 30 for k in b.keys}) for b in batches]
    assert np.mean(shards) > 3.3  # distinct shards (of 4) in a batch of 16; uniform: 3.6


def test_resampled_gives_equal_batches_with_repeats(generated_shards, vocab):
    runs = [_epoch(generated_shards, vocab, rank=r, resampled=True) for r in range(WORLD)]
    assert [len(r) for r in runs] == [19, 19]
    caps = [c for r in runs for c in _captions(r)]
    assert len(caps) == 600
    assert len(set(caps)) < 600  # drawing shards with replacement repeats some captions
    assert set(caps) <= set(_all_captions(generated_shards, vocab))


def test_collate_pads_and_masks(tmp_path, vocab):
    from dataio.shard_writer import write_manifest, write_shard
    from dataio.shards import ImageSample

    rng = np.random.default_rng(0)
    samples = [ImageSample(f"k{i}", rng.normal(size=(2 + i, 8)).astype(np.float32),
                           [f"cap {i}", "a longer caption here"], [["cap"], ["a", "longer", "caption", "here"]])
               for i in range(3)]
    rec = write_shard(str(tmp_path), "s", samples)
    write_manifest(str(tmp_path), [rec], split="train", extractor={})
    (b,) = _epoch(str(tmp_path), vocab, rank=0, world=1, workers=0, batch_size=6, shuffle=False)
    assert b.regions.shape == (6, 4, 8) and b.regions.dtype == torch.float32
    assert b.img_lens.tolist() == [2, 2, 3, 3, 4, 4]
    assert b.cap_lens.tolist() == [3, 6] * 3  # <start> words <end>
    assert b.tokens[0, 3:].eq(vocab.pad_id).all() and b.tokens[0, 0] == vocab.stoi["<start>"]
    assert b.region_mask.sum(1).tolist() == b.img_lens.tolist()
    assert b.word_mask.sum(1).tolist() == b.cap_lens.tolist()
    assert b.regions[0, 2:].eq(0).all()
    np.testing.assert_array_equal(b.regions[4, :4].numpy(), samples[2].regions.astype(np.float16).astype(np.float32))
    assert b.image_ids.tolist() == [image_id(k) for k in ["k0", "k0", "k1", "k1", "k2", "k2"]]
    assert 0 <= image_id("k0") < 2**63 and image_id("k0") == image_id("k0") != image_id("k1")


def test_caps_per_image_and_max_words(generated_shards, vocab):
    bs = _epoch(generated_shards, vocab, rank=0, world=1, workers=0, caps_per_image=2, max_words=4, batch_size=50)
    assert sum(len(b) for b in bs) == 240
    assert max(b.tokens.shape[1] for b in bs) == 4


def test_image_records_contiguous_blocks(generated_shards):
    blocks = [[s.key for s in image_records(generated_shards, rank=r, world=3)] for r in range(3)]
    assert [len(b) for b in blocks] == [40, 40, 40]
    assert sum(blocks, []) == [f"syn-train-{i:06d}" for i in range(120)]
    first = [[s.key for s in image_records(generated_shards, rank=r, world=2, limit=50)] for r in range(2)]
    assert sum(first, []) == [f"syn-train-{i:06d}" for i in range(50)]  # a validation subset


def test_shards_whose_records_lack_offsets_are_indexed_from_the_tar(tmp_path, generated_shards, vocab):
    import json
    import shutil

    from dataio.shards import RECORD_SUFFIX

    src = Path(generated_shards).parent
    old = tmp_path / "old"
    shutil.copytree(src, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for rec in manifest["shards"]:
        rec.pop("offsets")
        (old / (rec["name"] + RECORD_SUFFIX)).write_text(json.dumps(rec))
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert _captions(_epoch(str(old), vocab, rank=0)) == _captions(_epoch(generated_shards, vocab, rank=0))


def test_brace_pattern_spec(generated_shards, vocab):
    import os

    base = os.path.dirname(generated_shards)
    spec = os.path.join(base, "shard-{000000..000001}.tar")
    assert len(resolve_shards(spec)) == 2
    bs = _epoch(spec, vocab, rank=0, world=1, batch_size=50)
    assert sum(len(b) for b in bs) == 300


def test_rank_and_world_default_to_the_environment(generated_shards, vocab, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = caption_batches(generated_shards, batch_size=16, encode=vocab, seed=0, epoch=0, num_workers=0)
    assert (loader.plan.rank, loader.plan.rank_captions, len(loader)) == (1, 200, 13)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        caption_batches(generated_shards, batch_size=16, encode=vocab, seed=0, epoch=0, rank=3)


def test_encoder_returning_no_ids_is_a_named_error(generated_shards):
    from dataio.errors import DataError

    with pytest.raises(DataError, match="encodes to no tokens"):
        list(caption_batches(generated_shards, batch_size=16, encode=lambda toks, raw: [], seed=0, epoch=0,
                             rank=0, world=1, num_workers=0))


def test_brace_pattern_needs_committed_records(tmp_path):
    from dataio.shard_writer import write_shard

    write_shard(str(tmp_path), "a", synthetic_samples(2, dim=8))
    write_shard(str(tmp_path), "b", synthetic_samples(2, seed=1, dim=8))
    (tmp_path / "b.tar.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"b.tar has no record .*b.tar.json"):
        resolve_shards(str(tmp_path / "{a,b}.tar"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and device copies need a CUDA GPU")
def test_pinned_batches_move_to_the_gpu(generated_shards, vocab):
    (b, *_) = caption_batches(generated_shards, batch_size=16, encode=vocab, seed=0, epoch=0, rank=0, world=1,
                              num_workers=2, pin_memory=True)
    assert b.regions.is_pinned() and b.tokens.is_pinned()
    g = b.to("cuda", non_blocking=True)
    assert g.regions.is_cuda and g.keys == b.keys
    torch.testing.assert_close(g.regions.cpu(), b.regions)
    assert g.word_mask.device.type == "cuda"
