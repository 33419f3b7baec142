"""Writing and streaming shards through moto's real HTTP S3 server (endpoint from the environment)."""
from __future__ import annotations

import logging
from collections import Counter

import pytest

from dataio import storage
from dataio.pipeline import caption_batches, image_records, iter_tokens
from dataio.shards import ShardWriter, committed_shards, read_manifest, write_manifest, write_shard
from dataio.sources.synthetic import synthetic_samples, write_synthetic
from dataio.text import build_vocab


def _keys(s3, bucket: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=bucket[len("s3://"):])
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_write_and_stream_from_s3(s3_server, caplog, monkeypatch):
    # A distinctive secret: it must never appear in our logs.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3CRET-do-not-log-1234")
    caplog.set_level(logging.DEBUG, logger="dataio")
    bucket = s3_server.make_bucket()
    dest = f"{bucket}/sets/train"
    spec = write_synthetic(dest, 40, seed=2, dim=32, shard_size=15)
    assert spec == f"{dest}/manifest.json"
    assert _keys(s3_server, bucket) == sorted(
        [f"sets/train/shard-00000{i}.tar{ext}" for i in range(3) for ext in ("", ".json")] + ["sets/train/manifest.json"])
    assert read_manifest(dest)["num_samples"] == 40
    assert set(committed_shards(dest)) == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}

    vocab = build_vocab(iter_tokens(spec))
    got = Counter()
    for rank in range(2):
        loader = caption_batches(spec, batch_size=10, encode=vocab, seed=1, epoch=0, rank=rank, world=2,
                                 num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 10
        got.update((k, tuple(t)) for b in batches for k, t in zip(b.keys, b.tokens.tolist()))
    assert sum(got.values()) == 200 and max(got.values()) == 1  # every caption once over 2 ranks x 2 workers

    local = [s.key for s in image_records(spec, rank=1, world=2)]
    assert local == [f"syn-train-{i:06d}" for i in range(20, 40)]
    assert "S3CRET-do-not-log-1234" not in caplog.text


def test_s3_rewrite_and_failed_write_leave_no_mix(s3_server):
    bucket = s3_server.make_bucket()
    dest = f"{bucket}/ds"
    write_synthetic(dest, 30, seed=1, dim=8, shard_size=10)
    with ShardWriter(dest, split="train", max_samples=20) as w:
        assert not storage.exists(f"{dest}/manifest.json")
        for s in synthetic_samples(20, seed=9, dim=8):
            w.write(s)
    write_manifest(dest, w.records, split="train", extractor={})
    assert _keys(s3_server, bucket) == ["ds/manifest.json", "ds/shard-000000.tar", "ds/shard-000000.tar.json"]

    def crashing():
        yield from synthetic_samples(2, dim=8)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_shard(dest, "shard-000001", crashing())
    # the half-written upload went to a temporary key, which was removed: nothing new is visible
    assert _keys(s3_server, bucket) == ["ds/manifest.json", "ds/shard-000000.tar", "ds/shard-000000.tar.json"]


def test_generic_endpoint_variable_is_honoured(s3_server, monkeypatch):
    """botocore resolves AWS_ENDPOINT_URL as well as the S3-specific AWS_ENDPOINT_URL_S3."""
    bucket = s3_server.make_bucket()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    storage.write_bytes_atomic(f"{bucket}/x.txt", b"hello")
    assert storage.read_bytes(f"{bucket}/x.txt") == b"hello"
    assert _keys(s3_server, bucket) == ["x.txt"]


def test_karpathy_items_from_s3(s3_server):
    import io
    import json

    from dataio.sources.karpathy import karpathy_items
    from dataio.sources.synthetic import synthetic_items

    bucket = s3_server.make_bucket()
    item = next(synthetic_items(1, seed=3))
    buf = io.BytesIO()
    item.load().save(buf, format="PNG")
    storage.write_bytes_atomic(f"{bucket}/imgs/val2014/pic1.png", buf.getvalue())
    split_file = {"dataset": "tiny", "images": [{"filename": "pic1.png", "filepath": "val2014", "split": "val",
                                                 "sentences": [{"raw": c, "tokens": t} for c, t in zip(item.captions, item.tokens)]}]}
    storage.write_bytes_atomic(f"{bucket}/dataset_tiny.json", json.dumps(split_file).encode())
    (got,) = karpathy_items(f"{bucket}/dataset_tiny.json", f"{bucket}/imgs", "val")
    assert got.key == "pic1" and got.captions == item.captions
    assert got.load().tobytes() == item.load().tobytes()
