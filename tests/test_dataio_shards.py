"""Shard writer / reader round trips, atomic visibility, records and manifest rewrites."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dataio.errors import DataError
from dataio.shard_reader import read_shard
from dataio.shard_writer import ShardWriter, committed_shards, write_manifest, write_shard
from dataio.shards import ImageSample, read_manifest
from dataio.sources.synthetic import synthetic_samples


def _sample(key: str, k: int = 4, d: int = 8, seed: int = 0) -> ImageSample:
    rng = np.random.default_rng(seed)
    return ImageSample(key, rng.normal(size=(k, d)).astype(np.float32), ["a red dog .", "two cats"],
                       [["a", "red", "dog"], ["two", "cats"]], rng.random((k, 4)).astype(np.float32),
                       {"source": "test", "width": 10, "height": 20})


def test_round_trip_preserves_every_field(tmp_path):
    samples = [_sample(f"img{i}", k=3 + i, seed=i) for i in range(5)]
    rec = write_shard(str(tmp_path), "part-0", samples)
    assert rec.name == "part-0.tar" and rec.samples == 5 and rec.captions == 10
    assert rec.feature_shape == [7, 8] and rec.caption_counts == [2] * 5
    assert rec.bytes == os.path.getsize(tmp_path / "part-0.tar")
    back = list(read_shard(str(tmp_path / "part-0.tar")))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back):
        assert b.regions.dtype == np.float16 and b.regions.shape == a.regions.shape
        np.testing.assert_array_equal(b.regions, a.regions.astype(np.float16))
        np.testing.assert_array_equal(b.boxes, a.boxes)
        assert (b.captions, b.tokens, b.meta) == (a.captions, a.tokens, a.meta)


def test_write_is_reproducible_and_record_marks_commit(tmp_path):
    r1 = write_shard(str(tmp_path / "a"), "s", [_sample("x")])
    r2 = write_shard(str(tmp_path / "b"), "s", [_sample("x")])
    assert r1.sha256 == r2.sha256  # fixed mtime: same samples, same bytes
    assert set(committed_shards(str(tmp_path / "a"))) == {"s.tar"}
    # a shard without its record (crash between the two) is not committed
    os.remove(tmp_path / "a" / "s.tar.json")
    assert committed_shards(str(tmp_path / "a")) == {}


def test_failed_write_leaves_nothing_visible(tmp_path):
    def gen():
        yield _sample("ok")
        raise RuntimeError("extractor crashed")

    with pytest.raises(RuntimeError):
        write_shard(str(tmp_path), "s", gen())
    assert os.listdir(tmp_path) == []


def test_writer_refuses_non_finite_and_duplicates(tmp_path):
    bad = _sample("nan")
    bad.regions[1, 2] = np.nan
    with pytest.raises(DataError, match="nan.*NaN or inf"):
        write_shard(str(tmp_path), "s", [bad])
    big = _sample("big")
    big.regions[0, 0] = 1e6  # would become inf in float16
    with pytest.raises(DataError, match="overflow"):
        write_shard(str(tmp_path), "s", [big])
    with pytest.raises(DataError, match="duplicate key"):
        write_shard(str(tmp_path), "s", [_sample("x"), _sample("x")])
    with pytest.raises(DataError, match="unsafe"):
        write_shard(str(tmp_path), "s", [_sample("../evil")])
    assert os.listdir(tmp_path) == []


def test_shard_writer_bounds_and_manifest(tmp_path):
    dest = str(tmp_path / "ds")
    with ShardWriter(dest, split="train", max_samples=4) as w:
        for s in synthetic_samples(10, dim=16):
            w.write(s)
    assert [r.samples for r in w.records] == [4, 4, 2]
    write_manifest(dest, w.records, split="train", extractor={"name": "synthetic"}, extra={"note": 1})
    m = read_manifest(dest)
    assert (m["split"], m["num_samples"], m["num_captions"], m["feature_shape"], m["note"]) == ("train", 10, 50, [9, 16], 1)
    assert [s["name"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # byte bound: each sample is ~9 * 16 * 2 bytes + text; 1 byte forces one sample per shard
    with ShardWriter(str(tmp_path / "b"), split="train", max_bytes=1) as w2:
        for s in synthetic_samples(3, dim=16):
            w2.write(s)
    assert [r.samples for r in w2.records] == [1, 1, 1]


def test_rewrite_never_mixes_old_and_new(tmp_path):
    dest = str(tmp_path / "ds")
    with ShardWriter(dest, split="train", max_samples=2) as w:
        for s in synthetic_samples(6, seed=1, dim=8):
            w.write(s)
    write_manifest(dest, w.records, split="train", extractor={})
    old_keys = {s.key for n in committed_shards(dest) for s in read_shard(os.path.join(dest, n))}
    assert len(old_keys) == 6
    # second run, fewer shards, different content: the new manifest lists exactly the new set and
    # no old shard remains to be picked up by a glob.
    with ShardWriter(dest, split="train", max_samples=2) as w:
        assert not os.path.exists(os.path.join(dest, "manifest.json"))  # cleared before writing
        for s in synthetic_samples(3, seed=2, split="val", dim=8):
            w.write(s)
    write_manifest(dest, w.records, split="val", extractor={})
    assert sorted(os.listdir(dest)) == ["manifest.json", "shard-000000.tar", "shard-000000.tar.json",
                                        "shard-000001.tar", "shard-000001.tar.json"]
    new_keys = [s.key for n in sorted(committed_shards(dest)) for s in read_shard(os.path.join(dest, n))]
    assert new_keys == ["syn-val-000000", "syn-val-000001", "syn-val-000002"]


def test_manifest_drops_unlisted_shards(tmp_path):
    dest = str(tmp_path)
    recs = [write_shard(dest, f"s{i}", [_sample(f"k{i}")]) for i in range(3)]
    write_manifest(dest, recs[:2], split="train", extractor={})
    assert set(committed_shards(dest)) == {"s0.tar", "s1.tar"}
    assert not os.path.exists(tmp_path / "s2.tar")


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest at"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="manifest.json.*not a scan-shards/1 manifest"):
        read_manifest(str(tmp_path))


def test_shard_writer_streams_and_aborts_cleanly(tmp_path):
    dest = str(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with ShardWriter(dest, split="train", max_samples=3) as w:
            for s in synthetic_samples(5, dim=8):
                w.write(s)
            raise RuntimeError("crash mid-shard")
    # the first, complete shard is committed; the open one left no file behind
    assert sorted(os.listdir(dest)) == ["shard-000000.tar", "shard-000000.tar.json"]
    assert committed_shards(dest)["shard-000000.tar"].samples == 3


@pytest.mark.parametrize("value,finite", [(np.nan, False), (np.inf, False), (-np.inf, False),
                                          (65504.0, True), (-6e-8, True), (0.0, True)])
def test_float16_finiteness_check(value, finite):
    from dataio.shards import _all_finite

    a = np.ones((3, 5), np.float16)
    a[2, 4] = value
    assert _all_finite(a) is finite
    assert _all_finite(a.astype(np.float32)) is finite
