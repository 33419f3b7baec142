"""Local paths and ``s3://`` URLs behind one small set of functions (fsspec / s3fs).

S3 endpoint, credentials and region come from the standard AWS sources, which botocore (under
s3fs/aiobotocore) resolves by itself: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE`` and ``~/.aws/config``. Nothing here reads or logs a secret.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Sequence, TypeVar

import fsspec

log = logging.getLogger(__name__)

# Environment variables that change which S3 endpoint/account a filesystem talks to: a cached
# filesystem is reused only while they are unchanged (kept in memory as a cache key, never logged).
_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
_fs_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
T = TypeVar("T")


class StorageError(OSError):
    """A read that still failed after every retry: the storage, not the data, is at fault.

    Not a :class:`dataio.errors.DataError`, so ``on_error="skip"`` never hides it."""

    def __init__(self, url: str, attempts: int, cause: BaseException):
        self.url, self.attempts, self.cause = url, attempts, cause
        super().__init__(f"storage error reading {url}: {type(cause).__name__}: {cause} "
                         f"(failed {attempts} time(s); check the endpoint and the network)")


# Errors that retrying cannot mend: the object or file is not there, or the request is wrong.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
              TypeError, KeyError)


@dataclass(frozen=True)
class RetryPolicy:
    """Transient errors (connection refused or reset, timeouts, 5xx) are retried ``retries`` times,
    waiting ``backoff_s`` × 2^attempt in between (s3fs retries each request a few times itself)."""

    retries: int = 4
    backoff_s: float = 1.0

    def run(self, url: str, read: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return read()
            except _PERMANENT:
                raise
            except Exception as err:  # botocore/aiohttp errors are not all OSErrors
                if attempt == self.retries:
                    raise StorageError(url, attempt + 1, err) from err
                wait = self.backoff_s * 2 ** attempt
                log.warning("reading %s failed (%s: %s); retrying in %.1f s", url,
                            type(err).__name__, err, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


DEFAULT_RETRY = RetryPolicy()  # for reads not given a policy (looked up at each call)


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The filesystem for ``url``; one per process and S3 environment (safe after fork)."""
    if not is_s3(url):
        return fsspec.filesystem("file")
    key = (os.getpid(),) + tuple(os.environ.get(name) for name in _S3_ENV)
    fs = _fs_cache.get(key)
    if fs is None:
        import s3fs

        # No listing cache: shards written by other processes must show up at once.
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        _fs_cache[key] = fs
    return fs


def join(base: str, name: str) -> str:
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def dirname(url: str) -> str:
    if is_s3(url):
        return "s3://" + posixpath.dirname(url[len("s3://"):])
    return os.path.dirname(url)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/")) if is_s3(url) else os.path.basename(url)


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    return filesystem(url).open(url, mode)


