"""Shard format: one WebDataset sample per image, atomic shard writing, per-shard records, manifest.

A data set directory (local or ``s3://bucket/prefix``) holds, for one split:

- ``<prefix>-000000.tar`` ... : samples ``<key>.regions.npy`` (k, D) float16, optional
  ``<key>.boxes.npy`` (k, 4) float32, ``<key>.captions.json`` ``{"raw": [...], "tokens": [[...]]}``,
  ``<key>.meta.json``;
- ``<shard>.tar.json``: the shard's :class:`ShardRecord`, written only after the shard itself is in
  place, so a record marks a committed shard (resumable extraction jobs skip those);
- ``manifest.json``: written last; lists exactly the shards of the data set.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Iterable, Iterator

import numpy as np
import webdataset as wds

from dataio import storage
from dataio.errors import SKIPS, DataError, OnError, SkipCounter, check_on_error, handle

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "scan-shards/1"
RECORD_SUFFIX = ".json"  # record of shard "x.tar" is "x.tar.json"
# Keys become tar member names and, downstream, file names: no separators, no dots, no "..".
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]{0,199}$")
_FIELDS = ("regions.npy", "captions.json", "meta.json")


@dataclass
class ImageSample:
    key: str  # image id; becomes __key__
    regions: np.ndarray  # (k, D) float16 in shards; the writer converts float32
    captions: list[str]  # raw captions
    tokens: list[list[str]]  # tokenised captions (dataio.text.tokenize or the source's own)
    boxes: np.ndarray | None = None  # (k, 4) float32, normalised x0, y0, x1, y1
    meta: dict = field(default_factory=dict)  # source, width, height, split, extractor...


@dataclass
class ShardRecord:
    """Per-shard stats; ``caption_counts[i]`` is the number of captions of the shard's i-th image."""

    name: str  # file name relative to the data set directory, e.g. "shard-000003.tar"
    samples: int
    bytes: int
    sha256: str
    feature_shape: list[int]  # [k_max, D]
    captions: int
    caption_counts: list[int]
    created: float = 0.0
    # Byte boundaries of the samples in the tar: sample i is [offsets[i], offsets[i + 1]) (its
    # members' headers and padded data), so training can read any image by range. None in records
    # written before offsets were kept: :func:`sample_offsets` then reads them from the tar.
    offsets: list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ShardRecord":
        optional = {"created": 0.0, "offsets": None}
        try:
            kw = {k: d[k] for k in cls.__dataclass_fields__ if k not in optional}
            rec = cls(**kw, **{k: d.get(k, v) for k, v in optional.items()})
        except (KeyError, TypeError) as e:
            raise DataError(source, None, f"invalid shard record: {e!r}", "bad_record") from e
        if rec.offsets is not None and len(rec.offsets) != rec.samples + 1:
            raise DataError(source, None, f"invalid shard record: {len(rec.offsets)} offsets for "
                            f"{rec.samples} samples (expected samples + 1)", "bad_record")
        return rec


# ---------------------------------------------------------------------------------------------
# sample encoding and validation (shared by writer and reader)


