"""Writing and streaming shards through moto's real HTTP S3 server (endpoint from the environment)."""
from __future__ import annotations

import logging
from collections import Counter

import pytest

from dataio import storage
from dataio.pipeline import caption_batches, image_records, iter_tokens
from dataio.shard_writer import ShardWriter, committed_shards, write_manifest, write_shard
from dataio.shards import read_manifest
from dataio.sources.synthetic import synthetic_samples, write_synthetic
from dataio.text import build_vocab
from helpers_dist import free_port

pytestmark = pytest.mark.integration


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


class _Outage:
    """A moto S3 server of its own on a fixed port, which a test stops and starts again."""

    def __init__(self, monkeypatch):
        import boto3
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server_cls = ThreadedMotoServer
        self.server = None
        self.start()
        endpoint = f"http://127.0.0.1:{self.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        # botocore's own connection retries (and s3fs's, ~8 s in all) would hide an outage of a few
        # seconds from dataio's retries, which this test is about: one botocore attempt each.
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")

    def start(self) -> None:
        self.server = self._server_cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()  # moto keeps its buckets in this process: a restart finds them again

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def outage(monkeypatch):
    o = _Outage(monkeypatch)
    yield o
    o.stop()


def test_reads_survive_an_outage_mid_epoch(outage, caplog):
    """Issue 10: transient errors are retried with backoff; the epoch completes exactly once."""
    import threading

    spec = write_synthetic("s3://outage/train", 30, seed=5, dim=16, shard_size=10)
    vocab = build_vocab(iter_tokens(spec))
    retry = storage.RetryPolicy(retries=4, backoff_s=0.5)
    loader = caption_batches(spec, batch_size=10, encode=vocab, seed=0, epoch=0, rank=0, world=1,
                             num_workers=0, retry=retry)
    got = Counter()
    with caplog.at_level(logging.WARNING, logger="dataio"):
        for i, b in enumerate(loader):
            got.update((k, tuple(t)) for k, t in zip(b.keys, b.tokens.tolist()))
            if i == 3:  # the server goes away for ~3 s, mid-epoch
                outage.stop()
                threading.Timer(3.0, outage.start).start()
        assert i == len(loader) - 1 == 14
    assert sum(got.values()) == 150 and max(got.values()) == 1
    assert "retrying in" in caplog.text  # it did fail, and was retried
    # sequential reads (evaluation, vocabulary) reopen where they stopped
    outage.stop()
    threading.Timer(3.0, outage.start).start()
    assert len(list(image_records(spec, rank=0, world=1))) == 30


def test_a_read_that_fails_after_retries_is_a_storage_error(outage, monkeypatch):
    from dataio.errors import DataError

    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(retries=1, backoff_s=0.1))

    spec = write_synthetic("s3://outage/train", 10, seed=5, dim=16, shard_size=10)
    vocab = build_vocab(iter_tokens(spec))
    loader = caption_batches(spec, batch_size=10, encode=vocab, seed=0, epoch=0, rank=0, world=1,
                             num_workers=0, retry=storage.RetryPolicy(retries=1, backoff_s=0.1))
    outage.stop()
    with pytest.raises(storage.StorageError, match=r"storage error reading s3://outage/train/shard-000000.tar: "
                                                   r".*failed 2 time\(s\)") as err:
        next(iter(loader))
    assert not isinstance(err.value, DataError)  # not 'corrupt_tar': on_error="skip" cannot hide it
    with pytest.raises(storage.StorageError, match="storage error reading s3://outage/train/"):
        list(image_records(spec, rank=0, world=1))
    from dataio.shard_reader import raw_samples  # the sequential shard reader reported 'corrupt_tar'

    with pytest.raises(storage.StorageError, match="shard-000000.tar.*failed 2 time"):
        list(raw_samples("s3://outage/train/shard-000000.tar"))
    outage.start()


def test_a_local_shard_cache_gives_the_same_batches(s3_server, tmp_path):
    """data.cache_dir: each s3:// shard is fetched once (two workers share the folder), then read
    by range locally; the batches are those of direct ranged reads."""
    bucket = s3_server.make_bucket()
    spec = write_synthetic(f"{bucket}/train", 40, seed=4, dim=16, shard_size=15)
    vocab = build_vocab(iter_tokens(spec))
    kw = dict(batch_size=10, encode=vocab, seed=2, epoch=1, rank=0, world=1, num_workers=2)
    direct = [(b.keys, b.tokens.tolist()) for b in caption_batches(spec, **kw)]
    cache = tmp_path / "cache"
    cached = [(b.keys, b.tokens.tolist()) for b in caption_batches(spec, cache_dir=str(cache), **kw)]
    assert cached == direct
    sizes = {r["name"]: r["bytes"] for r in read_manifest(spec)["shards"]}
    copies = sorted(p for p in cache.iterdir() if p.suffix == ".tar")
    assert sorted(p.name.split("-", 1)[1] for p in copies) == sorted(sizes)  # one copy per shard
    assert all(p.stat().st_size == sizes[p.name.split("-", 1)[1]] for p in copies)
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
