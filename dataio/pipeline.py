"""Reading shards for training (caption batches) and evaluation (image records).

How an epoch is cut (the choice behind "every rank gets the same number of batches"):

1. The shard list (manifest order, or a brace pattern with per-shard records) is permuted with
   ``seed + epoch`` when shuffling, identically on every rank.
2. Every image expands into its captions; concatenating the shards gives one caption stream of
   ``C`` positions (known from the records' ``caption_counts`` without reading any shard).
3. Rank ``r`` takes positions ``[r * C // W, (r + 1) * C // W)``: every rank has exactly
   ``C // W`` captions, so the same batch count and batch sizes, however few shards there are.
   The ``C mod W`` (< W) last positions are left out of that epoch (different ones each epoch when
   shuffling); every other caption is delivered exactly once per epoch over all ranks and workers.
   With ``drop_last`` the rank also leaves out its last partial batch.
4. Within a rank, batch ``i`` is produced by DataLoader worker role ``i % NW`` (the DataLoader's own
   round-robin order); each role reads one contiguous span of the rank's positions, so it opens
   only the shards it overlaps (at most one shard is read by two roles or ranks).
5. Each role shuffles its captions with a buffer seeded by ``(seed, epoch, rank, role)``.

Resuming at ``start_sample`` (captions this rank already consumed this epoch, a multiple of the
batch size) replays each role's stream and drops what was consumed, and rotates worker roles, so
the remaining batches are the same, in the same order, as in the uninterrupted epoch.

``resampled=True`` draws whole shards with replacement (seeded the same way) until each role has
the same number of captions as above: equal batches, no exactly-once guarantee.

With ``on_error="skip"`` bad samples are left out and counted; a role that runs short goes over its
span again (repeats) so batch counts stay equal.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataio import storage
from dataio.errors import SKIPS, DataError, OnError, SkipCounter, check_on_error, handle
from dataio.shards import RECORD_SUFFIX, ImageSample, ShardRecord, iter_shard, raw_samples, read_manifest
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


@dataclass(frozen=True)
class Shard:
    url: str
    caption_counts: tuple[int, ...]  # per image, in shard order
    feature_dim: int

    @property
    def samples(self) -> int:
        return len(self.caption_counts)


def resolve_shards(spec: str) -> list[Shard]:
    """Shards of a manifest URL, a data set directory holding ``manifest.json``, or a brace pattern
    of ``.tar`` URLs (each needs its ``.tar.json`` record, for the sample counts)."""
    if spec.endswith(".json") or not spec.endswith(".tar"):
        m = read_manifest(spec)
        base = storage.dirname(spec) if spec.endswith(".json") else spec
        d = m["feature_shape"][1]
        recs = [ShardRecord.from_dict(r, spec) for r in m["shards"]]
        return [Shard(storage.join(base, r.name), tuple(r.caption_counts), d) for r in recs]
    urls = list(braceexpand(spec))
    try:
        blobs = storage.read_many([u + RECORD_SUFFIX for u in urls])
    except FileNotFoundError:
        missing = next(u for u in urls if not storage.exists(u + RECORD_SUFFIX))
        raise FileNotFoundError(f"shard {missing} has no record {missing + RECORD_SUFFIX}: it is not "
                                f"committed, or was not written by dataio") from None
    shards = []
    for url in urls:
        rec = ShardRecord.from_dict(json.loads(blobs[url + RECORD_SUFFIX]), url)
        shards.append(Shard(url, tuple(rec.caption_counts), rec.feature_shape[1]))
    if len({s.feature_dim for s in shards}) > 1:
        raise DataError(spec, None, "shards disagree on the feature dimension", "bad_record")
    return shards


def default_rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else RANK / WORLD_SIZE, else 0 / 1."""
    if rank is None or world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world = w if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    return rank, world


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

    @property
    def region_mask(self) -> torch.Tensor:  # (B, k) bool, True for real regions
        return torch.arange(self.regions.shape[1], device=self.img_lens.device) < self.img_lens[:, None]

    @property
    def word_mask(self) -> torch.Tensor:  # (B, n) bool, True for real words
        return torch.arange(self.tokens.shape[1], device=self.cap_lens.device) < self.cap_lens[:, None]

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "CaptionBatch":  # called by DataLoader(pin_memory=True)
        return CaptionBatch(self.regions.pin_memory(), self.img_lens.pin_memory(), self.tokens.pin_memory(),
                            self.cap_lens.pin_memory(), self.image_ids.pin_memory(), self.keys, self.skipped)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CaptionBatch":
        t = {n: getattr(self, n).to(device, non_blocking=non_blocking)
             for n in ("regions", "img_lens", "tokens", "cap_lens", "image_ids")}
        return CaptionBatch(**t, keys=self.keys, skipped=self.skipped)


