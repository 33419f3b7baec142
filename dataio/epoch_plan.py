"""The epoch plan: which captions each rank trains on, in which order, and what remains after a resume.

Training batches are drawn from a uniform shuffle of the epoch's captions, as the reference's
caption-indexed ``PrecompDataset`` with a shuffling sampler draws them:

1. Caption slots: every image of the data set (manifest order) expands into its captions (at most
   ``caps_per_image``); slot ``s`` is (image, caption). The shard records give the counts, so
   planning reads no shard.
2. The epoch's order is a permutation of all ``C`` slots seeded by ``(seed, epoch)``
   (``resampled``: ``C`` draws with replacement; ``shuffle=False``: manifest order).
3. Rank ``r`` of ``W`` takes the contiguous part ``[r·P, (r+1)·P)`` of the order, ``P = C // W``
   (the ``C mod W`` last slots sit this epoch out), so every rank has the same batches: runs of
   ``batch_size`` consecutive slots, the last one shorter (or dropped with ``drop_last``).

Resume and re-planning. Where an epoch stands is the list of its segments so far:
``(world, captions consumed per rank)``. Replaying them on the order (each splits what remains
into its world's parts, as in 3, and removes the first ``consumed`` slots of each part) leaves
exactly the captions not yet delivered, so a run may continue with another world size, batch size
or worker count and still deliver every caption of the epoch once. Continuing with the same world
size gives the same batches, in the same order, as the uninterrupted epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dataio.shard_index import Shard  # the plan needs only each shard's caption counts


Segment = tuple[int, int]  # (world size, captions consumed per rank) of a run within an epoch


@dataclass(frozen=True)
class CaptionSlots:
    """Every (image, caption) of the data set in manifest order: ``C`` slots over ``G`` images."""

    image: np.ndarray  # (C,) int64 global image index
    caption: np.ndarray  # (C,) int64 caption index within its image
    image_shard: np.ndarray  # (G,) int64 shard of each image
    image_index: np.ndarray  # (G,) int64 position of each image in its shard

    @classmethod
    def of(cls, shards: list[Shard], caps_per_image: int | None) -> "CaptionSlots":
        counts = np.array([_ncaps(c, caps_per_image) for sh in shards for c in sh.caption_counts],
                          dtype=np.int64)
        image = np.repeat(np.arange(len(counts)), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each image's first slot
        caption = np.arange(len(image)) - np.repeat(first, counts)
        image_shard = np.repeat(np.arange(len(shards)), [sh.samples for sh in shards])
        image_index = np.concatenate([np.arange(sh.samples) for sh in shards]) if shards else image
        return cls(image, caption, image_shard, image_index)

    def __len__(self) -> int:
        return len(self.image)


def epoch_order(n_slots: int, *, seed: int, epoch: int, shuffle: bool, resampled: bool) -> np.ndarray:
    """(C,) slot ids of one epoch in delivery order, the same on every rank."""
    if resampled:
        return np.random.default_rng([seed, epoch, 1]).integers(n_slots, size=n_slots)
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(n_slots)
    return np.arange(n_slots)


def rank_parts(order: np.ndarray, world: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The ``world`` equal contiguous parts of ``order`` and the (< world) slots left over."""
    per_rank = len(order) // world
    return [order[r * per_rank:(r + 1) * per_rank] for r in range(world)], order[world * per_rank:]


def remaining_order(order: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
    """The slots of ``order`` not yet delivered after ``segments`` (see the module doc)."""
    for world, consumed in segments:
        if world < 1 or not 0 <= consumed <= len(order) // world:
            raise ValueError(f"resume segment (world={world}, consumed={consumed}) does not fit an "
                             f"epoch of {len(order)} remaining captions: the data set or "
                             f"data.caps_per_image changed since the checkpoint")
        parts, rest = rank_parts(order, world)
        order = np.concatenate([p[consumed:] for p in parts] + [rest])
    return order


@dataclass(frozen=True)
class EpochPlan:
    """This rank's captions of one epoch (what remains of it) cut into batches."""

    slots: np.ndarray  # (P,) slot ids in delivery order
    batch_size: int
    epoch: int
    rank: int

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.slots) / self.batch_size)

    @property
    def rank_captions(self) -> int:
        return len(self.slots)

    def batch(self, i: int) -> np.ndarray:
        return self.slots[i * self.batch_size:(i + 1) * self.batch_size]


def epoch_plan(shards: list[Shard], *, batch_size: int, seed: int, epoch: int, rank: int, world: int,
               shuffle: bool = True, resampled: bool = False, drop_last: bool = False,
               caps_per_image: int | None = None, segments: Sequence[Segment] = ()) -> EpochPlan:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_slots = len(CaptionSlots.of(shards, caps_per_image))
    order = epoch_order(n_slots, seed=seed, epoch=epoch, shuffle=shuffle, resampled=resampled)
    remaining = remaining_order(order, segments)
    mine = rank_parts(remaining, world)[0][rank]
    if not segments and len(mine) == 0:
        raise ValueError(f"{n_slots} captions cannot make one batch of {batch_size} on each of "
                         f"{world} ranks")
    if drop_last:
        mine = mine[:len(mine) - len(mine) % batch_size]
    return EpochPlan(mine, batch_size, epoch, rank)


def _ncaps(count: int, caps_per_image: int | None) -> int:
    return min(count, caps_per_image) if caps_per_image else count
