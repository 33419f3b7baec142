"""The feature-extraction job: images + captions -> WebDataset shards, on a local or remote Ray.

The driver splits the source into work units, one per output shard (``images_per_shard`` images,
in source order, so unit names are deterministic; `cluster.extract_unit`); a pool of Ray actors,
each holding one backbone, decodes, extracts and writes its unit's shard straight to
``DEST/<split>/`` (local or ``s3://``) through `dataio.shard_writer.write_shard`, which makes the shard
visible only when it is complete. After the shard, the actor writes the unit's stats
(``DEST/<split>/_units/<unit>.json``: what went in, what was skipped and why, timings); a rerun
reuses a unit only when its shard is committed and its stats name the same inputs, extractor and
shard hash, so every image lands exactly once. The manifest of each split is written last, and
only when all its units succeeded.

    scan extract source.karpathy=dataset_flickr30k.json source.images=DIR \
        backbone=efficientnet-lite2 dest=s3://bucket/f30k-lite2

(the config: `cluster.extract_config`). Without ``address`` (and no ``RAY_ADDRESS``) it starts a
local Ray, listening on 127.0.0.1 only (`cluster.local_ray`); under
``ray job submit --address http://HEAD:8265 --working-dir . -- python -m app.cli extract ...`` it
joins the job's cluster. On several machines, DEST and the images must be reachable from every
node (``s3://`` or a shared file system).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from tqdm import tqdm

from cluster.extract_config import JobConfig, SourceConfig
from cluster.extract_unit import (UNITS_DIR, ExitFault, ExtractWorker, UnitResult, WorkUnit, plan_units,
                                  split_dest, unit_stats_url)
from cluster.local_ray import ray, session  # ray through local_ray: a local Ray stays on loopback
from dataio import storage
from dataio.shard_writer import committed_shards, shard_filename, write_manifest
from dataio.sources import ImageItem
from scan.configfile import ConfigError
from scan.features.backbones import identify
from scan.features.proposals import identify_regions
from scan.features.saliency import identify_saliency

log = logging.getLogger(__name__)


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

    def __init__(self, cfg: JobConfig, workers: int, cpus: int, gpus: int, fault: ExitFault | None,
                 identity: dict):
        self.options = {"num_cpus": cpus, "num_gpus": gpus}
        self.args = (cfg.backbone, cfg.image_size, cpus, cfg.batch_size, cfg.decode_threads,
                     cfg.max_pixels, fault, cfg.saliency, cfg.regions, cfg.proposal_config(), cfg.cut,
                     identity)
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


# What makes shards another extractor's: the backbone (its spec, weights, input size, memory
# format) and the cut. Region mode and saliency stay per-unit choices that a rerun recomputes.
_EXTRACTOR_KEYS = ("backbone", "files_digest", "image_size", "memory_format", "cut")


def _extractor(identity: dict) -> dict:
    return {k: identity.get(k, 0 if k == "cut" else None) for k in _EXTRACTOR_KEYS}


def _described(identity: dict) -> str:
    return (f"backbone={identity.get('backbone')} cut={identity.get('cut', 0)} (weights "
            f"{str(identity.get('files_digest', '?'))[:12]}, image_size {identity.get('image_size')})")


def refuse_other_extractor(dest: str, split: str, stats_files: set[str], identity: dict) -> None:
    """Raise ConfigError, naming both, when ``DEST/<split>`` holds units of another extractor
    (another backbone, weights, input size or cut): a rerun would replace its shards one unit at a
    time. Units of the same extractor resume as usual (another region mode or saliency model is
    recomputed, as before)."""
    for name in sorted(stats_files):
        if not name.endswith(".json"):
            continue
        try:
            old = json.loads(storage.read_bytes(storage.join(storage.join(split_dest(dest, split), UNITS_DIR),
                                                             name))).get("identity")
        except (FileNotFoundError, ValueError):
            continue  # unreadable stats: that unit is recomputed, as before
        if old is not None and _extractor(old) != _extractor(identity):
            raise ConfigError(f"config key 'dest': {split_dest(dest, split)!r} already holds shards of "
                              f"{_described(old)}; this job extracts {_described(identity)}. Give "
                              f"another dest, or remove that folder to replace them")


def _write_manifests(dest: str, units: Sequence[WorkUnit], stats: dict[str, UnitResult],
                     extractor: dict, run_id: str, identity: dict) -> list[str]:
    written = []
    for split in dict.fromkeys(u.split for u in units):
        split_units = [u for u in units if u.split == split]
        committed = committed_shards(split_dest(dest, split))
        records = [committed[shard_filename(u.name)] for u in split_units if stats[u.name].samples]
        if not records:
            log.error("split %s: every image was skipped; no manifest written", split)
            continue
        split_stats = [stats[u.name] for u in split_units]
        extra = {"identity": identity, "extraction": {
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
            if storage.is_temp_name(name):
                storage.remove(storage.join(split_dest(dest, split), name))
        written.append(storage.join(split_dest(dest, split), "manifest.json"))
    return written


def run_job(items: Iterable[ImageItem], cfg: JobConfig) -> JobSummary:
    """Extract `items` into shards under cfg.dest; reuses units committed by an earlier run.
    Ray and the actors are only started when some unit is left to extract."""
    cfg.validate()
    t0 = time.time()
    run_id = uuid.uuid4().hex[:12]
    dest = cfg.dest if storage.is_s3(cfg.dest) else os.path.abspath(cfg.dest)
    units = plan_units(items, cfg.images_per_shard)
    if not units:
        raise ValueError("the source has no images")
    identity = {**identify(cfg.backbone, cfg.image_size, cfg.cut),
                **identify_regions(cfg.regions, cfg.proposal_config())}
    if cfg.saliency != "none":  # the same units compute it: what they hold includes the saliency model
        identity["saliency"] = identify_saliency(cfg.saliency)
    fingerprints = {u.name: u.fingerprint(identity) for u in units}
    splits = {u.split for u in units}
    committed = {split: committed_shards(split_dest(dest, split)) for split in splits}
    stats_files = {split: set(storage.listdir(storage.join(split_dest(dest, split), UNITS_DIR)))
                   for split in splits}
    for split in splits:  # before any work: another extractor's shards are never replaced
        refuse_other_extractor(dest, split, stats_files[split], identity)
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
        with session(cfg.address, cfg.num_cpus):
            workers, cpus, gpus = _cluster_shape(cfg)
            workers = min(workers, len(todo))
            log.info("%d workers x (%d CPU, %d GPU)", workers, cpus, gpus)
            pool = _Pool(cfg, workers, cpus, gpus, ExitFault.from_env(), identity)
            extractor = pool.describe(cfg.max_retries)
            t1 = time.time()
            with tqdm(total=sum(len(u.items) for u in todo), unit="img", desc="extract",
                      disable=not cfg.progress) as progress:
                results, failed = _run_units(pool, todo, fingerprints, dest, run_id, cfg.max_retries,
                                             progress)
            t2 = time.time()
            pool.close()
        stats.update({r.name: r for r in results})
    else:
        extractor = stats[units[0].name].extractor

    manifests = [] if failed else _write_manifests(dest, units, stats, extractor, run_id, identity)
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


def source_items(source: SourceConfig) -> list[ImageItem]:
    """The items the config's source names, in source order."""
    splits = source.splits or None
    if source.synthetic:
        from dataio.sources.synthetic import synthetic_items
        items = [it for split in (splits or ["train"])
                 for it in synthetic_items(source.synthetic, seed=source.seed, split=split,
                                           size=source.synthetic_size)]
    else:
        from dataio.sources.karpathy import karpathy_items
        # Missing files are not fatal here: the workers record them as skipped images.
        root = source.images if storage.is_s3(source.images) else os.path.abspath(source.images)
        items = list(karpathy_items(source.karpathy, root, splits=splits, check_files=False))
    return items[:source.limit] if source.limit else items
