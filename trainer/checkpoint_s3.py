"""Checkpoints in object storage (``train.output_dir=s3://bucket/run``), with the guarantees of
:mod:`trainer.checkpoint` and no file system shared by the ranks.

Layout under ``s3://bucket/run/checkpoints``::

    step00000120/...        every rank's files (DeepSpeed's, ZeRO shards included, rng_rank<R>.pt,
                            model_fp32.pt), each uploaded by the rank that wrote it
    step00000120/COMPLETE   written by rank 0 once every rank's upload finished: each file's size
    latest                  the name of the newest complete checkpoint

A checkpoint is complete when its ``COMPLETE`` object exists (S3 has no rename; this object plays the
local protocol's directory rename). Saving, one storage step at a time:

1. every rank lets DeepSpeed write its own files into a local folder of its own
   (``<staging>/save-rank<R>/<name>/``) and uploads each of them to ``<name>/``; S3 shows an object
   only once its upload completed. The ranks then exchange what they uploaded (a collective: every
   upload is done);
2. rank 0 checks every listed object's size and writes ``<name>/COMPLETE``;
3. rank 0 replaces ``latest``;
4. rank 0 deletes what is no longer needed, never what ``latest`` names: checkpoints beyond
   ``keep``, older saves of the same step, names newer than ``latest`` and prefixes without
   ``COMPLETE`` (an upload cut short).

A kill before 2 leaves no ``COMPLETE``: ``latest`` names the previous checkpoint and the next save
deletes the leftovers. Loading: every rank downloads the checkpoint into
``<staging>/load-rank<R>/<name>/`` (each file checked against ``COMPLETE``), then reads it as a local
one: nothing is unpickled. Any host can resume: it needs the bucket, not the saving hosts' disks.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from dataio import storage
from scan.collectives import barrier, is_distributed
from trainer import checkpoint
from trainer.distributed import DistEnv

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


# The storage steps of a save, each one call (a test kills the process before each of them).
def _upload_file(path: Path, url: str) -> None:
    storage.upload(path, url)


def _write_marker(url: str, data: bytes) -> None:
    storage.write_bytes_atomic(url, data)


def _remove_prefix(url: str) -> None:
    remove_prefix(url)


def remove_prefix(url: str) -> None:
    """Deletes every object under ``url``/."""
    storage.filesystem(url).rm(url.rstrip("/") + "/", recursive=True)


def _objects(ckpt_url: str) -> dict[str, int]:
    return storage.sizes(ckpt_url)


def complete_tags(ckpt_url: str, objects: dict[str, int] | None = None) -> list[str]:
    """Names of complete checkpoints (those with ``COMPLETE``), oldest first."""
    objects = _objects(ckpt_url) if objects is None else objects
    names = {key.split("/")[0] for key in objects if key.endswith("/" + COMPLETE)}
    return sorted((n for n in names if checkpoint.is_name(n)), key=checkpoint.order)


def latest_tag(ckpt_url: str) -> str | None:
    """The checkpoint ``latest`` names, or None when there is no checkpoint yet."""
    url = storage.join(ckpt_url, checkpoint.LATEST)
    if not storage.exists(url):
        return None
    name = storage.read_bytes(url).decode("utf-8").strip()
    if not checkpoint.is_name(name) or not storage.exists(storage.join(ckpt_url, f"{name}/{COMPLETE}")):
        raise FileNotFoundError(f"{url} names checkpoint {name!r}, but {storage.join(ckpt_url, name)} is "
                                f"not a complete checkpoint; available: {complete_tags(ckpt_url) or 'none'}")
    return name


def save(ds_engine: Any, ckpt_url: str, staging: Path, step: int, client_state: dict[str, Any],
         env: DistEnv, keep: int, fp32_weights: Callable[[], dict[str, torch.Tensor]] | None = None) -> str:
    """:func:`trainer.checkpoint.save` into ``ckpt_url`` (``s3://...``); every rank must call it."""
    name = ""
    if env.is_main:
        name = checkpoint.new_name(complete_tags(ckpt_url), step)
        if storage.sizes(storage.join(ckpt_url, name)):  # an upload of this name a kill cut short
            _remove_prefix(storage.join(ckpt_url, name))
    if is_distributed():
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    local_root = staging / f"save-rank{env.rank}"
    shutil.rmtree(local_root, ignore_errors=True)  # a save this rank did not finish
    local = local_root / name
    barrier()
    ds_engine.save_checkpoint(str(local_root), tag=name, client_state=client_state, save_latest=False)
    torch.save(checkpoint.capture_rng(), local / f"rng_rank{env.rank}.pt")
    weights = fp32_weights() if fp32_weights is not None else None
    if env.is_main and weights is not None:
        torch.save(weights, local / checkpoint.FP32_WEIGHTS)
    mine = {p.relative_to(local).as_posix(): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
    for rel in mine:
        _upload_file(local / rel, storage.join(ckpt_url, f"{name}/{rel}"))
    shutil.rmtree(local_root)
    every = [mine]
    if is_distributed():
        every = [None] * env.world
        dist.all_gather_object(every, mine)  # returns once every rank uploaded its files
    if env.is_main:
        _publish(ckpt_url, name, {k: v for files in every for k, v in files.items()})
        _prune(ckpt_url, name, keep)
        log.info("checkpoint %s saved", storage.join(ckpt_url, name))
    barrier()
    return name


def _publish(ckpt_url: str, name: str, files: dict[str, int]) -> None:
    """Checks that every uploaded file is in the bucket with its size, then makes the checkpoint
    complete and ``latest``."""
    there = storage.sizes(storage.join(ckpt_url, name))
    wrong = {k: (v, there.get(k)) for k, v in files.items() if there.get(k) != v}
    if wrong:
        raise OSError(f"checkpoint {storage.join(ckpt_url, name)}: uploaded files missing or of another "
                      f"size (expected, found): {wrong}")
    _write_marker(storage.join(ckpt_url, f"{name}/{COMPLETE}"),
                  json.dumps({"files": files}, sort_keys=True).encode())
    _write_marker(storage.join(ckpt_url, checkpoint.LATEST), (name + "\n").encode())


def _prune(ckpt_url: str, latest: str, keep: int) -> None:
    """As :func:`trainer.checkpoint._prune`, plus the prefixes without ``COMPLETE`` and leftover
    temporary objects."""
    objects = _objects(ckpt_url)
    complete = complete_tags(ckpt_url, objects)
    kept = set(checkpoint.kept_names(complete, latest, keep))
    for prefix in sorted({key.split("/")[0] for key in objects if "/" in key}):
        if prefix not in kept:
            _remove_prefix(storage.join(ckpt_url, prefix))
    for key in objects:
        if "/" not in key and storage.is_temp_name(key):
            storage.discard(storage.join(ckpt_url, key))


def fetch(ckpt_url: str, name: str, dest: Path, only: Callable[[str], bool] = lambda rel: True) -> Path:
    """Downloads the complete checkpoint ``name`` (its files that ``only`` accepts) into
    ``dest/<name>/``, checking each file's size against ``COMPLETE``; returns that folder."""
    marker = storage.join(ckpt_url, f"{name}/{COMPLETE}")
    if not storage.exists(marker):
        raise FileNotFoundError(f"{storage.join(ckpt_url, name)} is not a complete checkpoint (no {COMPLETE}); "
                                f"available: {complete_tags(ckpt_url) or 'none'}")
    files = json.loads(storage.read_bytes(marker))["files"]
    local = dest / name
    shutil.rmtree(local, ignore_errors=True)
    for rel, size in files.items():
        if not only(rel):
            continue
        path = local / rel
        storage.download(storage.join(ckpt_url, f"{name}/{rel}"), path)
        if path.stat().st_size != size:
            raise OSError(f"{storage.join(ckpt_url, name + '/' + rel)}: downloaded {path.stat().st_size} "
                          f"bytes, {COMPLETE} says {size}")
    return local


def load(ds_engine: Any, ckpt_url: str, staging: Path, resume: str, env: DistEnv) -> dict[str, Any]:
    """:func:`trainer.checkpoint.load` from ``ckpt_url``: this rank downloads the checkpoint, then
    reads it from its local copy."""
    name = latest_tag(ckpt_url) if resume == checkpoint.LATEST else resume
    if name is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_url} (no '{checkpoint.LATEST}')")
    root = staging / f"load-rank{env.rank}"
    fetch(ckpt_url, name, root)
    try:
        return checkpoint.load(ds_engine, root, name, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
