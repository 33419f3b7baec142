"""Worker script for the multi-process trainer tests (run by tests/test_distributed_*.py).

``python tests/helpers_dist.py grads OUT STAGES`` with RANK/WORLD_SIZE/MASTER_* set: every rank takes
its rows of one fixed global batch (unequal row counts and lengths on purpose), runs the real model,
``trainer.train.batch_loss`` and ``engine.backward`` under each ZeRO stage in STAGES (e.g. "0,2"),
and writes the summed loss and the full gradients to ``OUT/world<W>_rank<R>.pt``. With one process
it also writes the reference loss: ``hardest_negative_loss`` over the whole batch's scores.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from trainer.config import ExperimentConfig
from trainer.distributed import init_process_group, read_env
from trainer.engine import build_engine
from trainer.loss import hardest_negative_loss
from trainer.model import build_model
from trainer.train import batch_loss, seed_everything
from trainer.xattn import xattn_scores

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a CPU training subprocess: no launcher variables inherited, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def train_args(shards: str, out: Path, *overrides: str) -> list[str]:
    """``--config`` and overrides of the tiny test run (after ``-m cluster.cli train`` or a launcher)."""
    return ["--config", str(TINY_CONFIG), f"data.train_shards={shards}", f"train.output_dir={out}",
            *overrides]


def run_train(shards: str, out: Path, *overrides: str, resume: str | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "train", *train_args(shards, out, *overrides)]
    if resume:
        cmd += ["--resume", resume]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


GLOBAL_BATCH = 10
VOCAB = 30
# Pairs 0 and 5, and 2 and 8, show the same image: with rank 0 holding rows 0-3 and rank 1 rows
# 4-9 these duplicates straddle the ranks, so same-image masking must work across devices.
IMAGE_IDS = [0, 1, 2, 3, 4, 0, 5, 6, 2, 7]
SPLIT = {1: [(0, 10)], 2: [(0, 4), (4, 10)]}


def tiny_config(stage: int, batch: int) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = 16, 32, 16
    cfg.train.precision, cfg.train.zero_stage = "fp32", stage
    cfg.data.batch_size = batch
    return cfg


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    regions = torch.randn(GLOBAL_BATCH, 6, 16, generator=g)
    img_lens = torch.randint(3, 7, (GLOBAL_BATCH,), generator=g)
    tokens = torch.randint(4, VOCAB, (GLOBAL_BATCH, 9), generator=g)
    cap_lens = torch.randint(4, 10, (GLOBAL_BATCH,), generator=g)
    for dup, orig in ((5, 0), (8, 2)):
        regions[dup], img_lens[dup] = regions[orig], img_lens[orig]
    return {"regions": regions, "img_lens": img_lens, "tokens": tokens, "cap_lens": cap_lens,
            "image_ids": torch.tensor(IMAGE_IDS)}


def local_rows(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi), trimmed to this slice's own longest image and caption (as a collate would)."""
    out = {k: v[lo:hi] for k, v in batch.items()}
    out["regions"] = out["regions"][:, : int(out["img_lens"].max())]
    out["tokens"] = out["tokens"][:, : int(out["cap_lens"].max())]
    return out


def grads(out: Path, stages: list[int]) -> None:
    env = read_env()
    init_process_group(env)
    lo, hi = SPLIT[env.world][env.rank]
    b = local_rows(global_batch(), lo, hi)
    result = {}
    for stage in stages:
        cfg = tiny_config(stage, hi - lo)
        seed_everything(0)
        engine = build_engine(cfg, build_model(cfg.model, VOCAB), env, steps_per_epoch=1)
        model = engine.ds.module
        img = model.encode_images(b["regions"], b["img_lens"])
        cap = model.encode_captions(b["tokens"], b["cap_lens"])
        loss, total = batch_loss(img, b["img_lens"], cap, b["cap_lens"], b["image_ids"], cfg.loss, cfg.xattn)
        cfg.loss.cross_device = False
        _, local_only = batch_loss(img, b["img_lens"], cap, b["cap_lens"], b["image_ids"], cfg.loss,
                                   cfg.xattn)
        unmasked = None
        if env.world == 1:
            scores = xattn_scores(img.detach(), cap.detach(), b["cap_lens"], cfg.xattn, b["img_lens"])
            reference = hardest_negative_loss(scores, cfg.loss.margin, True, b["image_ids"])
            unmasked = hardest_negative_loss(scores, cfg.loss.margin, True)
        else:
            reference = None
        engine.ds.backward(loss)
        full = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()}
        result[stage] = {"loss": float(total), "local_only": float(local_only), "grads": full,
                         "reference": None if reference is None else float(reference),
                         "reference_unmasked": None if unmasked is None else float(unmasked)}
    torch.save(result, out / f"world{env.world}_rank{env.rank}.pt")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command != "grads":
        raise SystemExit(f"unknown command {command!r}")
    grads(Path(args[0]), [int(s) for s in args[1].split(",")])
