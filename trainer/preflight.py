"""What a training run checks before its first step, so that a mistake costs seconds, not an epoch.

:func:`check_inputs` reads the shards' manifests (``data.train_shards``, ``data.val_shards``), the
vocabulary file and the output folder, and sets ``model.img_dim`` from the manifest when the config
leaves it 0. :func:`claim_output_dir` refuses an output folder that holds another run unless the
run resumes it (``--resume``) or replaces it (``--overwrite``). :func:`trim_run_logs` cuts a resumed
run's ``metrics.jsonl`` back to the checkpoint's step, so each step is logged once. Every error
names the config key, its value and the file at fault.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from dataio import storage
from dataio.errors import DataError
from dataio.pipeline import Shard, resolve_shards
from dataio.shards import manifest_url
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer import checkpoint
from trainer.telemetry import RUN_LOG_NAME, rewrite_run_log

log = logging.getLogger(__name__)

RUN_LOGS = (RUN_LOG_NAME, "metrics.rank*.jsonl")  # rank 0's log, and every rank's own (per_rank)
# What a replaced run leaves behind (--overwrite): its checkpoints, logs, validations and the
# vocabulary built from its shards.
RUN_OUTPUTS = ("checkpoints", "eval", "vocab.json", *RUN_LOGS)


def check_inputs(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.img_dim`` from the training shards' manifest when it is 0; raises
    :class:`ConfigError` naming the key, value and file for a missing or unreadable shard set, a
    validation set of another feature size, an ``img_dim`` that does not match the shards, a
    missing vocabulary or an output folder that cannot be written."""
    train = _shards("data.train_shards", cfg.data.train_shards)
    dim = train[0].feature_dim
    if cfg.data.val_shards:
        val = _shards("data.val_shards", cfg.data.val_shards)
        if val[0].feature_dim != dim:
            raise ConfigError(f"config key 'data.val_shards': {_where(cfg.data.val_shards)} holds "
                              f"{val[0].feature_dim}-d region features, data.train_shards "
                              f"({_where(cfg.data.train_shards)}) {dim}-d: extract both with one backbone")
    img_dim = cfg.model.img_dim
    if img_dim == 0:
        log.info("model.img_dim: %d, the region features of %s", dim, _where(cfg.data.train_shards))
        cfg = replace(cfg, model=replace(cfg.model, img_dim=dim))
    elif img_dim != dim:
        raise ConfigError(f"config key 'model.img_dim': {img_dim} does not match the training shards: "
                          f"{_where(cfg.data.train_shards)} records {dim}-d region features "
                          f"(feature_shape [k, {dim}]); set model.img_dim={dim}, or leave it 0 to take "
                          f"it from the shards")
    if cfg.data.vocab and not storage.exists(cfg.data.vocab):
        raise ConfigError(f"config key 'data.vocab': vocabulary file {cfg.data.vocab!r} does not exist")
    check_writable("train.output_dir", Path(cfg.train.output_dir))
    return cfg


def _shards(key: str, spec: str) -> list[Shard]:
    try:
        shards = resolve_shards(spec)
    except (FileNotFoundError, NotADirectoryError, DataError, ValueError) as err:
        raise ConfigError(f"config key '{key}': {spec!r}: {err}") from None
    if not shards:
        raise ConfigError(f"config key '{key}': {_where(spec)} lists no shards")
    return shards


def _where(spec: str) -> str:
    """The file that describes a shard set: its manifest, or the pattern of .tar shards."""
    return spec if spec.endswith(".tar") else manifest_url(spec)


def check_writable(key: str, folder: Path) -> None:
    """The nearest existing folder at or above ``folder`` must accept new files (``key``: the
    config key or option that names it)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{_named(key)}: {str(folder)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{_named(key)}: {str(folder)!r}: {existing} is not writable")


def _named(key: str) -> str:
    return key if key.startswith("--") else f"config key '{key}'"


def previous_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to a run: its checkpoints and run logs (empty: none)."""
    ckpt_dir = run_dir / "checkpoints"
    found = [f"checkpoints/{t}" for t in checkpoint.complete_tags(ckpt_dir)]
    found += [p.name for pattern in RUN_LOGS for p in sorted(run_dir.glob(pattern))]
    return found


def claim_output_dir(run_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuses (:class:`ConfigError`) a new run in a folder that holds another run, naming the
    folder and what is there, unless it resumes (``--resume``) or replaces (``--overwrite``) it; a
    resume needs its checkpoint. Only reads: :func:`clear_previous_run` deletes."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in "
                          "train.output_dir, or replace it")
    if resume:
        ckpt_dir = run_dir / "checkpoints"
        if resume == checkpoint.LATEST and checkpoint.latest_tag(ckpt_dir) is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (no "
                                    f"'{checkpoint.LATEST}' file): train.output_dir={str(run_dir)!r} "
                                    f"holds no run to resume")
        return
    found = previous_run(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
        raise ConfigError(f"config key 'train.output_dir': {str(run_dir)!r} holds another run ({shown}); "
                          f"continue it with --resume latest, replace it with --overwrite, or choose "
                          f"another train.output_dir")


def clear_previous_run(run_dir: Path, keep: str = "") -> None:
    """``--overwrite``: deletes the previous run's outputs (:data:`RUN_OUTPUTS`) in ``run_dir``,
    except ``keep`` (a vocabulary the config names)."""
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            if keep and path.resolve() == Path(keep).resolve():
                continue
            log.warning("--overwrite: deleting %s of the previous run", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def trim_run_logs(run_dir: Path, step: int, epoch: int) -> None:
    """A resumed run's logs cut back to where its checkpoint stands: step records up to ``step``,
    validations of epochs before ``epoch``; the rest is replayed and logged again (atomically
    rewritten: a crash leaves the old log or the new one)."""
    for pattern in RUN_LOGS:
        for path in sorted(run_dir.glob(pattern)):
            dropped = rewrite_run_log(path, lambda r: _before(r, step, epoch))
            if dropped:
                log.info("%s: %d records after step %d (the checkpoint) dropped; they are replayed",
                         path, dropped, step)


def _before(record: dict, step: int, epoch: int) -> bool:
    if record.get("kind") == "step":
        return int(record.get("step", 0)) <= step
    if record.get("kind") == "eval":
        return int(record.get("epoch", 0)) < epoch
    return True
