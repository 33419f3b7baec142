"""Writing shards atomically (temporary name, then commit), their records, and the manifest."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from typing import IO, Iterable

import webdataset as wds

from dataio import storage
from dataio.errors import DataError
from dataio.shards import (FORMAT, MANIFEST, RECORD_SUFFIX, ImageSample, ShardRecord, check_sample,
                           encode_sample)

log = logging.getLogger(__name__)


class _HashingWriter:
    """File-like pass-through that counts bytes and hashes them (for the shard record)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def shard_filename(name: str) -> str:
    name = name if name.endswith(".tar") else name + ".tar"
    if "/" in name or name.startswith(".") or ".." in name:
        raise ValueError(f"shard name {name!r} must be a plain file name")
    return name


class _OpenShard:
    """One shard being streamed to a temporary name; :meth:`finish` makes it visible."""

    def __init__(self, dest: str, name: str):
        self.fname = shard_filename(name)
        self.url = storage.join(dest, self.fname)
        storage.makedirs(dest)
        self.tmp = storage.temp_name(self.url)
        self.f = storage.open_url(self.tmp, "wb")
        self.hw = _HashingWriter(self.f)
        self.tw = wds.TarWriter(self.hw, encoder=False, mtime=0)  # mtime 0: reproducible bytes
        self.counts: list[int] = []
        self.offsets: list[int] = [0]
        self.keys: set[str] = set()
        self.k_max, self.dim = 0, None
        self.saliency = True  # every sample so far has saliency.npy

    @property
    def size(self) -> int:
        """Tar bytes so far: tarfile's own logical offset (the stream buffers, so self.hw.n lags)."""
        return self.tw.tarstream.offset

    def write(self, s: ImageSample) -> None:
        check_sample(s, self.fname, self.dim)
        if s.key in self.keys:
            raise DataError(self.fname, s.key, "duplicate key", "duplicate_key")
        self.keys.add(s.key)
        self.dim = s.regions.shape[1]
        self.k_max = max(self.k_max, s.regions.shape[0])
        self.counts.append(len(s.captions))
        self.saliency = self.saliency and s.saliency is not None
        self.tw.write(encode_sample(s))
        self.offsets.append(self.size)

    def finish(self) -> ShardRecord:
        """Close, rename into place, then write the record (which marks the shard committed)."""
        if not self.counts:
            raise ValueError(f"shard {self.url}: no samples to write")
        self.tw.close()
        self.f.close()
        storage.commit(self.tmp, self.url)
        rec = ShardRecord(self.fname, len(self.counts), self.hw.n, self.hw.sha.hexdigest(),
                          [self.k_max, self.dim], sum(self.counts), self.counts, time.time(),
                          self.offsets, self.saliency)
        storage.write_bytes_atomic(self.url + RECORD_SUFFIX, json.dumps(asdict(rec)).encode())
        log.debug("wrote %s: %d samples, %d bytes", self.url, rec.samples, rec.bytes)
        return rec

    def abort(self) -> None:
        try:
            self.tw.close()  # closed here, not by tarfile's __del__ after the file is gone
            self.f.close()
        except Exception:  # the temporary file is removed either way
            log.debug("closing aborted shard %s failed", self.tmp, exc_info=True)
        finally:
            storage.discard(self.tmp)


def write_shard(dest: str, name: str, samples: Iterable[ImageSample]) -> ShardRecord:
    """Write one shard ``dest/name.tar`` atomically, then its record ``dest/name.tar.json``.

    The shard is streamed to a temporary name (local: ``os.replace``; S3: server-side copy) and only
    then renamed into place; the record, written after it, marks the shard committed. Refuses
    invalid samples (NaN/inf, bad shapes, empty captions, unsafe or duplicate keys).
    """
    shard = _OpenShard(dest, name)
    try:
        for s in samples:
            shard.write(s)
        return shard.finish()
    except BaseException:
        shard.abort()
        raise


