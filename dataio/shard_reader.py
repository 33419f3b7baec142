"""Reading shards: every sample of one shard in order, or one sample by its byte range."""
from __future__ import annotations

import io
import logging
import tarfile
from typing import Any, Iterator

import webdataset as wds

from dataio import storage
from dataio.errors import SKIPS, DataError, OnError, SkipCounter, check_on_error, handle
from dataio.shards import ImageSample, decode_sample

log = logging.getLogger(__name__)


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
