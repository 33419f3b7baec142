"""Batch composition of the training pipeline against a uniform shuffle of the epoch's captions.

The reference (kuanghuei/SCAN) indexes captions and shuffles them all, so a batch of 128 is a
uniform draw; hardest negatives are mined inside it. Two figures per batch, averaged over one
epoch of every rank:

- same-image rate: the share of a batch's captions whose image has another caption in the batch
  (those pairs are masked out of the negatives, or, with loss.mask_same_image=false, become false
  negatives);
- spread: where the batch's images sit in the data set (manifest order): the number of distinct
  shards they come from, and the standard deviation of their positions over that of a uniform
  draw (1.0 = as spread as uniform; a batch drawn from a few hundred neighbouring images ~0.01).

The uniform row is a simulated permutation of the same captions cut the same way. The script runs
against any version of ``dataio.pipeline`` (it passes ``shuffle_buffer`` only where the pipeline
still takes one), so a checkout of an older commit prints its own "before" row:

    .venv/bin/python benchmarks/batches.py [--images 29000] [--batch-size 128] [--world 1,2]
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataio.pipeline import caption_batches  # noqa: E402
from dataio.shard_writer import ShardWriter, write_manifest  # noqa: E402
from dataio.shards import ImageSample  # noqa: E402
from dataio.text import Vocab  # noqa: E402


def write_set(dest: str, n: int, shard_size: int) -> str:
    """``n`` images of 5 captions (Flickr30K's train split has 29,000), tiny features: the
    figures depend on the order of keys only."""
    with ShardWriter(dest, split="train", max_samples=shard_size) as w:
        for i in range(n):
            caps = [f"caption {j}" for j in range(5)]
            w.write(ImageSample(f"img{i:07d}", np.ones((1, 4), np.float32), caps, [c.split() for c in caps]))
    write_manifest(dest, w.records, split="train", extractor={"name": "bench"})
    return dest


def batch_figures(batches: list[list[int]], n_images: int, shard_size: int) -> dict[str, float]:
    """Means over batches of image positions (manifest order) of each caption."""
    uniform_std = n_images / np.sqrt(12)
    same, shards, spread = [], [], []
    for images in batches:
        counts = Counter(images)
        same.append(sum(c for c in counts.values() if c > 1) / len(images))
        shards.append(len({i // shard_size for i in images}))
        spread.append(float(np.std(images)) / uniform_std)
    return {"same_image_pct": 100 * float(np.mean(same)), "shards_per_batch": float(np.mean(shards)),
            "spread": float(np.mean(spread))}


def pipeline_batches(spec: str, *, batch_size: int, world: int, workers: int) -> list[list[int]]:
    kw = {"shuffle_buffer": 1000} if "shuffle_buffer" in inspect.signature(caption_batches).parameters else {}
    out = []
    for rank in range(world):
        for b in caption_batches(spec, batch_size=batch_size, encode=Vocab(["caption"]), seed=0, epoch=0,
                                 rank=rank, world=world, num_workers=workers, drop_last=True, **kw):
            out.append([int(k[3:]) for k in b.keys])
    return out


def uniform_batches(n_images: int, *, batch_size: int, world: int, seed: int = 0) -> list[list[int]]:
    images = np.repeat(np.arange(n_images), 5)[np.random.default_rng(seed).permutation(5 * n_images)]
    per_rank = len(images) // world
    out = []
    for r in range(world):
        part = images[r * per_rank:(r + 1) * per_rank]
        out += [part[i:i + batch_size].tolist() for i in range(0, len(part) - batch_size + 1, batch_size)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=29000)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (import-precomp's default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--world", default="1,2", help="world sizes to run")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        spec = write_set(os.path.join(tmp, "train"), args.images, args.shard_size)
        print(f"{args.images} images x 5 captions in shards of {args.shard_size}; batches of "
              f"{args.batch_size}; {args.workers} workers per rank; one epoch")
        print(f"{'pipeline':<22}{'world':>6}{'same-image %':>14}{'shards/batch':>14}{'spread':>8}{'s':>7}")
        for world in [int(w) for w in args.world.split(",")]:
            t = time.perf_counter()
            got = batch_figures(pipeline_batches(spec, batch_size=args.batch_size, world=world,
                                                 workers=args.workers), args.images, args.shard_size)
            seconds = time.perf_counter() - t
            ref = batch_figures(uniform_batches(args.images, batch_size=args.batch_size, world=world),
                                args.images, args.shard_size)
            for name, f, s in (("dataio.pipeline", got, f"{seconds:.0f}"), ("uniform shuffle", ref, "")):
                print(f"{name:<22}{world:>6}{f['same_image_pct']:>14.2f}{f['shards_per_batch']:>14.1f}"
                      f"{f['spread']:>8.3f}{s:>7}")


if __name__ == "__main__":
    main()