def collate(items: list[tuple[ImageSample, list[int]]], pad_id: int) -> CaptionBatch:
    """Pad regions and words of (image, caption ids) pairs into one batch."""
    b = len(items)
    k = max(s.regions.shape[0] for s, _ in items)
    d = items[0][0].regions.shape[1]
    n = max(len(ids) for _, ids in items)
    regions = torch.zeros(b, k, d, dtype=torch.float32)
    tokens = torch.full((b, n), pad_id, dtype=torch.int64)
    for i, (s, ids) in enumerate(items):
        regions[i, : s.regions.shape[0]].copy_(torch.from_numpy(s.regions))  # float16 -> float32 in torch (fast)
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return CaptionBatch(
        regions,
        torch.tensor([s.regions.shape[0] for s, _ in items], dtype=torch.int64),
        tokens,
        torch.tensor([len(ids) for _, ids in items], dtype=torch.int64),
        torch.tensor([image_id(s.key) for s, _ in items], dtype=torch.int64),
        [s.key for s, _ in items],
    )


# ---------------------------------------------------------------------------------------------
# the epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """How this rank's part of one epoch is cut into batches and worker roles (see module doc)."""

    order: tuple[int, ...]  # shard indices in reading order
    rank_start: int  # first global caption position of this rank
    rank_captions: int  # captions this rank delivers (equal on every rank)
    batch_size: int
    num_roles: int

    @property
    def num_batches(self) -> int:
        return math.ceil(self.rank_captions / self.batch_size)

    def role_batches(self, role: int) -> int:
        return len(range(role, self.num_batches, self.num_roles))

    def role_span(self, role: int) -> tuple[int, int]:
        """[start, end) rank-relative caption positions read by ``role``."""
        start = sum(self._captions_of_role(r) for r in range(role))
        return start, start + self._captions_of_role(role)

    def _captions_of_role(self, role: int) -> int:
        # Only the role producing the last batch has a partial one.
        nb = self.role_batches(role)
        last = (self.num_batches - 1) % self.num_roles if self.num_batches else -1
        if role == last:
            return (nb - 1) * self.batch_size + (self.rank_captions - (self.num_batches - 1) * self.batch_size)
        return nb * self.batch_size


