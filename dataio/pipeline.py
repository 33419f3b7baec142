"""Reading shards for training (caption batches) and evaluation (image records).

Training batches are drawn from a uniform shuffle of the epoch's captions, as the reference's
caption-indexed ``PrecompDataset`` with a shuffling sampler draws them; which captions each rank
takes, in which order, and what remains after a resume is ``dataio.epoch_plan``.

A batch reads each of its images once, by byte range (the shard record keeps each sample's
``[start, end)`` in its tar): local files by seek, ``s3://`` by concurrent ranged GETs (or, with
``cache_dir``, from a local copy of each shard fetched once), retried with backoff
(:class:`dataio.storage.RetryPolicy`). DataLoader workers take batches round-robin.

With ``on_error="skip"`` the captions of a bad image are replaced by repeats of the batch's valid
ones (batch sizes stay equal on every rank); the image is counted once, where its first caption is
met.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from dataio import storage
from dataio.epoch_plan import CaptionSlots, EpochPlan, Segment, epoch_plan
from dataio.errors import SKIPS, DataError, OnError, SkipCounter, check_on_error, handle
from dataio.masks import length_mask
from dataio.ranks import rank_world
from dataio.shard_index import Shard, require_saliency, resolve_shards  # noqa: F401  (readers' API)
from dataio.shard_reader import decode_range, iter_shard, raw_samples, sample_offsets
from dataio.shards import ImageSample
from dataio.text import TextEncoder

log = logging.getLogger(__name__)

Encoder = Union[TextEncoder, Callable[[list[str], str], list[int]]]


# ---------------------------------------------------------------------------------------------
# what to read


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_id(key: str) -> int:
    """Stable 63-bit id of an image key (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


# ---------------------------------------------------------------------------------------------
# batches


@dataclass
class CaptionBatch:
    regions: torch.Tensor  # (B, k, D) float32, zero past img_lens
    img_lens: torch.Tensor  # (B,) int64
    tokens: torch.Tensor  # (B, n) int64, pad_id past cap_lens
    cap_lens: torch.Tensor  # (B,) int64
    image_ids: torch.Tensor  # (B,) int64, image_id(key): equal ids = same image
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped since the last batch
    # (B, k) float32 saliency of each region, zero past img_lens, when every image carries it
    # (saliency.npy); None otherwise. Models other than scan_sal ignore it.
    saliency: torch.Tensor | None = None

    @property
    def region_mask(self) -> torch.Tensor:  # (B, k) bool, True for real regions
        return length_mask(self.img_lens, self.regions.shape[1])

    @property
    def word_mask(self) -> torch.Tensor:  # (B, n) bool, True for real words
        return length_mask(self.cap_lens, self.tokens.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "CaptionBatch":  # called by DataLoader(pin_memory=True)
        return CaptionBatch(self.regions.pin_memory(), self.img_lens.pin_memory(), self.tokens.pin_memory(),
                            self.cap_lens.pin_memory(), self.image_ids.pin_memory(), self.keys, self.skipped,
                            None if self.saliency is None else self.saliency.pin_memory())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "CaptionBatch":
        """The batch on ``device``, its region features and saliency in ``dtype`` (the model's)
        when given."""
        t = {n: getattr(self, n).to(device, non_blocking=non_blocking)
             for n in ("img_lens", "tokens", "cap_lens", "image_ids")}
        regions = self.regions.to(device, dtype, non_blocking=non_blocking)
        saliency = None if self.saliency is None else self.saliency.to(device, dtype, non_blocking=non_blocking)
        return CaptionBatch(regions=regions, **t, keys=self.keys, skipped=self.skipped, saliency=saliency)


def collate(items: list[tuple[ImageSample, list[int]]], pad_id: int) -> CaptionBatch:
    """Pad regions and words of (image, caption ids) pairs into one batch."""
    b = len(items)
    k = max(s.regions.shape[0] for s, _ in items)
    d = items[0][0].regions.shape[1]
    n = max(len(ids) for _, ids in items)
    regions = torch.zeros(b, k, d, dtype=torch.float32)
    tokens = torch.full((b, n), pad_id, dtype=torch.int64)
    with_saliency = all(s.saliency is not None for s, _ in items)
    saliency = torch.zeros(b, k, dtype=torch.float32) if with_saliency else None
    for i, (s, ids) in enumerate(items):
        regions[i, : s.regions.shape[0]].copy_(torch.from_numpy(s.regions))  # float16 -> float32 in torch (fast)
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        if saliency is not None:
            saliency[i, : s.regions.shape[0]] = torch.from_numpy(s.saliency)
    return CaptionBatch(
        regions,
        torch.tensor([s.regions.shape[0] for s, _ in items], dtype=torch.int64),
        tokens,
        torch.tensor([len(ids) for _, ids in items], dtype=torch.int64),
        torch.tensor([image_id(s.key) for s, _ in items], dtype=torch.int64),
        [s.key for s, _ in items],
        saliency=saliency,
    )


# ---------------------------------------------------------------------------------------------
# making a batch


@dataclass
class _Source:
    """What every worker needs to make any batch of the plan (picklable: sent to workers)."""

    shards: list[Shard]
    plan: EpochPlan
    encode: Encoder
    pad_id: int
    on_error: OnError
    caps_per_image: int | None
    max_words: int
    retry: storage.RetryPolicy
    cache_dir: str  # local copies of remote shards ("" : ranged reads from the store)
    augment: Any = None  # dataio.augment.PixelAugment for stored pixels (cut=all), or None


def encode_caption(enc: Encoder, tokens: list[str], raw: str, max_words: int = 0) -> list[int]:
    """A caption's ids as training sees them: ``enc`` (a TextEncoder or a callable) on its tokens
    and raw text, truncated to ``max_words`` when > 0 (``data.max_words``)."""
    ids = enc.encode(tokens, raw) if hasattr(enc, "encode") else enc(tokens, raw)
    return list(ids[:max_words]) if max_words else list(ids)


def _encode(src: _Source, tokens: list[str], raw: str) -> list[int]:
    return encode_caption(src.encode, tokens, raw, src.max_words)


class _BatchDataset(Dataset):
    """Batch ``i`` of the plan, from any worker: each of its images read once by byte range."""

    def __init__(self, src: _Source):
        self.src = src
        self._slots: CaptionSlots | None = None  # built lazily in each worker
        self._offsets: dict[int, Sequence[int]] = {}  # shard -> sample bounds (old records: read)

    def __len__(self) -> int:
        return self.src.plan.num_batches

    def __getitem__(self, i: int) -> CaptionBatch:
        counter = SkipCounter()
        items = self._items(i, counter)
        n = len(self)
        for j in range(1, n):  # every image of batch i was bad: repeat the next batch's captions
            if items:
                break
            items = self._items((i + j) % n, SkipCounter())  # counted where they are delivered
        if not items:
            raise DataError(self.src.shards[0].url, None, f"rank {self.src.plan.rank}: no valid "
                            f"samples in any batch of the epoch", "empty")
        size = len(self.src.plan.batch(i))
        for k in range(size - len(items)):  # skipped captions: repeats keep the batch size
            items.append(items[k])
        b = collate(items, self.src.pad_id)
        b.skipped = counter.get()
        return b

    def _items(self, i: int, counter: SkipCounter) -> list[tuple[ImageSample, list[int]]]:
        """(image, caption ids) of batch ``i``'s valid captions, in order."""
        src = self.src
        if self._slots is None:
            self._slots = CaptionSlots.of(src.shards, src.caps_per_image)
        slots = src.plan.batch(i)
        images = self._slots.image[slots]
        samples = self._read_images(sorted(set(images.tolist())), counter,
                                    first_captions=set(images[self._slots.caption[slots] == 0].tolist()))
        if src.augment is not None:  # each image of the batch once, drawn per (epoch, rank, batch, key)
            plan = src.plan
            samples = {g: src.augment(s, src.augment.rng(s.key, plan.epoch, plan.rank, i))
                       for g, s in samples.items()}
        items = []
        for slot, g in zip(slots.tolist(), images.tolist()):
            s = samples.get(g)
            if s is None:
                continue  # a bad image, counted where its first caption is met
            j = int(self._slots.caption[slot])
            ids = _encode(src, s.tokens[j], s.captions[j]) if j < len(s.captions) else None
            if not ids:
                url = src.shards[int(self._slots.image_shard[g])].url
                problem = (f"caption {s.captions[j]!r} encodes to no tokens" if ids is not None else
                           f"{len(s.captions)} captions, the record says at least {j + 1}")
                handle(DataError(url, s.key, problem, "bad_caption"), src.on_error, counter)
                continue
            items.append((s, ids))
        return items

    def _read_images(self, images: list[int], counter: SkipCounter, first_captions: set[int]
                     ) -> dict[int, ImageSample]:
        """Global image index -> decoded sample; bad images are left out (or raise)."""
        src, slots = self.src, self._slots
        assert slots is not None
        by_shard: dict[int, list[int]] = {}
        for g in images:
            by_shard.setdefault(int(slots.image_shard[g]), []).append(g)
        out = {}
        for shard_idx, members in by_shard.items():
            shard = src.shards[shard_idx]
            try:
                bounds = self._bounds(shard_idx)
                idx = [int(slots.image_index[g]) for g in members]
                blobs = storage.read_ranges(self._location(shard),
                                            [(bounds[j], bounds[j + 1]) for j in idx], src.retry)
            except FileNotFoundError as e:
                blobs, failure = None, DataError(shard.url, None, "shard does not exist", "missing_shard")
                failure.__cause__ = e
            except DataError as e:
                blobs, failure = None, e
            for n, g in enumerate(members):
                try:
                    if blobs is None:
                        raise failure
                    j = idx[n]
                    out[g] = decode_range(blobs[n], shard.url, j, bounds[j + 1] - bounds[j],
                                          shard.feature_dim)
                except DataError as e:
                    handle(e, src.on_error, counter if g in first_captions else SkipCounter())
        return out

    def _location(self, shard: Shard) -> str:
        """Where to read ``shard`` by range: its URL, or a local copy of a remote one."""
        cache = self.src.cache_dir
        if not cache or not storage.is_s3(shard.url) or not shard.bytes:
            return shard.url
        return storage.cached_copy(shard.url, cache, shard.bytes, self.src.retry)

    def _bounds(self, shard_idx: int) -> Sequence[int]:
        shard = self.src.shards[shard_idx]
        if shard.offsets is not None:
            return shard.offsets
        if shard_idx not in self._offsets:  # records written before offsets were kept
            bounds = sample_offsets(shard.url)
            if len(bounds) != shard.samples + 1:
                raise DataError(shard.url, None, f"truncated: {len(bounds) - 1} samples, the record "
                                f"says {shard.samples}", "corrupt_tar")
            self._offsets[shard_idx] = bounds
        return self._offsets[shard_idx]


class CaptionLoader:
    """Iterable of :class:`CaptionBatch` for what remains of one epoch on one rank; ``len()`` is its
    batch count (equal on every rank). Skip counts from workers are added to
    :data:`dataio.errors.SKIPS`."""

    def __init__(self, src: _Source, num_workers: int, pin_memory: bool):
        self.plan = src.plan
        self._src = src
        self._loader = DataLoader(_BatchDataset(src), batch_size=None, shuffle=False,
                                  num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=False)

    def __len__(self) -> int:
        return self.plan.num_batches

    def __iter__(self) -> Iterator[CaptionBatch]:
        skipped = SkipCounter()  # this epoch's, for the summary line
        batches = iter(self._loader)
        try:
            for b in batches:
                if b.skipped:
                    SKIPS.merge(b.skipped)
                    skipped.merge(b.skipped)
                yield b
        finally:
            # An epoch left by an error stops its workers now. Left to the garbage collector (the
            # error's traceback holds this frame in a cycle), the iterator would be copied into the
            # next loader's forked workers and finalized there, where joining processes that are not
            # the worker's children fails: an exception inside a collection, at any allocation.
            shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own __del__ calls it
            if shutdown is not None:
                shutdown()
        if skipped.total():
            log.warning("rank %d epoch %d: skipped %d bad samples %s (replaced by repeats)",
                        self.plan.rank, self.plan.epoch, skipped.total(), skipped.get())


@dataclass(frozen=True)
class LoaderSpec:
    """What the training loader reads, and how: every choice but the epoch. Built once from a
    config (``trainer.train.loader_spec``); :meth:`plan` and :meth:`batches` then serve any epoch.

    ``encode``: a :class:`dataio.text.Vocab` / ``HFTokenizer`` (anything with ``encode(tokens, raw)``
    and ``pad_id``) or a function ``(tokens, raw) -> ids`` (needed by :meth:`batches` only).
    ``rank`` / ``world``: None reads the launcher's (``dataio.ranks``). ``cache_dir``: keep local
    copies of ``s3://`` shards there (one request per shard instead of one per image).
    ``augment``: a `dataio.augment.PixelAugment` applied to every image in the workers (shards of
    stored pixels only).
    """
    spec: str  # manifest URL, data set folder, or brace pattern of .tar URLs
    batch_size: int
    encode: Encoder | None = None
    seed: int = 0
    rank: int | None = None
    world: int | None = None
    num_workers: int = 2
    shuffle: bool = True
    resampled: bool = False
    on_error: OnError = "raise"
    drop_last: bool = False
    caps_per_image: int | None = None
    max_words: int = 0
    pad_id: int | None = None
    pin_memory: bool = False
    retry: storage.RetryPolicy | None = None
    cache_dir: str = ""
    augment: Any = None

    def plan(self, epoch: int, segments: Sequence[Segment] = (),
             shards: list[Shard] | None = None) -> EpochPlan:
        """This rank's plan of what remains of ``epoch`` after ``segments`` (reads no shard)."""
        rank, world = rank_world(self.rank, self.world)
        return epoch_plan(shards if shards is not None else resolve_shards(self.spec),
                          batch_size=self.batch_size, seed=self.seed, epoch=epoch, rank=rank,
                          world=world, shuffle=self.shuffle, resampled=self.resampled,
                          drop_last=self.drop_last, caps_per_image=self.caps_per_image,
                          segments=segments)

    def batches(self, epoch: int, segments: Sequence[Segment] = ()) -> CaptionLoader:
        """Caption-level training batches of what remains of ``epoch`` for this rank (see the
        module doc); ``segments``: the epoch's runs so far, ``[(world, captions consumed per rank),
        ...]``, to resume after (any world size)."""
        check_on_error(self.on_error)
        rank_world(self.rank, self.world)  # a bad rank is named before any shard is read
        if self.encode is None:
            raise ValueError("LoaderSpec.batches: no caption encoder (encode)")
        shards = resolve_shards(self.spec)
        plan = self.plan(epoch, segments, shards)
        pad_id = getattr(self.encode, "pad_id", 0) if self.pad_id is None else self.pad_id
        if not self.cache_dir and plan.rank == 0 and epoch == 0 and storage.is_s3(shards[0].url):
            log.info("reading s3:// shards by range, one request per image; data.cache_dir keeps a "
                     "local copy of each shard instead (measured: ~6x the images/s on a local S3 server)")
        src = _Source(shards, plan, self.encode, pad_id, self.on_error, self.caps_per_image,
                      self.max_words, self.retry or storage.DEFAULT_RETRY, self.cache_dir, self.augment)
        return CaptionLoader(src, max(self.num_workers, 0), self.pin_memory)


def caption_batches(spec: str, *, epoch: int, segments: Sequence[Segment] = (),
                    **options: Any) -> CaptionLoader:
    """``LoaderSpec(spec, **options).batches(epoch, segments)``: one epoch's batches in one call."""
    return LoaderSpec(spec, **options).batches(epoch, segments)


# ---------------------------------------------------------------------------------------------
# evaluation and vocabulary


def image_records(spec: str, *, rank: int | None = None, world: int | None = None,
                  on_error: OnError = "raise", limit: int = 0) -> Iterator[ImageSample]:
    """Images in manifest order; rank ``r`` of ``W`` gets the contiguous block
    ``[r * N // W, (r + 1) * N // W)`` of the ``N`` images (for sharded evaluation), where ``N`` is
    the split's size or, when smaller, ``limit`` > 0 (its first images: validation subsets)."""
    check_on_error(on_error)
    rank, world = rank_world(rank, world)
    shards = resolve_shards(spec)
    n = sum(s.samples for s in shards)
    n = min(n, limit) if limit > 0 else n
    a, b = rank * n // world, (rank + 1) * n // world
    pos = 0
    for sh in shards:
        if pos + sh.samples > a and pos < b:
            for idx, s in iter_shard(sh.url, on_error=on_error, expected=sh.samples,
                                     feature_dim=sh.feature_dim, start=max(a - pos, 0)):
                if pos + idx >= b:
                    break
                yield s
        pos += sh.samples
        if pos >= b:
            return


def iter_captions(spec: str, limit: int = 0, on_error: OnError = "raise",
                  counter: SkipCounter = SKIPS) -> Iterator[tuple[list[str], str]]:
    """(tokens, raw caption) of every caption of every image, or of the first ``limit`` images
    (> 0), in manifest order; reads only ``captions.json``. With ``on_error="skip"`` an unreadable
    sample, or the rest of a corrupt or truncated shard, is logged, counted in ``counter`` and left out."""
    check_on_error(on_error)
    images = 0
    for sh in resolve_shards(spec):
        try:
            for raw in raw_samples(sh.url):
                if limit and images >= limit:
                    return
                images += 1
                try:
                    caps = json.loads(raw["captions.json"].decode("utf-8"))
                    pairs = list(zip(caps["tokens"], caps["raw"]))
                except (KeyError, TypeError, ValueError) as e:
                    err = DataError(sh.url, raw.get("__key__"), f"unreadable captions.json: {e!r}",
                                    "bad_caption")
                    err.__cause__ = e
                    handle(err, on_error, counter)
                    continue
                yield from pairs
        except DataError as e:  # a missing, corrupt or truncated shard: the rest of it is lost
            if e.kind not in ("corrupt_tar", "missing_shard", "unsafe_key"):
                raise
            handle(e, on_error, counter)


def iter_tokens(spec: str, on_error: OnError = "raise") -> Iterator[list[str]]:
    """Tokenised captions of every image (reads only ``captions.json``), e.g. for ``build_vocab``."""
    for tokens, _ in iter_captions(spec, on_error=on_error):
        yield tokens
