"""The field's run logs beside ``metrics.jsonl`` (``train.report_to``): TensorBoard and W&B.

Both are ``trainer.telemetry.Telemetry`` sinks written by rank 0 only (the other ranks' numbers
differ only by their local batches), with the same scalars as the JSON-lines run log:

- every optimizer step, ``train/<field>`` at that step (loss, samples_per_s, step_time_s,
  data_wait_s, lr, grad_norm, loss_scale, skipped_samples, memory_bytes; unknown values left out);
- every evaluation, ``eval/<metric>`` (R@K both ways, rsum, medr, meanr, ...) at the last optimizer
  step, so the recall curves share the loss curves' x axis, and ``eval/epoch``.

``tensorboard``: event files under ``<run dir>/tensorboard/`` (``tensorboard --logdir runs``).
``wandb``: offline unless ``WANDB_MODE`` says otherwise, files under ``<run dir>/wandb/``
(``wandb sync`` uploads them later). A sink whose package is missing is a ``ConfigError`` naming
``train.report_to`` before any work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer.telemetry import Telemetry, flatten_metrics

log = logging.getLogger(__name__)

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _step_scalars(fields: Mapping[str, Any]) -> dict[str, float]:
    """``observe_step``'s numbers as ``train/<name>``, unknown (None, NaN) ones left out."""
    out = {}
    for name, value in fields.items():
        if name in ("step", "epoch") or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[f"train/{name}"] = value
    return out


def _eval_scalars(epoch: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    flat = {f"eval/{k}": v for k, v in flatten_metrics(metrics).items() if math.isfinite(v)}
    return {**flat, "eval/epoch": float(epoch)}


class TensorBoardLog:
    """``torch.utils.tensorboard.SummaryWriter`` under ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.path))
        self._step = 0
        log.info("TensorBoard: writing %s (tensorboard --logdir %s)", self.path, self.path)

    def observe_step(self, **fields: Any) -> None:
        self._step = int(fields["step"])
        for tag, value in _step_scalars(fields).items():
            self._writer.add_scalar(tag, value, self._step)
        self._writer.add_scalar("train/epoch", float(fields["epoch"]), self._step)

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        for tag, value in _eval_scalars(epoch, metrics).items():
            self._writer.add_scalar(tag, value, self._step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLog:
    """A W&B run, offline unless ``WANDB_MODE`` is set, with the experiment config attached."""

    def __init__(self, run_dir: str | Path, cfg: ExperimentConfig) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self._run = wandb.init(project=cfg.name, dir=str(run_dir), mode=mode,
                               config=dataclasses.asdict(cfg))
        self._step = 0
        log.info("W&B: run %s in %s mode under %s", self._run.id, mode, run_dir)

    def observe_step(self, **fields: Any) -> None:
        self._step = int(fields["step"])
        self._run.log({**_step_scalars(fields), "train/epoch": float(fields["epoch"])}, step=self._step)

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(_eval_scalars(epoch, metrics), step=self._step)

    def close(self) -> None:
        self._run.finish()


def check_report_to(cfg: ExperimentConfig) -> None:
    """Raise ConfigError naming ``train.report_to`` when a listed logger's package is missing."""
    for name in cfg.train.report_to:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"config key 'train.report_to': {name!r} needs the Python package "
                              f"{_PACKAGES[name]!r}, which is not installed (pip install "
                              f"{_PACKAGES[name]}), or remove it from the list")


def build_report_logs(cfg: ExperimentConfig, *, rank: int, run_dir: str | Path) -> list[Telemetry]:
    """The sinks of ``train.report_to`` for this rank (none but on rank 0)."""
    check_report_to(cfg)
    if rank != 0:
        return []
    makers = {"tensorboard": lambda: TensorBoardLog(run_dir), "wandb": lambda: WandbLog(run_dir, cfg)}
    return [makers[name]() for name in dict.fromkeys(cfg.train.report_to)]
