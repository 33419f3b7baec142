"""Atomic DeepSpeed checkpoints with the loop's own state, and ``--resume latest``.

Layout under ``<output_dir>/checkpoints``::

    step00000120/            one complete checkpoint (DeepSpeed files + rng_rank<R>.pt per rank)
    step00000240/
    latest                   the tag of the newest complete checkpoint (replaced atomically)

A save writes everything into ``<tag>.partial/`` first (every rank: DeepSpeed's model, optimizer
and scheduler state and ``client_state``; every rank its RNG states), then global rank 0 renames
the directory to ``<tag>`` and only then replaces ``latest``. A crash at any point leaves
``latest`` naming the previous complete checkpoint; leftover ``*.partial`` directories are
ignored by ``load`` and removed by the next save. The directory must be shared by all ranks
(one filesystem), as DeepSpeed's own checkpoints assume.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed import DistEnv, is_distributed

log = logging.getLogger(__name__)

LATEST = "latest"
_PARTIAL = ".partial"
_STALE = ".stale"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, or None when there is no checkpoint yet."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, but {ckpt_dir / tag} does not exist")
    return tag


def save(ds_engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], env: DistEnv,
         keep: int) -> str:
    """Saves a complete checkpoint for optimizer step ``step``; every rank must call it."""
    tag = tag_for_step(step)
    partial = ckpt_dir / (tag + _PARTIAL)
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by a crash during an earlier save of this step
    _barrier()
    ds_engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state,
                              save_latest=False)
    rng_path = partial / f"rng_rank{env.rank}.pt"
    torch.save(capture_rng(), rng_path.with_name(rng_path.name + ".tmp"))
    os.replace(rng_path.with_name(rng_path.name + ".tmp"), rng_path)
    _barrier()  # every rank's files are in place before the directory becomes visible
    if env.is_main:
        final = ckpt_dir / tag
        if final.exists():  # saved by a run that crashed before updating `latest`; ours wins
            stale = ckpt_dir / (tag + _STALE)
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(partial, final)
        _write_atomic(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep)
        log.info("checkpoint %s saved", final)
    _barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keeps the newest ``keep`` complete checkpoints and removes leftovers of crashed saves."""
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(ckpt_dir / tag)
    for path in ckpt_dir.iterdir():
        if path.is_dir() and path.name.endswith((_PARTIAL, _STALE)):
            shutil.rmtree(path)


def load(ds_engine: Any, ckpt_dir: Path, resume: str, env: DistEnv) -> dict[str, Any]:
    """Restores engine, optimizer, scheduler and this rank's RNG; returns the client state.

    ``resume`` is ``latest`` or a tag such as ``step00000120``.
    """
    tag = latest_tag(ckpt_dir) if resume == LATEST else resume
    if tag is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    if not _TAG.match(tag) or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"--resume {resume!r}: {ckpt_dir / tag} is not a complete checkpoint; "
                                f"available: {complete_tags(ckpt_dir) or 'none'}")
    path, client_state = ds_engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_path = ckpt_dir / tag / f"rng_rank{env.rank}.pt"
    if rng_path.is_file():
        restore_rng(torch.load(rng_path, weights_only=False))
    else:  # the run was saved with fewer ranks: this rank's streams start fresh
        log.warning("%s missing (checkpoint saved with fewer ranks); RNG not restored", rng_path)
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state
