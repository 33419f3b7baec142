"""One work unit of the extraction job: plan the units, decode and extract one, write its shard.

A unit is a fixed block of images of one split, in source order, named after its shard
(``train-000003``); `plan_units` makes them, `extract_unit` decodes its images (in threads, ahead of
the model), extracts them in batches, commits the shard through `dataio.shard_writer.write_shard` and
then the unit's stats (``DEST/<split>/_units/<unit>.json``). `ExtractWorker` is the Ray actor that
holds one backbone and runs `extract_unit` per call; the job around it is `cluster.extract`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cluster.local_ray import ray  # ray through local_ray: a local Ray stays on loopback
from dataio import storage
from dataio.errors import DataError
from dataio.images import DEFAULT_MAX_PIXELS, BadImage, Decoded, decode_image
from dataio.pipeline import batched
from dataio.shard_writer import shard_filename, write_shard
from dataio.shards import RECORD_SUFFIX, ImageSample, check_sample
from dataio.sources import ImageItem
from scan.features.backbones import Backbone
from scan.features.proposal_boxes import ProposalConfig
from scan.features.proposals import ProposalRegions, load_regions
from scan.features.saliency import SaliencyModel, load_saliency

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
        (`scan.features.backbones.identify`)."""
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
    identity: dict | None = None  # what the job's fingerprints hold of the extractor (None: older stats)

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


def plan_units(items: Iterable[ImageItem], images_per_shard: int) -> list[WorkUnit]:
    """Consecutive blocks of `images_per_shard` images per split, named <split>-<index:06d>."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    by_split: dict[str, list[ImageItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    units = []
    for split, split_items in by_split.items():
        for index, start in enumerate(range(0, len(split_items), images_per_shard)):
            units.append(WorkUnit(f"{split}-{index:06d}", split,
                                  tuple(split_items[start:start + images_per_shard])))
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


def _sample(item: ImageItem, dec: Decoded, features: torch.Tensor, boxes: torch.Tensor | None,
            extractor: dict, ulog: _UnitLog, saliency: torch.Tensor | None = None) -> ImageSample:
    """features (k, D), boxes (k, 4) and saliency (k,) or None of one image -> its shard sample,
    without empty captions."""
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
                       boxes=None if boxes is None else boxes.numpy(), meta=meta,
                       saliency=None if saliency is None else saliency.numpy())


def describe_extractor(backbone: Backbone | ProposalRegions, saliency: SaliencyModel | None) -> dict:
    """What made every feature (meta.json, the unit stats, the manifest): the backbone's
    description, with the saliency model's under ``saliency`` when it runs."""
    out = backbone.describe()
    return out if saliency is None else {**out, "saliency": saliency.describe()}


def _unit_samples(backbone: Backbone | ProposalRegions, unit: WorkUnit, *, batch_size: int, decode_threads: int,
                  max_pixels: int, ulog: _UnitLog,
                  on_first_sample: Callable[[], None] | None = None,
                  saliency: SaliencyModel | None = None) -> Iterator[ImageSample]:
    """Decode (in threads, ahead of the model), extract in batches (the backbone's regions and,
    with ``saliency``, each region's saliency from the same pixels), yield one sample per image.

    Images that fail to decode, or whose sample would be invalid (no captions, non-finite
    features), are recorded in `ulog` and left out; the unit goes on.
    """
    pre = backbone.preprocess
    extractor = describe_extractor(backbone, saliency)
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
            pixels = np.stack([dec.pixels for _, dec in good])  # (B, S, S, 3) uint8
            regions = backbone(pixels)  # features (B, k, D)
            # (B, k): the saliency map pooled inside each region's box
            sal = saliency(pixels, regions.boxes) if saliency is not None else None
            for b, (item, dec) in enumerate(good):
                k = int(regions.lengths[b])
                boxes = None if regions.boxes is None else regions.boxes[b, :k]  # none for cut activations
                sample = _sample(item, dec, regions.features[b, :k], boxes, extractor, ulog,
                                 None if sal is None else sal[b, :k])
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


def extract_unit(backbone: Backbone | ProposalRegions, unit: WorkUnit, dest: str, *, fingerprint: str, run_id: str,
                 attempt: int = 0,
                 batch_size: int = 32, decode_threads: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                 on_first_sample: Callable[[], None] | None = None,
                 saliency: SaliencyModel | None = None, identity: dict | None = None) -> UnitResult:
    """Extract one unit and commit its shard, then its stats file. Runs in an actor or in-process.
    With ``saliency`` every sample also gets ``saliency.npy`` (k,), computed in the same unit, so
    its retries, exactly-once commit and resume are the backbone's.

    A unit whose images were all skipped has no shard; its stats file (samples 0) marks it done.
    """
    started = time.time()
    ulog = _UnitLog()
    samples = _unit_samples(backbone, unit, batch_size=batch_size, decode_threads=decode_threads,
                            max_pixels=max_pixels, ulog=ulog, on_first_sample=on_first_sample,
                            saliency=saliency)
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
                        extractor=describe_extractor(backbone, saliency), shard_sha256=sha256, samples=written,
                        skipped=ulog.skipped, converted=ulog.converted, bad_captions=ulog.bad_captions,
                        captions_dropped=ulog.captions_dropped,
                        started=started, finished=time.time(), pid=os.getpid(), run_id=run_id,
                        attempt=attempt, identity=identity)
    storage.write_bytes_atomic(unit_stats_url(dest, unit.split, unit.name),
                               json.dumps(dataclasses.asdict(result), indent=1).encode())
    log.info("unit %s: %d images written, %d skipped in %.1f s (pid %d, attempt %d)", unit.name,
             written, len(ulog.skipped), result.seconds, result.pid, attempt)
    return result


@ray.remote(max_restarts=0)
class ExtractWorker:
    """Loads its backbone (and saliency model, unless ``saliency`` is "none") once, then extracts
    one unit per call."""

    def __init__(self, backbone: str, image_size: int | None, threads: int, batch_size: int,
                 decode_threads: int, max_pixels: int, fault: ExitFault | None, saliency: str = "none",
                 regions: str = "grid", proposals: ProposalConfig | None = None, cut: int | str = 0,
                 identity: dict | None = None):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(threads)
        self.backbone = load_regions(backbone, image_size=image_size, regions=regions, proposals=proposals,
                                     cut=cut)
        self.identity = identity
        self.saliency = load_saliency(saliency, threads=threads)
        self.batch_size, self.decode_threads, self.max_pixels = batch_size, decode_threads, max_pixels
        self.fault = fault
        self.units_started = 0

    def describe(self) -> dict:
        return describe_extractor(self.backbone, self.saliency)

    def run(self, unit: WorkUnit, fingerprint: str, dest: str, run_id: str, attempt: int) -> UnitResult:
        self.units_started += 1
        number = self.units_started
        hook = (lambda: self.fault.fire(number)) if self.fault else None
        return extract_unit(self.backbone, unit, dest, fingerprint=fingerprint, run_id=run_id,
                            attempt=attempt, batch_size=self.batch_size, decode_threads=self.decode_threads,
                            max_pixels=self.max_pixels, on_first_sample=hook, saliency=self.saliency,
                            identity=self.identity)