def exists(url: str) -> bool:
    return filesystem(url).exists(url)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the files directly under ``url``; empty if it does not exist."""
    fs = filesystem(url)
    if not fs.exists(url):
        return []
    return sorted(basename(p) for p in fs.ls(url, detail=False) if basename(p))


def makedirs(url: str) -> None:
    if url and not is_s3(url):  # S3 has no directories
        os.makedirs(url, exist_ok=True)


def remove(url: str) -> None:
    fs = filesystem(url)
    if fs.exists(url):
        fs.rm(url)


def read_bytes(url: str, retry: RetryPolicy | None = None) -> bytes:
    def read() -> bytes:
        with open_url(url, "rb") as f:
            return f.read()
    return (retry or DEFAULT_RETRY).run(url, read)


def read_ranges(url: str, ranges: Sequence[tuple[int, int]],
                retry: RetryPolicy | None = None) -> list[bytes]:
    """The bytes [start, end) of ``url`` for each range (concurrent ranged GETs on S3). A range
    past the end of the file comes back short; the caller checks lengths."""
    if not ranges:
        return []
    retry = retry or DEFAULT_RETRY
    if not is_s3(url):
        def read_local() -> list[bytes]:
            with open(url, "rb") as f:
                out = []
                for start, end in ranges:
                    f.seek(start)
                    out.append(f.read(end - start))
                return out
        return retry.run(url, read_local)
    fs = filesystem(url)

    def read_s3() -> list[bytes]:
        got = fs.cat_ranges([url] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                            on_error="return")
        for item in got:
            if isinstance(item, BaseException):
                raise item
        return got
    return retry.run(url, read_s3)


def cached_copy(url: str, cache_dir: str, size: int, retry: RetryPolicy | None = None) -> str:
    """A local copy of the remote file ``url`` under ``cache_dir`` (downloaded on first use), so
    that many small ranged reads hit the local disk instead of one request each.

    Processes sharing ``cache_dir`` (a node's ranks and workers) download each file once: the first
    takes an exclusive lock on ``<copy>.lock``, the others wait for it. A copy appears under its name
    only when complete (temporary name, then rename); one whose size is not ``size`` (the shard
    record's) is fetched again.
    """
    import fcntl
    import hashlib

    name = hashlib.blake2b(url.encode(), digest_size=10).hexdigest() + "-" + basename(url)
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if os.path.isfile(path) and os.path.getsize(path) == size:
            return path  # another process fetched it while we waited
        with atomic_path(path) as tmp:
            (retry or DEFAULT_RETRY).run(url, lambda: filesystem(url).get_file(url, tmp))
            got = os.path.getsize(tmp)
            if got != size:
                raise StorageError(url, 1, ValueError(f"downloaded {got} bytes, the record says {size}"))
    log.info("cached %s at %s", url, path)
    return path


class RetryingReader:
    """A sequential binary reader of ``url`` that survives transient errors: a failed read is
    retried by reopening at the current position (what a shard scan needs on S3)."""

    def __init__(self, url: str, retry: RetryPolicy | None = None):
        self.url, self.retry, self.pos = url, retry or DEFAULT_RETRY, 0
        self._f: IO[bytes] | None = self.retry.run(url, lambda: open_url(url, "rb"))

    def read(self, n: int = -1) -> bytes:
        def read_once() -> bytes:
            if self._f is None:
                self._f = open_url(self.url, "rb")
                self._f.seek(self.pos)
            try:
                return self._f.read(n)
            except Exception:
                self.close()  # the next attempt reopens at self.pos
                raise
        data = self.retry.run(self.url, read_once)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self._f = None

    def __repr__(self) -> str:  # errors that name their stream (webdataset's, tarfile's) name the URL
        return self.url

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload(path: str | os.PathLike, url: str, retry: RetryPolicy | None = None) -> None:
    """Copies the local file ``path`` to the S3 object ``url`` (retried like a read). S3 shows an
    object only once its upload completed: a kill mid-upload leaves nothing under ``url``."""
    fs = filesystem(url)
    (retry or DEFAULT_RETRY).run(url, lambda: fs.put_file(os.fspath(path), url))


def download(url: str, path: str | os.PathLike, retry: RetryPolicy | None = None) -> None:
    """Copies ``url`` to the local file ``path``, which appears only when complete."""
    with atomic_path(path) as tmp:
        (retry or DEFAULT_RETRY).run(url, lambda: filesystem(url).get_file(url, tmp))


def sizes(url: str) -> dict[str, int]:
    """Size of every object under the prefix ``url`` (names relative to it); empty if none."""
    fs = filesystem(url)
    prefix = url.rstrip("/") + "/"
    found = DEFAULT_RETRY.run(url, lambda: fs.find(prefix, detail=True))
    base = fs._strip_protocol(prefix).rstrip("/") + "/"
    return {key[len(base):]: int(info["size"]) for key, info in found.items() if key.startswith(base)}


def read_many(urls: list[str]) -> dict[str, bytes]:
    """Contents of many small files of one filesystem by URL (concurrent requests on S3)."""
    if not urls:
        return {}
    fs = filesystem(urls[0])
    got = DEFAULT_RETRY.run(urls[0], lambda: fs.cat(urls, on_error="raise"))
    # s3fs keys the result by "bucket/key" (no protocol), the local filesystem by the path given
    return {u: got[u] if u in got else got[fs._strip_protocol(u)] for u in urls}


_TEMP_MARK = ".tmp-"


def temp_name(url: str) -> str:
    """A unique sibling name for writing ``url`` before it is made visible (the one rule)."""
    return f"{url}{_TEMP_MARK}{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is a :func:`temp_name`: never data, a leftover of a killed writer."""
    return _TEMP_MARK in name


def commit(tmp_url: str, url: str) -> None:
    """Make a completely written ``tmp_url`` visible as ``url``.

    Local: ``os.replace`` (atomic on one filesystem). S3: server-side copy, then delete the temporary
    key; an S3 object only appears once its upload or copy has completed.
    """
    if is_s3(url):
        fs = filesystem(url)
        fs.copy(tmp_url, url)
        fs.rm(tmp_url)
    else:
        os.replace(tmp_url, url)


@contextlib.contextmanager
def atomic_path(url: str | os.PathLike, *, durable: bool = False,
                replace: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """The one way this project writes a file so that a crash never leaves half of it under its
    name: yields a temporary sibling (:func:`temp_name`) to write, then makes it ``url``
    (:func:`commit`, or ``replace``); on an error the temporary file is removed.

    ``durable`` flushes the written file to the disk before the rename (local files; a checkpoint's
    ``latest`` pointer wants it, a cache or a report does not).
    """
    url = os.fspath(url)
    makedirs(dirname(url))
    tmp = temp_name(url)
    try:
        yield tmp
        if durable and not is_s3(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        (replace or commit)(tmp, url)
    except BaseException:
        discard(tmp)
        raise


def atomic_write(url: str | os.PathLike, write: Callable[[IO[bytes]], object], **kwargs: object) -> None:
    """``write(f)`` into a binary file that appears as ``url`` only once complete (see
    :func:`atomic_path` for the keywords)."""
    with atomic_path(url, **kwargs) as tmp:
        with open_url(tmp, "wb") as f:
            write(f)


def write_bytes_atomic(url: str | os.PathLike, data: bytes, **kwargs: object) -> None:
    atomic_write(url, lambda f: f.write(data), **kwargs)


def write_text_atomic(url: str | os.PathLike, text: str, **kwargs: object) -> None:
    atomic_write(url, lambda f: f.write(text.encode("utf-8")), **kwargs)


def discard(url: str) -> None:
    try:
        remove(url)
    except OSError:  # best effort: a leftover temporary name is never read as data
        log.warning("could not remove temporary file %s", url)