def committed_shards(dest: str) -> dict[str, ShardRecord]:
    """Shards of ``dest`` whose record exists (and so were completely written), by file name."""
    names = set(storage.listdir(dest))
    shards = sorted(n for n in names if n.endswith(".tar") and n + RECORD_SUFFIX in names)
    urls = [storage.join(dest, n + RECORD_SUFFIX) for n in shards]
    blobs = storage.read_many(urls)
    return {n: ShardRecord.from_dict(json.loads(blobs[u]), u) for n, u in zip(shards, urls)}


def clear_dataset(dest: str) -> None:
    """Remove the manifest (first, so no reader sees a half-replaced set), shards, records and
    temporary files of a previous run at ``dest``. Other files are left alone."""
    storage.remove(storage.join(dest, MANIFEST))
    for n in storage.listdir(dest):
        if n.endswith(".tar") or n.endswith(".tar" + RECORD_SUFFIX) or storage.is_temp_name(n):
            storage.remove(storage.join(dest, n))


class ShardWriter:
    """Sequential writer of count- and size-bounded shards ``<prefix>-000000.tar``, ...

    Samples stream straight into the open shard (nothing is buffered). Opening the writer clears a
    previous data set at ``dest`` (``fresh=True``, the default), so a new run never mixes with old
    shards. Keys must be unique over the whole writer.
    """

    def __init__(self, dest: str, *, split: str, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 prefix: str = "shard", fresh: bool = True):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
        self.dest, self.split, self.prefix = dest, split, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.records: list[ShardRecord] = []
        self._shard: _OpenShard | None = None
        self._keys: set[str] = set()
        if fresh:
            clear_dataset(dest)

    def write(self, sample: ImageSample) -> None:
        if sample.key in self._keys:
            raise DataError(self.dest, sample.key, "duplicate key in data set", "duplicate_key")
        sh = self._shard
        if sh is not None and (len(sh.counts) >= self.max_samples or sh.size >= self.max_bytes):
            self.records.append(sh.finish())
            sh = None
        if sh is None:
            sh = self._shard = _OpenShard(self.dest, f"{self.prefix}-{len(self.records):06d}.tar")
        sh.write(sample)
        self._keys.add(sample.key)

    def close(self) -> list[ShardRecord]:
        if self._shard is not None:
            self.records.append(self._shard.finish())
            self._shard = None
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (nothing partial becomes visible)."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(dest: str, records: list[ShardRecord], *, split: str, extractor: dict,
                   extra: dict | None = None) -> None:
    """Write ``dest/manifest.json`` (atomically, last) listing exactly ``records``; then delete
    shards and records at ``dest`` that it does not list (left over from an earlier run)."""
    if not records:
        raise ValueError(f"{dest}: a manifest needs at least one shard")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"{dest}: duplicate shard names in manifest records")
    shapes = {r.feature_shape[1] for r in records}
    if len(shapes) != 1:
        raise ValueError(f"{dest}: shards disagree on feature dimension D: {sorted(shapes)}")
    manifest = {
        "format": FORMAT,
        "split": split,
        "extractor": extractor,
        "feature_shape": [max(r.feature_shape[0] for r in records), shapes.pop()],
        "num_samples": sum(r.samples for r in records),
        "num_captions": sum(r.captions for r in records),
        "shards": [asdict(r) for r in records],
        "created": time.time(),
        **(extra or {}),
    }
    storage.write_bytes_atomic(storage.join(dest, MANIFEST), json.dumps(manifest).encode())
    listed = set(names) | {n + RECORD_SUFFIX for n in names}
    for n in storage.listdir(dest):
        if (n.endswith(".tar") or n.endswith(".tar" + RECORD_SUFFIX)) and n not in listed:
            log.info("removing stale shard file %s", storage.join(dest, n))
            storage.remove(storage.join(dest, n))