def epoch_plan(shards: list[Shard], *, batch_size: int, seed: int, epoch: int, rank: int, world: int,
               num_roles: int, shuffle: bool, drop_last: bool, caps_per_image: int | None) -> EpochPlan:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = tuple(np.random.default_rng([seed, epoch]).permutation(len(shards))) if shuffle else tuple(range(len(shards)))
    total = sum(_caption_total(shards[i], caps_per_image) for i in order)
    per_rank = total // world
    if drop_last:
        per_rank -= per_rank % batch_size
    if per_rank == 0:
        raise ValueError(f"{total} captions cannot make one batch of {batch_size} on each of {world} ranks")
    return EpochPlan(tuple(int(i) for i in order), rank * (total // world), per_rank, batch_size, num_roles)


def _caption_total(shard: Shard, caps_per_image: int | None) -> int:
    return sum(_ncaps(c, caps_per_image) for c in shard.caption_counts)


def _ncaps(count: int, caps_per_image: int | None) -> int:
    return min(count, caps_per_image) if caps_per_image else count


# ---------------------------------------------------------------------------------------------
# the per-worker stream


@dataclass
class _Source:
    """What every worker needs to produce its batches (picklable: sent to spawned workers)."""

    shards: list[Shard]
    plan: EpochPlan
    encode: Encoder
    pad_id: int
    seed: int
    epoch: int
    rank: int
    shuffle_buffer: int
    resampled: bool
    start_batch: int
    on_error: OnError
    caps_per_image: int | None
    max_words: int


def _encode(src: _Source, tokens: list[str], raw: str) -> list[int]:
    enc = src.encode
    ids = enc.encode(tokens, raw) if hasattr(enc, "encode") else enc(tokens, raw)
    return list(ids[: src.max_words]) if src.max_words else list(ids)


def _captions_in(src: _Source, shard: Shard, lo: int, hi: int, counter: SkipCounter
                 ) -> Iterator[tuple[ImageSample, list[int]]]:
    """(image, caption ids) for the shard-relative caption positions [lo, hi)."""
    starts = np.concatenate([[0], np.cumsum([_ncaps(c, src.caps_per_image) for c in shard.caption_counts])])
    first_img = int(np.searchsorted(starts, lo, side="right")) - 1
    for idx, s in iter_shard(shard.url, on_error=src.on_error, expected=shard.samples,
                             feature_dim=shard.feature_dim, start=first_img, counter=counter,
                             # an image straddling lo is counted by the reader of its first caption
                             count_from=first_img + int(starts[first_img] < lo)):
        if starts[idx] >= hi:
            return
        n = _ncaps(shard.caption_counts[idx], src.caps_per_image)
        if len(s.captions) < n:
            handle(DataError(shard.url, s.key, f"{len(s.captions)} captions, the record says {n}",
                             "bad_caption"), src.on_error, counter)
            continue
        for j in range(max(lo - starts[idx], 0), min(hi - starts[idx], n)):
            ids = _encode(src, s.tokens[j], s.captions[j])
            if not ids:  # a zero-length caption would give NaN features downstream
                handle(DataError(shard.url, s.key, f"caption {s.captions[j]!r} encodes to no tokens",
                                 "bad_caption"), src.on_error, counter)
                continue
            yield s, ids


def _span_stream(src: _Source, a: int, b: int, counter: SkipCounter) -> Iterator[tuple[ImageSample, list[int]]]:
    """The captions of global positions [a, b) of the epoch's shard order."""
    pos = 0
    for i in src.plan.order:
        sh = src.shards[i]
        n = _caption_total(sh, src.caps_per_image)
        if pos + n > a and pos < b:
            yield from _captions_in(src, sh, max(a - pos, 0), min(b - pos, n), counter)
        pos += n
        if pos >= b:
            return


def _role_stream(src: _Source, role: int, counter: SkipCounter) -> Iterator[tuple[ImageSample, list[int]]]:
    """Exactly ``size`` captions for ``role``: its span (repeated if bad samples were skipped), or
    shards drawn with replacement in resampled mode."""
    lo, hi = src.plan.role_span(role)
    size = hi - lo
    if size == 0:
        return
    rng = np.random.default_rng([src.seed, src.epoch, src.rank, role, 1])
    produced, passes, empty = 0, 0, 0  # empty: consecutive passes that gave nothing
    while produced < size:
        if src.resampled:
            sh = src.shards[int(rng.integers(len(src.shards)))]
            stream = _captions_in(src, sh, 0, _caption_total(sh, src.caps_per_image), counter)
        else:
            a = src.plan.rank_start + lo
            # After the first pass, skipped samples are counted already: count into a scratch counter.
            stream = _span_stream(src, a, a + size, counter if passes == 0 else SkipCounter())
        got = 0
        for item in stream:
            yield item
            got += 1
            produced += 1
            if produced == size:
                return
        passes += 1
        empty = empty + 1 if got == 0 else 0
        if empty and not src.resampled:
            raise DataError(src.shards[src.plan.order[0]].url, None,
                            f"rank {src.rank} worker role {role}: no valid samples in its span", "empty")
        if empty > 100 * len(src.shards):
            raise DataError(src.shards[0].url, None, "resampling drew only shards without valid samples",
                            "empty")


def _shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    if buffer <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < buffer:
            buf.append(x)
            continue
        j = int(rng.integers(buffer))
        yield buf[j]
        buf[j] = x
    for j in rng.permutation(len(buf)):
        yield buf[j]


class _CaptionDataset(IterableDataset):
    def __init__(self, src: _Source):
        self.src = src

    def __iter__(self) -> Iterator[CaptionBatch]:
        src = self.src
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if nw != src.plan.num_roles:
            raise RuntimeError(f"plan made for {src.plan.num_roles} workers, running {nw}")
        role = (wid + src.start_batch) % nw  # rotation keeps the batch order on resume
        consumed = len(range(role, src.start_batch, nw))  # this role's batches already delivered
        counter = SkipCounter()
        rng = np.random.default_rng([src.seed, src.epoch, src.rank, role, 2])
        stream = _shuffled(_role_stream(src, role, counter), src.shuffle_buffer, rng)
        bs = src.plan.batch_size
        batch: list = []
        for n, item in enumerate(stream):
            if n < consumed * bs:
                continue
            batch.append(item)
            if len(batch) == bs:
                yield self._batch(batch, counter)
                batch = []
        if batch:
            yield self._batch(batch, counter)

    def _batch(self, items: list, counter: SkipCounter) -> CaptionBatch:
        b = collate(items, self.src.pad_id)
        b.skipped = counter.get()
        counter.reset()
        return b


class CaptionLoader:
    """Iterable of :class:`CaptionBatch` for one epoch of one rank; ``len()`` is its batch count
    (equal on every rank). Skip counts from workers are added to :data:`dataio.errors.SKIPS`."""

    def __init__(self, src: _Source, num_workers: int, pin_memory: bool):
        self.plan = src.plan
        self._src = src
        self._loader = DataLoader(_CaptionDataset(src), batch_size=None, num_workers=num_workers,
                                  pin_memory=pin_memory, persistent_workers=False)

    def __len__(self) -> int:
        return self.plan.num_batches - self._src.start_batch

    def __iter__(self) -> Iterator[CaptionBatch]:
        skipped = SkipCounter()  # this epoch's, for the summary line
        for b in self._loader:
            if b.skipped:
                SKIPS.merge(b.skipped)
                skipped.merge(b.skipped)
            yield b
        if skipped.total():
            log.warning("rank %d epoch %d: skipped %d bad samples %s (replaced by repeats)",
                        self._src.rank, self._src.epoch, skipped.total(), skipped.get())


def caption_batches(spec: str, *, batch_size: int, encode: Encoder, seed: int, epoch: int,
                    rank: int | None = None, world: int | None = None, num_workers: int = 2,
                    shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                    start_sample: int = 0, on_error: OnError = "raise", drop_last: bool = False,
                    caps_per_image: int | None = None, max_words: int = 0,
                    pad_id: int | None = None, pin_memory: bool = False) -> CaptionLoader:
    """Caption-level training batches of one epoch for this rank (see the module doc for the split).

    ``encode``: a :class:`dataio.text.Vocab` / ``HFTokenizer`` (anything with ``encode(tokens, raw)``
    and ``pad_id``) or a function ``(tokens, raw) -> ids``. ``start_sample``: captions this rank has
    already consumed in this epoch (a multiple of ``batch_size``) to resume from.
    """
    check_on_error(on_error)
    rank, world = default_rank_world(rank, world)
    shards = resolve_shards(spec)
    roles = max(num_workers, 1)
    plan = epoch_plan(shards, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world=world,
                      num_roles=roles, shuffle=shuffle, drop_last=drop_last, caps_per_image=caps_per_image)
    if start_sample % batch_size or not 0 <= start_sample <= plan.rank_captions:
        raise ValueError(f"start_sample={start_sample} must be a multiple of batch_size={batch_size} "
                         f"within this rank's {plan.rank_captions} captions")
    if pad_id is None:
        pad_id = getattr(encode, "pad_id", 0)
    src = _Source(shards, plan, encode, pad_id, seed, epoch, rank, shuffle_buffer, resampled,
                  start_sample // batch_size, on_error, caps_per_image, max_words)
    return CaptionLoader(src, num_workers, pin_memory)


# ---------------------------------------------------------------------------------------------
# evaluation and vocabulary


def image_records(spec: str, *, rank: int | None = None, world: int | None = None,
                  on_error: OnError = "raise") -> Iterator[ImageSample]:
    """Images in manifest order; rank ``r`` of ``W`` gets the contiguous block
    ``[r * N // W, (r + 1) * N // W)`` of the ``N`` images (for sharded evaluation)."""
    check_on_error(on_error)
    rank, world = default_rank_world(rank, world)
    shards = resolve_shards(spec)
    n = sum(s.samples for s in shards)
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


def iter_tokens(spec: str) -> Iterator[list[str]]:
    """Tokenised captions of every image (reads only ``captions.json``), e.g. for ``build_vocab``."""
    for sh in resolve_shards(spec):
        for raw in raw_samples(sh.url):
            try:
                caps = json.loads(raw["captions.json"].decode("utf-8"))
                yield from caps["tokens"]
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(sh.url, raw.get("__key__"), f"unreadable captions.json: {e!r}",
                                "bad_caption") from e