def check_key(key: Any, shard: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise DataError(shard, str(key), "unsafe or invalid key (allowed: letters, digits, _ + -; "
                        "no '/', '.', '..'; at most 200 characters)", "unsafe_key")
    return key


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # exponent bits all ones = inf/NaN; ~7x faster than np.isfinite here
        return not ((a.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(a).all())


def check_sample(s: ImageSample, shard: str, feature_dim: int | None = None) -> None:
    """Raise :class:`DataError` unless ``s`` is well formed (shapes, finiteness, captions)."""
    check_key(s.key, shard)
    r = s.regions
    if not isinstance(r, np.ndarray) or r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise DataError(shard, s.key, f"regions must be a non-empty (k, D) array, got "
                        f"{getattr(r, 'shape', type(r).__name__)}", "bad_array")
    if r.dtype not in (np.float16, np.float32, np.float64):
        raise DataError(shard, s.key, f"regions dtype must be float16/32, got {r.dtype}", "bad_array")
    if feature_dim is not None and r.shape[1] != feature_dim:
        raise DataError(shard, s.key, f"regions have D={r.shape[1]}, the data set has D={feature_dim}",
                        "bad_array")
    if not _all_finite(r):
        raise DataError(shard, s.key, "regions contain NaN or inf", "non_finite")
    if r.dtype != np.float16 and np.abs(r).max() > np.finfo(np.float16).max:
        raise DataError(shard, s.key, "regions overflow float16 (|x| > 65504)", "non_finite")
    if s.boxes is not None:
        b = s.boxes
        if not isinstance(b, np.ndarray) or b.shape != (r.shape[0], 4) or b.dtype.kind != "f":
            raise DataError(shard, s.key, f"boxes must be float ({r.shape[0]}, 4), got "
                            f"{getattr(b, 'dtype', '?')} {getattr(b, 'shape', '?')}", "bad_array")
        if not np.isfinite(b).all():
            raise DataError(shard, s.key, "boxes contain NaN or inf", "non_finite")
    if not s.captions:
        raise DataError(shard, s.key, "no captions", "bad_caption")
    if len(s.tokens) != len(s.captions):
        raise DataError(shard, s.key, f"{len(s.captions)} captions but {len(s.tokens)} token lists",
                        "bad_caption")
    for raw, toks in zip(s.captions, s.tokens):
        if not isinstance(raw, str) or not raw.strip():
            raise DataError(shard, s.key, f"empty caption {raw!r}", "bad_caption")
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and t for t in toks):
            raise DataError(shard, s.key, f"caption {raw!r} has no valid tokens: {toks!r}",
                            "bad_caption")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(s: ImageSample) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {
        "__key__": s.key,
        "regions.npy": _npy_bytes(np.ascontiguousarray(s.regions, dtype=np.float16)),
        "captions.json": json.dumps({"raw": s.captions, "tokens": s.tokens}).encode(),
        "meta.json": json.dumps(s.meta, sort_keys=True).encode(),
    }
    if s.boxes is not None:
        out["boxes.npy"] = _npy_bytes(np.ascontiguousarray(s.boxes, dtype=np.float32))
    return out


def _load_npy(data: bytes, shard: str, key: str, name: str) -> np.ndarray:
    try:  # never unpickle what a shard contains
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise DataError(shard, key, f"{name} is not a plain numeric .npy: {e}", "bad_array") from e
    except Exception as e:  # truncated header, bad magic
        raise DataError(shard, key, f"{name} is unreadable: {e!r}", "bad_array") from e


def _load_json(data: bytes, shard: str, key: str, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(shard, key, f"{name} is not valid UTF-8: {e}", "bad_caption") from e
    except json.JSONDecodeError as e:
        raise DataError(shard, key, f"{name} is not valid JSON: {e}", "bad_caption") from e


def decode_sample(raw: dict[str, Any], shard: str, feature_dim: int | None = None) -> ImageSample:
    """A validated :class:`ImageSample` from a WebDataset sample dict of bytes."""
    key = check_key(raw.get("__key__"), shard)
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise DataError(shard, key, f"missing field(s) {missing}", "missing_field")
    regions = _load_npy(raw["regions.npy"], shard, key, "regions.npy")
    if regions.dtype != np.float16:
        raise DataError(shard, key, f"regions.npy dtype is {regions.dtype}, expected float16",
                        "bad_array")
    boxes = _load_npy(raw["boxes.npy"], shard, key, "boxes.npy") if "boxes.npy" in raw else None
    caps = _load_json(raw["captions.json"], shard, key, "captions.json")
    if not (isinstance(caps, dict) and isinstance(caps.get("raw"), list)
            and isinstance(caps.get("tokens"), list)):
        raise DataError(shard, key, "captions.json must be {\"raw\": [...], \"tokens\": [[...]]}",
                        "bad_caption")
    meta = _load_json(raw["meta.json"], shard, key, "meta.json")
    if not isinstance(meta, dict):
        raise DataError(shard, key, "meta.json must be an object", "bad_caption")
    s = ImageSample(key, regions, caps["raw"], caps["tokens"], boxes, meta)
    check_sample(s, shard, feature_dim)
    return s


# ---------------------------------------------------------------------------------------------
# writing


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
                          self.offsets)
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
        if n.endswith(".tar") or n.endswith(".tar" + RECORD_SUFFIX) or ".tmp-" in n:
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


def manifest_url(spec: str) -> str:
    return spec if spec.endswith(".json") else storage.join(spec, MANIFEST)


def read_manifest(dest_or_manifest_url: str) -> dict:
    """The manifest of a data set directory (or the manifest URL itself), checked."""
    url = manifest_url(dest_or_manifest_url)
    try:
        m = json.loads(storage.read_bytes(url))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no manifest at {url}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(url, None, f"manifest is not valid JSON: {e}", "bad_record") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise DataError(url, None, f"not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})",
                        "bad_record")
    return m


# ---------------------------------------------------------------------------------------------
# reading one shard


def _group(members: Iterator[dict], url: str) -> Iterator[dict]:
    """Group tar members ``<key>.<field>`` into samples. A key whose field repeats starts a new
    sample (so an adjacent duplicate key is reported as such, not as a broken tar)."""
    cur: dict | None = None
    for m in members:
        key, ext = wds.tariterators.base_plus_ext(m["fname"])
        if key is None:
            raise DataError(url, m["fname"], "tar member name has no <key>.<field> form", "unsafe_key")
        if cur is None or key != cur["__key__"] or ext.lower() in cur:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        cur[ext.lower()] = m["data"]
    if cur is not None:
        yield cur


def raw_samples(url: str) -> Iterator[dict]:
    """Undecoded samples (dicts of bytes keyed by field) of one shard, in order.

    Raises :class:`DataError` naming the shard and the last key read for a corrupt or truncated tar.
    tarfile's stream reader takes a damaged header for the end of the archive, so non-zero bytes
    after that end are reported as corruption too. Member names never become paths: nothing is
    extracted to disk.
    """
    last_key = None
    try:
        with storage.RetryingReader(url) as f:
            pending = None  # the last sample is held back until the end of the tar is checked
            for raw in _group(wds.tariterators.tar_file_iterator(f), url):
                if pending is not None:
                    yield pending
                pending, last_key = raw, raw["__key__"]
            while chunk := f.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise ValueError("data after the end of the archive (damaged member header)")
            if pending is not None:
                yield pending
    except (DataError, storage.StorageError):
        raise
    except FileNotFoundError as e:
        raise DataError(url, None, "shard does not exist", "missing_shard") from e
    except Exception as e:  # tarfile.ReadError, EOFError, ValueError
        raise DataError(url, last_key, f"corrupt or truncated tar at or after this key: {e!r}",
                        "corrupt_tar") from e


def iter_shard(url: str, *, on_error: OnError = "raise", expected: int | None = None,
               feature_dim: int | None = None, start: int = 0, count_from: int = 0,
               counter: SkipCounter = SKIPS) -> Iterator[tuple[int, ImageSample]]:
    """(position in shard, sample) for the valid samples of one shard from position ``start``.

    Bad samples raise :class:`DataError` or, with ``on_error="skip"``, are logged, counted in
    ``counter`` and left out (positions still advance). Samples before ``start`` are passed over
    undecoded (and so unchecked: the reader whose part covers them reports them). ``expected``:
    the record's sample count; fewer samples means the tar was cut at a member boundary, which
    tarfile cannot see. ``count_from``: bad samples before this position are skipped without being
    counted (another reader shares them and counts them).
    """
    check_on_error(on_error)
    n = 0
    seen: set[str] = set()
    try:
        for n, raw in enumerate(raw_samples(url), start=1):
            try:
                if raw["__key__"] in seen:
                    raise DataError(url, raw["__key__"], "duplicate key within shard", "duplicate_key")
                seen.add(raw["__key__"])
                if n - 1 >= start:
                    yield n - 1, decode_sample(raw, url, feature_dim)
            except DataError as e:
                handle(e, on_error, counter if n - 1 >= count_from else SkipCounter())
    except DataError as e:
        if e.kind not in ("corrupt_tar", "missing_shard", "unsafe_key"):
            raise
        handle(e, on_error, counter)
        return
    if expected is not None and n < expected:
        handle(DataError(url, None, f"truncated: {n} samples, the record says {expected}",
                         "corrupt_tar"), on_error, counter)


def read_shard(url: str, **kw: Any) -> Iterator[ImageSample]:
    """The valid samples of one shard (see :func:`iter_shard` for the keyword arguments)."""
    return (s for _, s in iter_shard(url, **kw))


# ---------------------------------------------------------------------------------------------
# reading one sample by byte range


def sample_offsets(url: str) -> list[int]:
    """Sample boundaries of a shard whose record predates ``offsets``, from its members' headers.

    Members of one sample are consecutive (``_group``'s rule): sample i spans from its first
    member's header (``TarInfo.offset`` includes any long-name header) to the end of its last
    member's padded data.
    """
    bounds: list[int] = []
    key, fields, end = None, set(), 0
    try:
        with storage.RetryingReader(url) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                k, ext = wds.tariterators.base_plus_ext(m.name)
                if k != key or ext in fields:
                    bounds.append(m.offset)
                    key, fields = k, set()
                fields.add(ext)
                end = m.offset_data + -(-m.size // 512) * 512
    except storage.StorageError:
        raise
    except FileNotFoundError as e:
        raise DataError(url, None, "shard does not exist", "missing_shard") from e
    except Exception as e:  # tarfile.ReadError, EOFError
        raise DataError(url, key, f"corrupt or truncated tar while indexing it: {e!r}",
                        "corrupt_tar") from e
    return bounds + [end] if bounds else [0]


def decode_range(data: bytes, url: str, index: int, expected_bytes: int,
                 feature_dim: int | None = None) -> ImageSample:
    """The validated sample ``index`` of shard ``url`` from its byte range ``data``."""
    if len(data) != expected_bytes:
        raise DataError(url, None, f"truncated: sample #{index} needs {expected_bytes} bytes, the "
                        f"shard holds {len(data)} there", "corrupt_tar")
    try:
        raws = list(_group(wds.tariterators.tar_file_iterator(io.BytesIO(data)), url))
    except DataError:
        raise
    except Exception as e:
        raise DataError(url, None, f"sample #{index}: corrupt tar members: {e!r}", "corrupt_tar") from e
    if len(raws) != 1:
        keys = [r["__key__"] for r in raws]
        raise DataError(url, keys[0] if keys else None, f"sample #{index}: its byte range holds "
                        f"{len(raws)} samples {keys[:3]}, expected 1 (record offsets do not match "
                        f"the tar)", "bad_record")
    return decode_sample(raws[0], url, feature_dim)
