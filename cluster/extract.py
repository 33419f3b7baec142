"""The feature-extraction job: images + captions -> WebDataset shards, on a local or remote Ray.

The driver splits the source into work units, one per output shard (fixed images per unit, in
source order, so unit names are deterministic); a pool of Ray actors, each holding one backbone,
decodes, extracts and writes its unit's shard straight to ``DEST/<split>/`` (local or ``s3://``)
through `dataio.shards.write_shard`, which makes the shard visible only when it is complete.
After the shard, the actor writes the unit's stats (``DEST/<split>/_units/<unit>.json``: what went
in, what was skipped and why, timings); a rerun reuses a unit only when its shard is committed and
its stats name the same inputs, extractor and shard hash, so every image lands exactly once.
The manifest of each split is written last, and only when all its units succeeded.

    python -m cluster.extract --karpathy dataset_flickr30k.json --images DIR \\
        --backbone efficientnet-lite2 --dest s3://bucket/f30k-lite2

Without ``--address`` (and no ``RAY_ADDRESS``) it starts a local Ray, listening on 127.0.0.1 only
(`cluster.local_ray`); under
``ray job submit --address http://HEAD:8265 --working-dir . -- python -m cluster.extract ...`` it
joins the job's cluster. On several machines, DEST and the images must be reachable from every
node (``s3://`` or a shared file system).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cluster.backbones import Backbone, identify, load_backbone
from cluster.images import DEFAULT_MAX_PIXELS, BadImage, Decoded, decode_image
from cluster.local_ray import connect, ray  # ray through local_ray: a local Ray stays on loopback
from dataio import storage
from dataio.errors import DataError
from dataio.pipeline import batched
from dataio.shards import (RECORD_SUFFIX, ImageSample, check_sample, committed_shards, shard_filename,
                           write_manifest, write_shard)
from dataio.sources import ImageItem

log = logging.getLogger(__name__)

# Test hook: "N:MARKER" makes an actor exit hard (os._exit) half-way through writing its Nth unit,
# once per job: the first actor to create MARKER exits, later ones carry on.
FAULT_ENV = "SCAN_EXTRACT_FAULT_EXIT"
UNITS_DIR = "_units"


@dataclass(frozen=True)
class WorkUnit:
    name: str  # the shard name, e.g. "train-000003"
    split: str
    items: tuple[ImageItem, ...]

    def fingerprint(self, backbone: dict) -> str:
        """Identifies what this unit's shard holds: its inputs and the backbone's identity
        (`cluster.backbones.identify`)."""
        items = [[it.key, it.image if isinstance(it.image, str) else "<loader>", it.captions,
                  it.tokens, it.split, it.meta] for it in self.items]
        body = json.dumps({"items": items, "backbone": backbone}, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class UnitResult:
    name: str
    split: str
    fingerprint: str
    extractor: dict  # Backbone.describe() of the actor that extracted it
    shard_sha256: str
    samples: int  # images written
    skipped: list[dict]  # {"key", "file", "reason"}: images left out, with their captions
    converted: list[dict]  # {"key", "file", "note"}: images written after a conversion
    bad_captions: list[dict]  # {"key", "caption"}: empty captions (or without tokens) left out
    captions_dropped: int  # captions of skipped images + bad captions
    started: float  # unix time
    finished: float
    pid: int
    run_id: str
    attempt: int

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class ExitFault:
    unit_number: int  # 1-based count of units this actor has started
    marker: str

    @classmethod
    def from_env(cls) -> ExitFault | None:
        value = os.environ.get(FAULT_ENV, "")
        if not value:
            return None
        number, sep, marker = value.partition(":")
        if not sep or not number.isdigit() or not marker:
            raise ValueError(f"environment variable {FAULT_ENV}={value!r}: expected 'N:MARKER_PATH'")
        return cls(int(number), marker)

    def fire(self, unit_number: int) -> None:
        if unit_number != self.unit_number:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        log.warning("fault injection: actor pid %d exits during its unit %d", os.getpid(), unit_number)
        os._exit(17)


def split_dest(dest: str, split: str) -> str:
    return storage.join(dest, split)


def unit_stats_url(dest: str, split: str, name: str) -> str:
    return storage.join(storage.join(split_dest(dest, split), UNITS_DIR), f"{name}.json")


def plan_units(items: Iterable[ImageItem], images_per_unit: int) -> list[WorkUnit]:
    """Consecutive blocks of `images_per_unit` images per split, named <split>-<index:06d>."""
    if images_per_unit < 1:
        raise ValueError(f"images_per_unit must be >= 1, got {images_per_unit}")
    by_split: dict[str, list[ImageItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    units = []
    for split, split_items in by_split.items():
        for index, start in enumerate(range(0, len(split_items), images_per_unit)):
            units.append(WorkUnit(f"{split}-{index:06d}", split,
                                  tuple(split_items[start:start + images_per_unit])))
    return units


def image_name(item: ImageItem) -> str:
    return item.image if isinstance(item.image, str) else f"<generated {item.key}>"


def _read_and_decode(item: ImageItem, size: int, resample: str, max_pixels: int) -> Decoded | BadImage:
    name = image_name(item)
    try:
        if callable(item.image):
            data = item.image()
        else:
            data = storage.read_bytes(item.image) if storage.is_s3(item.image) else item.image
        return decode_image(data, size=size, resample=resample, max_pixels=max_pixels, name=name)
    except BadImage as err:
        return err
    except Exception as exc:  # missing file, S3 error, a failing generator: this image only
        return BadImage(name, f"unreadable: {type(exc).__name__}: {exc}")




@dataclass
class _UnitLog:
    skipped: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)
    bad_captions: list[dict] = field(default_factory=list)
    captions_dropped: int = 0

    def skip(self, item: ImageItem, reason: str) -> None:
        log.warning("skipping image %s (%s): %s", item.key, image_name(item), reason)
        self.skipped.append({"key": item.key, "file": image_name(item), "reason": reason})
        self.captions_dropped += len(item.captions) - sum(b["key"] == item.key for b in self.bad_captions)


def _sample(item: ImageItem, dec: Decoded, features: torch.Tensor, boxes: torch.Tensor,
            extractor: dict, ulog: _UnitLog) -> ImageSample:
    """features (k, D), boxes (k, 4) of one image -> its shard sample, without empty captions."""
    captions, tokens = [], []
    for raw, toks in zip(item.captions, item.tokens):
        if isinstance(raw, str) and raw.strip() and toks:
            captions.append(raw)
            tokens.append(list(toks))
        else:
            ulog.bad_captions.append({"key": item.key, "caption": raw})
            ulog.captions_dropped += 1
    meta = {**item.meta, "file": image_name(item), "width": dec.width, "height": dec.height,
            "split": item.split, "extractor": extractor}
    if dec.note:
        meta["converted"] = dec.note
    return ImageSample(key=item.key, regions=features.numpy(), captions=captions, tokens=tokens,
                       boxes=boxes.numpy(), meta=meta)


def _unit_samples(backbone: Backbone, unit: WorkUnit, *, batch_size: int, decode_threads: int,
                  max_pixels: int, ulog: _UnitLog,
                  on_first_sample: Callable[[], None] | None = None) -> Iterator[ImageSample]:
    """Decode (in threads, ahead of the model), extract in batches, yield one sample per image.

    Images that fail to decode, or whose sample would be invalid (no captions, non-finite
    features), are recorded in `ulog` and left out; the unit goes on.
    """
    pre = backbone.preprocess
    extractor = backbone.describe()
    shard = shard_filename(unit.name)
    with ThreadPoolExecutor(max(1, decode_threads)) as pool:
        decoded = pool.map(lambda it: _read_and_decode(it, pre.image_size, pre.resample, max_pixels),
                           unit.items)
        for batch in batched(zip(unit.items, decoded), batch_size):
            good = []
            for item, dec in batch:
                if isinstance(dec, BadImage):
                    ulog.skip(item, dec.reason)
                else:
                    good.append((item, dec))
            if not good:
                continue
            regions = backbone(np.stack([dec.pixels for _, dec in good]))  # features (B, k, D)
            for b, (item, dec) in enumerate(good):
                k = int(regions.lengths[b])
                sample = _sample(item, dec, regions.features[b, :k], regions.boxes[b, :k], extractor, ulog)
                try:
                    check_sample(sample, shard)
                except DataError as err:  # no caption left, non-finite features, unsafe key
                    ulog.skip(item, err.problem)
                    continue
                if dec.note:
                    ulog.converted.append({"key": item.key, "file": image_name(item), "note": dec.note})
                yield sample
                if on_first_sample is not None:
                    on_first_sample()
                    on_first_sample = None


def extract_unit(backbone: Backbone, unit: WorkUnit, dest: str, *, fingerprint: str, run_id: str,
                 attempt: int = 0,
                 batch_size: int = 32, decode_threads: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                 on_first_sample: Callable[[], None] | None = None) -> UnitResult:
    """Extract one unit and commit its shard, then its stats file. Runs in an actor or in-process.

    A unit whose images were all skipped has no shard; its stats file (samples 0) marks it done.
    """
    started = time.time()
    ulog = _UnitLog()
    samples = _unit_samples(backbone, unit, batch_size=batch_size, decode_threads=decode_threads,
                            max_pixels=max_pixels, ulog=ulog, on_first_sample=on_first_sample)
    first = next(samples, None)
    if first is None:
        sha256, written = "", 0
        # Drop a shard a previous run may have committed under this name (other inputs then).
        for url in (storage.join(split_dest(dest, unit.split), shard_filename(unit.name)) + suffix
                    for suffix in (RECORD_SUFFIX, "")):
            storage.remove(url)
    else:
        record = write_shard(split_dest(dest, unit.split), unit.name, itertools.chain([first], samples))
        sha256, written = record.sha256, record.samples
    result = UnitResult(name=unit.name, split=unit.split, fingerprint=fingerprint,
                        extractor=backbone.describe(), shard_sha256=sha256, samples=written,
                        skipped=ulog.skipped, converted=ulog.converted, bad_captions=ulog.bad_captions,
                        captions_dropped=ulog.captions_dropped,
                        started=started, finished=time.time(), pid=os.getpid(), run_id=run_id,
                        attempt=attempt)
    storage.write_bytes_atomic(unit_stats_url(dest, unit.split, unit.name),
                               json.dumps(dataclasses.asdict(result), indent=1).encode())
    log.info("unit %s: %d images written, %d skipped in %.1f s (pid %d, attempt %d)", unit.name,
             written, len(ulog.skipped), result.seconds, result.pid, attempt)
    return result


@ray.remote(max_restarts=0)
class ExtractWorker:
    """Loads its backbone once, then extracts one unit per call."""

    def __init__(self, backbone: str, image_size: int | None, threads: int, batch_size: int,
                 decode_threads: int, max_pixels: int, fault: ExitFault | None):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(threads)
        self.backbone = load_backbone(backbone, image_size=image_size)
        self.batch_size, self.decode_threads, self.max_pixels = batch_size, decode_threads, max_pixels
        self.fault = fault
        self.units_started = 0

    def describe(self) -> dict:
        return self.backbone.describe()

    def run(self, unit: WorkUnit, fingerprint: str, dest: str, run_id: str, attempt: int) -> UnitResult:
        self.units_started += 1
        number = self.units_started
        hook = (lambda: self.fault.fire(number)) if self.fault else None
        return extract_unit(self.backbone, unit, dest, fingerprint=fingerprint, run_id=run_id,
                            attempt=attempt, batch_size=self.batch_size, decode_threads=self.decode_threads,
                            max_pixels=self.max_pixels, on_first_sample=hook)


@dataclass
class JobConfig:
    dest: str  # local directory or s3://bucket/prefix; shards go to DEST/<split>/
    backbone: str = "efficientnet-lite2"
    image_size: int | None = None  # None: the backbone's native size
    images_per_unit: int = 256  # images per work unit = per shard
    batch_size: int = 32
    workers: int = 0  # 0: one per GPU when the cluster has GPUs, else 1
    cpus_per_worker: int = 0  # 0: the cluster's CPUs / workers (also the actor's torch threads)
    decode_threads: int = 1
    max_retries: int = 2  # extra attempts per unit after an actor death or an error
    max_pixels: int = DEFAULT_MAX_PIXELS
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a new local Ray
    num_cpus: int | None = None  # CPUs of a new local Ray (None: all)
    use_gpu: bool = True
    progress: bool = True


@dataclass
class JobSummary:
    run_id: str
    dest: str
    extractor: dict
    workers: int
    units_total: int
    units_reused: list[str]
    units_computed: list[str]
    units_failed: list[dict]  # {"unit", "attempts", "error"}
    images_computed: int  # images in the units computed by this run
    images_written: int  # samples in the output (all units)
    skipped: list[dict]  # {"key", "file", "reason"} over all units
    converted: list[dict]
    captions_dropped: int
    startup_seconds: float  # connecting to Ray and loading the backbones
    extract_seconds: float  # first unit submitted -> last unit done
    manifests: list[str]

    @property
    def images_per_second(self) -> float:
        return self.images_computed / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": self.images_per_second}


def _reusable(unit: WorkUnit, fingerprint: str, dest: str, committed: dict,
              stats_files: set[str]) -> UnitResult | None:
    """The stats of a previous run of this unit when its output is in place and still valid."""
    if f"{unit.name}.json" not in stats_files:
        return None
    stats = UnitResult(**json.loads(storage.read_bytes(unit_stats_url(dest, unit.split, unit.name))))
    if stats.fingerprint != fingerprint:
        return None
    record = committed.get(shard_filename(unit.name))
    if stats.samples == 0:
        return stats if record is None else None
    return stats if record is not None and record.sha256 == stats.shard_sha256 else None


class _Pool:
    """The actors, with replacement of dead ones."""

    def __init__(self, cfg: JobConfig, workers: int, cpus: int, gpus: int, fault: ExitFault | None):
        self.options = {"num_cpus": cpus, "num_gpus": gpus}
        self.args = (cfg.backbone, cfg.image_size, cpus, cfg.batch_size, cfg.decode_threads,
                     cfg.max_pixels, fault)
        self.actors = [self._new() for _ in range(workers)]

    def _new(self):
        return ExtractWorker.options(**self.options).remote(*self.args)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def replace(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new()

    def describe(self, retries: int) -> dict:
        """Waits for every actor to load its backbone (replacing one that dies on the way, e.g.
        killed by Ray's memory monitor); all must agree on the extractor."""
        described = []
        for index in range(len(self.actors)):
            for attempt in range(retries + 1):
                try:
                    described.append(ray.get(self.actors[index].describe.remote()))
                    break
                except ray.exceptions.RayActorError as err:
                    if attempt == retries:
                        raise RuntimeError(f"extraction worker failed to start {retries + 1} times "
                                           f"(backbone {self.args[0]!r}): {err}") from err
                    log.warning("worker %d died while starting; starting a new one: %s", index,
                                str(err).splitlines()[0])
                    self.replace(index)
        if any(d != described[0] for d in described):
            raise RuntimeError(f"workers disagree on the extractor: {described}")
        return described[0]


def _run_units(pool: _Pool, units: Sequence[WorkUnit], fingerprints: dict[str, str], dest: str,
               run_id: str, max_retries: int, progress: tqdm) -> tuple[list[UnitResult], list[dict]]:
    """One unit in flight per actor; a failed unit is resubmitted (on a fresh actor if its actor
    died) until it has had 1 + max_retries attempts."""
    queue = deque((unit, 0) for unit in units)
    idle = deque(range(len(pool.actors)))
    running: dict[ray.ObjectRef, tuple[int, WorkUnit, int]] = {}
    results: list[UnitResult] = []
    failed: list[dict] = []
    while queue or running:
        while queue and idle:
            unit, attempt = queue.popleft()
            index = idle.popleft()
            ref = pool.actors[index].run.remote(unit, fingerprints[unit.name], dest, run_id, attempt)
            running[ref] = (index, unit, attempt)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        index, unit, attempt = running.pop(ref)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            if isinstance(err, ray.exceptions.RayActorError):
                log.warning("worker %d died during unit %s (attempt %d); starting a new one",
                            index, unit.name, attempt)
                pool.replace(index)
            else:
                log.warning("unit %s failed (attempt %d): %s", unit.name, attempt, err)
            if attempt < max_retries:
                queue.append((unit, attempt + 1))
            else:
                cause = getattr(err, "cause", None) or err  # the exception raised in the actor
                failed.append({"unit": unit.name, "attempts": attempt + 1,
                               "error": f"{type(cause).__name__}: {cause}".splitlines()[0]})
        else:
            results.append(result)
            progress.update(len(unit.items))
        idle.append(index)
    return results, failed


def _cluster_shape(cfg: JobConfig) -> tuple[int, int, int]:
    """(workers, CPUs per worker, GPUs per worker) from the config and the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.use_gpu else 0
    cpus = int(resources.get("CPU", 1))
    workers = cfg.workers or max(gpus, 1)
    cpus_per_worker = cfg.cpus_per_worker or max(1, cpus // workers)
    return workers, cpus_per_worker, 1 if gpus else 0


def _write_manifests(dest: str, units: Sequence[WorkUnit], stats: dict[str, UnitResult],
                     extractor: dict, run_id: str) -> list[str]:
    written = []
    for split in dict.fromkeys(u.split for u in units):
        split_units = [u for u in units if u.split == split]
        committed = committed_shards(split_dest(dest, split))
        records = [committed[shard_filename(u.name)] for u in split_units if stats[u.name].samples]
        if not records:
            log.error("split %s: every image was skipped; no manifest written", split)
            continue
        split_stats = [stats[u.name] for u in split_units]
        extra = {"extraction": {
            "run_id": run_id,
            "images_in": sum(len(u.items) for u in split_units),
            "images_written": sum(s.samples for s in split_stats),
            # An image that could not be decoded is left out together with its captions.
            "skipped_images": [x for s in split_stats for x in s.skipped],
            "captions_dropped": sum(s.captions_dropped for s in split_stats),
            "converted_images": [x for s in split_stats for x in s.converted],
            "bad_captions": [x for s in split_stats for x in s.bad_captions],
        }}
        write_manifest(split_dest(dest, split), records, split=split, extractor=extractor, extra=extra)
        for name in storage.listdir(split_dest(dest, split)):  # partial files of killed workers
            if ".tmp-" in name:
                storage.remove(storage.join(split_dest(dest, split), name))
        written.append(storage.join(split_dest(dest, split), "manifest.json"))
    return written


def run_job(items: Iterable[ImageItem], cfg: JobConfig) -> JobSummary:
    """Extract `items` into shards under cfg.dest; reuses units committed by an earlier run.
    Ray and the actors are only started when some unit is left to extract."""
    t0 = time.time()
    run_id = uuid.uuid4().hex[:12]
    dest = cfg.dest if storage.is_s3(cfg.dest) else os.path.abspath(cfg.dest)
    units = plan_units(items, cfg.images_per_unit)
    if not units:
        raise ValueError("the source has no images")
    identity = identify(cfg.backbone, cfg.image_size)
    fingerprints = {u.name: u.fingerprint(identity) for u in units}
    splits = {u.split for u in units}
    committed = {split: committed_shards(split_dest(dest, split)) for split in splits}
    stats_files = {split: set(storage.listdir(storage.join(split_dest(dest, split), UNITS_DIR)))
                   for split in splits}
    stats: dict[str, UnitResult] = {}
    for unit in units:
        previous = _reusable(unit, fingerprints[unit.name], dest, committed[unit.split],
                             stats_files[unit.split])
        if previous is not None:
            stats[unit.name] = previous
    reused = [u.name for u in units if u.name in stats]
    todo = [u for u in units if u.name not in stats]
    log.info("run %s: %d units, %d already done, %d to extract", run_id, len(units), len(reused), len(todo))

    results, failed, workers = [], [], 0
    t1 = t2 = time.time()
    if todo:
        connect(cfg.address, cfg.num_cpus)
        workers, cpus, gpus = _cluster_shape(cfg)
        workers = min(workers, len(todo))
        log.info("%d workers x (%d CPU, %d GPU)", workers, cpus, gpus)
        pool = _Pool(cfg, workers, cpus, gpus, ExitFault.from_env())
        extractor = pool.describe(cfg.max_retries)
        t1 = time.time()
        with tqdm(total=sum(len(u.items) for u in todo), unit="img", desc="extract",
                  disable=not cfg.progress) as progress:
            results, failed = _run_units(pool, todo, fingerprints, dest, run_id, cfg.max_retries, progress)
        t2 = time.time()
        pool.close()
        stats.update({r.name: r for r in results})
    else:
        extractor = stats[units[0].name].extractor

    manifests = [] if failed else _write_manifests(dest, units, stats, extractor, run_id)
    if failed:
        log.error("%d units failed; no manifest written (rerun to retry them): %s", len(failed), failed)
    done = [stats[u.name] for u in units if u.name in stats]
    return JobSummary(
        run_id=run_id, dest=dest, extractor=extractor, workers=workers, units_total=len(units),
        units_reused=reused, units_computed=[r.name for r in results], units_failed=failed,
        images_computed=sum(len(u.items) for u in todo if u.name in stats),  # failed units excluded
        images_written=sum(s.samples for s in done),
        skipped=[x for s in done for x in s.skipped], converted=[x for s in done for x in s.converted],
        captions_dropped=sum(s.captions_dropped for s in done),
        startup_seconds=t1 - t0, extract_seconds=t2 - t1, manifests=manifests)


def _load_items(args: argparse.Namespace) -> list[ImageItem]:
    splits = args.splits.split(",") if args.splits else None
    if args.synthetic:
        from dataio.sources.synthetic import synthetic_items
        items = [it for split in (splits or ["train"])
                 for it in synthetic_items(args.synthetic, seed=args.seed, split=split, size=args.synthetic_size)]
    else:
        from dataio.sources.karpathy import karpathy_items
        # Missing files are not fatal here: the workers record them as skipped images.
        root = args.images if storage.is_s3(args.images) else os.path.abspath(args.images)
        items = list(karpathy_items(args.karpathy, root, splits=splits, check_files=False))
    return items[:args.limit] if args.limit else items


def _print_summary(summary: JobSummary) -> None:
    """The human-readable summary on stdout (the CLI's output)."""
    print(f"run {summary.run_id}: {summary.units_total} units ({len(summary.units_reused)} reused, "
          f"{len(summary.units_computed)} extracted, {len(summary.units_failed)} failed), "
          f"{summary.workers} workers")
    print(f"images: {summary.images_computed} extracted in {summary.extract_seconds:.1f} s = "
          f"{summary.images_per_second:.2f} images/s (+{summary.startup_seconds:.1f} s start-up); "
          f"{summary.images_written} in the output")
    print(f"skipped: {len(summary.skipped)} images ({summary.captions_dropped} captions dropped); "
          f"converted: {len(summary.converted)}")
    for s in summary.skipped:
        print(f"  skipped {s['file']}: {s['reason']}")
    for f in summary.units_failed:
        print(f"  FAILED unit {f['unit']} after {f['attempts']} attempts: {f['error']}")
    for m in summary.manifests:
        print(f"manifest: {m}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("source (one of)")
    src.add_argument("--karpathy", help="Karpathy-layout JSON (dataset_coco.json, dataset_flickr30k.json...)")
    src.add_argument("--images", help="directory of the images the Karpathy JSON names")
    src.add_argument("--synthetic", type=int, default=0, help="N generated scenes per split instead")
    src.add_argument("--synthetic-size", type=int, default=96, help="pixel size of generated scenes")
    src.add_argument("--seed", type=int, default=0, help="seed of the generated scenes")
    src.add_argument("--splits", default="", help="comma-separated splits to extract (default: all)")
    src.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--dest", required=True, help="output: local directory or s3://bucket/prefix")
    p.add_argument("--backbone", default="efficientnet-lite2",
                   help="efficientnet-lite0, efficientnet-lite2, or hf:<local transformers vision model dir>")
    p.add_argument("--image-size", type=int, default=None, help="input size (EfficientNet only; default: native)")
    p.add_argument("--images-per-shard", type=int, default=256, help="images per work unit / shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="actors (0: one per GPU, else 1)")
    p.add_argument("--cpus-per-worker", type=int, default=0, help="0: cluster CPUs / workers")
    p.add_argument("--decode-threads", type=int, default=1, help="image decoding threads per worker")
    p.add_argument("--max-retries", type=int, default=2, help="extra attempts per failed unit")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are skipped undecoded")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--no-gpu", action="store_true", help="do not use GPUs even when the cluster has some")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", default="", help="also write the run summary as JSON here")
    args = p.parse_args(argv)
    if bool(args.synthetic) == bool(args.karpathy):
        p.error("give exactly one source: --karpathy JSON --images DIR, or --synthetic N")
    if args.karpathy and not args.images:
        p.error("--karpathy needs --images DIR")
    if args.karpathy and not storage.is_s3(args.images) and not os.path.isdir(args.images):
        p.error(f"--images {args.images!r}: not a directory")
    for name, low in (("images_per_shard", 1), ("batch_size", 1), ("decode_threads", 1), ("workers", 0),
                      ("cpus_per_worker", 0), ("max_retries", 0), ("limit", 0), ("synthetic", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = JobConfig(dest=args.dest, backbone=args.backbone, image_size=args.image_size,
                    images_per_unit=args.images_per_shard, batch_size=args.batch_size,
                    workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                    decode_threads=args.decode_threads, max_retries=args.max_retries,
                    max_pixels=args.max_pixels, address=args.address, num_cpus=args.num_cpus,
                    use_gpu=not args.no_gpu, progress=not args.no_progress)
    try:  # bad input: a clear message instead of a traceback
        items = _load_items(args)
        identify(cfg.backbone, cfg.image_size)
    except (ValueError, OSError) as err:
        print(f"python -m cluster.extract: error: {err}", file=sys.stderr)
        return 2
    summary = run_job(items, cfg)
    _print_summary(summary)
    if args.summary_json:
        storage.write_bytes_atomic(args.summary_json, json.dumps(summary.to_dict(), indent=1).encode())
    return 1 if summary.units_failed else 0


if __name__ == "__main__":
    sys.exit(main())
