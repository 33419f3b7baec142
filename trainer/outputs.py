"""Where a training run's outputs go: a local folder, or object storage (``train.output_dir=s3://...``).

With a local (or shared) ``train.output_dir`` everything is under it, as ``trainer.checkpoint``
describes. With ``s3://bucket/run`` nodes need no shared disk:

- ``s3://bucket/run/checkpoints/``: the checkpoints (``trainer.checkpoint_s3``), each rank's files
  uploaded by that rank; the experiment config travels inside each (DeepSpeed client state);
- ``s3://bucket/run/vocab.json``: a built vocabulary, written by rank 0 and read by every rank;
- ``s3://bucket/run/metrics.jsonl``: rank 0's run log, uploaded after every checkpoint and at the
  end; a run resumed on a host without the local copy starts from it;
- this host's local folder (``train.staging_dir``, default ``<tmp>/scan-runs/<bucket>/<run>``):
  the run log being written, the validations' tile records and figures (``eval/``), a transformers
  tokenizer copy, the frozen text-feature cache (``text_features/``, each host computes its own
  unless ``model.hf_feature_cache`` names a folder it has) and the checkpoint staging
  (``save-rank<R>/``, ``load-rank<R>/``, emptied after each upload / load). Plots are drawn from a
  copy of ``metrics.jsonl``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dataio import storage
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer import checkpoint, checkpoint_s3
from trainer.distributed import DistEnv
from trainer.telemetry import RUN_LOG_NAME

log = logging.getLogger(__name__)


def remote(cfg: ExperimentConfig) -> bool:
    return storage.is_s3(cfg.train.output_dir)


def local_dir(cfg: ExperimentConfig) -> Path:
    """This host's folder of the run: ``train.output_dir`` itself unless that is in object storage."""
    if not remote(cfg):
        return Path(cfg.train.output_dir)
    if cfg.train.staging_dir:
        return Path(cfg.train.staging_dir)
    return Path(tempfile.gettempdir()) / "scan-runs" / cfg.train.output_dir[len("s3://"):].strip("/")


def shared(cfg: ExperimentConfig, name: str) -> str:
    """A file every rank reads (``vocab.json``): in ``train.output_dir``, wherever that is."""
    return storage.join(cfg.train.output_dir, name) if remote(cfg) else str(local_dir(cfg) / name)


def checkpoints(cfg: ExperimentConfig) -> str | Path:
    return storage.join(cfg.train.output_dir, "checkpoints") if remote(cfg) else local_dir(cfg) / "checkpoints"


def latest_tag(cfg: ExperimentConfig) -> str | None:
    where = checkpoints(cfg)
    return checkpoint_s3.latest_tag(where) if remote(cfg) else checkpoint.latest_tag(where)


def save(cfg: ExperimentConfig, ds_engine: Any, step: int, client_state: dict[str, Any], env: DistEnv,
         fp32_weights) -> str:
    """A checkpoint of ``step`` (every rank calls it); then rank 0 uploads its run log."""
    where, keep = checkpoints(cfg), cfg.train.keep_checkpoints
    if not remote(cfg):
        return checkpoint.save(ds_engine, where, step, client_state, env, keep, fp32_weights)
    name = checkpoint_s3.save(ds_engine, where, local_dir(cfg), step, client_state, env, keep, fp32_weights)
    if env.is_main:
        publish_log(cfg)
    return name


def load(cfg: ExperimentConfig, ds_engine: Any, resume: str, env: DistEnv) -> dict[str, Any]:
    where = checkpoints(cfg)
    if remote(cfg):
        return checkpoint_s3.load(ds_engine, where, local_dir(cfg), resume, env)
    return checkpoint.load(ds_engine, where, resume, env)


def publish_log(cfg: ExperimentConfig) -> None:
    """Uploads rank 0's ``metrics.jsonl`` to ``train.output_dir`` (object storage only)."""
    path = local_dir(cfg) / RUN_LOG_NAME
    if remote(cfg) and path.is_file():
        storage.upload(path, storage.join(cfg.train.output_dir, RUN_LOG_NAME))


def fetch_log(cfg: ExperimentConfig) -> None:
    """Before a resumed run's rank 0 opens its run log: the uploaded one, where this host has none."""
    path = local_dir(cfg) / RUN_LOG_NAME
    url = storage.join(cfg.train.output_dir, RUN_LOG_NAME)
    if remote(cfg) and not path.is_file() and storage.exists(url):
        os.makedirs(path.parent, exist_ok=True)
        storage.download(url, path)
        log.info("run log: continuing %s", url)


def claim_remote(cfg: ExperimentConfig, *, resume: str | None, overwrite: bool, main: bool) -> None:
    """``trainer.preflight.claim_output_dir`` for a run in object storage: a resume needs its
    checkpoint; a new run is refused where another run's checkpoints are, unless ``overwrite``
    (rank 0, ``main``, then deletes its checkpoints, run log and built vocabulary)."""
    where = checkpoints(cfg)
    if resume:
        if resume == checkpoint.LATEST and checkpoint_s3.latest_tag(where) is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {where} (no '{checkpoint.LATEST}'): "
                                    f"train.output_dir={cfg.train.output_dir!r} holds no run to resume")
        return
    found = storage.sizes(where)
    if found and not overwrite:
        raise ConfigError(f"config key 'train.output_dir': {cfg.train.output_dir!r} holds another run "
                          f"({len(found)} object(s) under {where}); continue it with --resume latest, "
                          f"replace it with --overwrite, or choose another train.output_dir")
    if overwrite and main:
        for name in ("checkpoints", RUN_LOG_NAME, "vocab.json"):
            url = storage.join(cfg.train.output_dir, name)
            if url == cfg.data.vocab:
                continue
            if name == "checkpoints" and found:
                checkpoint_s3.remove_prefix(url)
            elif name != "checkpoints" and storage.exists(url):
                storage.remove(url)
            log.warning("--overwrite: deleted %s of the previous run", url)
        (local_dir(cfg) / RUN_LOG_NAME).unlink(missing_ok=True)
