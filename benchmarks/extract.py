"""Images/s of feature extraction: a plain single-process loop vs the Ray job at 1 and 2 workers.

All modes run the same work on the same images: decode + preprocess, extract, write the same
shards (`cluster.extract_unit.extract_unit`), so the difference is the job's orchestration (Ray, actors,
per-unit scheduling, stats). Torch threads are shared fairly: the plain loop and a 1-worker job
use every core; with W workers each actor gets cores / W.

    .venv/bin/python benchmarks/extract.py --limit 256
    .venv/bin/python benchmarks/extract.py --backbone efficientnet-lite2 --workers 1

Prints a table; "steady" rates exclude start-up (loading the model, starting Ray and the actors),
"end-to-end" rates include it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scan.features.backbones import identify, load_backbone
from cluster.local_ray import ray  # before any other ray import: the local Ray stays on loopback
from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.extract_unit import extract_unit, plan_units
from dataio.sources.karpathy import karpathy_items

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k")


def plain_loop(items, backbone: str, image_size: int | None, dest: str, args) -> dict:
    """The baseline: one process, all cores, the same per-unit work as an actor."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    bb = load_backbone(backbone, image_size=image_size)
    identity = identify(backbone, image_size)
    t1 = time.perf_counter()
    for unit in plan_units(items, args.images_per_shard):
        extract_unit(bb, unit, dest, fingerprint=unit.fingerprint(identity), run_id="plain",
                     batch_size=args.batch_size, decode_threads=args.decode_threads)
    t2 = time.perf_counter()
    return {"startup": t1 - t0, "extract": t2 - t1}


def ray_job(items, backbone: str, image_size: int | None, dest: str, workers: int, args) -> dict:
    cores = os.cpu_count() or 1
    cfg = JobConfig(dest=dest, backbone=backbone, image_size=image_size,
                    images_per_shard=args.images_per_shard, batch_size=args.batch_size,
                    workers=workers, cpus_per_worker=max(1, cores // workers),
                    decode_threads=args.decode_threads, progress=False)
    summary = run_job(items, cfg)
    if summary.units_failed or summary.images_computed != len(items):
        raise RuntimeError(f"job incomplete: {summary.units_failed}")
    return {"startup": summary.startup_seconds, "extract": summary.extract_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--karpathy", default=f"{DATA}/dataset_flickr8k.json")
    p.add_argument("--images", default=f"{DATA}/images")
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=1)
    p.add_argument("--workers", default="1,2", help="Ray job worker counts to run")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of (plain loop, each Ray job), interleaved; the table gives medians")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    items = list(karpathy_items(args.karpathy, args.images))
    items = items[:args.limit] if args.limit else items
    workers = [int(w) for w in args.workers.split(",") if w]
    tmp = tempfile.mkdtemp(prefix="bench-extract-")
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        t = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
        ray_start = time.perf_counter() - t
        # Interleaved rounds, so that a change in machine load hits every mode alike.
        for r in range(args.repeat):
            runs.setdefault(("plain loop", 1), []).append(
                plain_loop(items, args.backbone, args.image_size, f"{tmp}/plain{r}", args))
            for w in workers:
                runs.setdefault(("ray job", w), []).append(
                    ray_job(items, args.backbone, args.image_size, f"{tmp}/ray{w}-{r}", w, args))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [(name, w, {k: statistics.median(run[k] for run in rs) for k in ("startup", "extract")})
            for (name, w), rs in runs.items()]

    n = len(items)
    base = rows[0][2]
    size = args.image_size or load_backbone(args.backbone, device="cpu").image_size
    print(f"{args.backbone} at {size} px, {n} images from {args.images}, {os.cpu_count()} cores, "
          f"batch {args.batch_size}, {args.images_per_shard} images per shard, median of {args.repeat} "
          f"round(s); ray.init took {ray_start:.1f} s; load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<11}{'workers':>8}{'startup s':>11}{'extract s':>11}{'steady img/s':>14}"
          f"{'e2e img/s':>11}{'steady overhead':>17}{'e2e overhead':>14}")
    results = []
    for name, w, r in rows:
        steady, e2e = n / r["extract"], n / (r["startup"] + r["extract"])
        over = r["extract"] / base["extract"] - 1
        over_e2e = (r["startup"] + r["extract"]) / (base["startup"] + base["extract"]) - 1
        print(f"{name:<11}{w:>8}{r['startup']:>11.1f}{r['extract']:>11.1f}{steady:>14.2f}{e2e:>11.2f}"
              f"{over:>16.1%}{over_e2e:>14.1%}")
        results.append({"mode": name, "workers": w, **r, "steady_img_s": steady, "e2e_img_s": e2e,
                        "runs": runs[(name, w)]})
    print("overhead = time / plain-loop time - 1 (e2e for the Ray job excludes ray.init)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backbone": args.backbone, "image_size": size, "images": n, "ray_init_s": ray_start,
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
