"""Crash-safe DeepSpeed checkpoints with the loop's own state, and ``--resume latest``.

Layout under ``<output_dir>/checkpoints``::

    step00000120/            one complete checkpoint: DeepSpeed's files, rng_rank<R>.pt per rank,
                             model_fp32.pt (the trained weights in fp32, for evaluation)
    step00000240/
    step00000240-1/          a later save of the same step (the epoch ended right after a periodic
                             save): a new name, never a replacement
    latest                   the name of the newest complete checkpoint

Saving, one file-system step at a time; after each of them ``latest`` names a complete directory:

1. every rank writes into ``<name>.partial/`` (``<name>``: a name no directory has yet);
2. rank 0 renames ``<name>.partial`` to ``<name>``;
3. rank 0 replaces ``latest`` (temporary file, fsync, rename, fsync of the directory);
4. rank 0 deletes what is no longer needed, never what ``latest`` names: checkpoints beyond
   ``keep``, older saves of the same step, directories newer than ``latest`` (left by a crash
   between 2 and 3, or by a run resumed from an older checkpoint: the history is what leads to
   ``latest``) and ``*.partial`` leftovers.

A kill before 3 leaves ``latest`` on the previous checkpoint, a kill after it on the new one;
``load`` never reads a ``.partial`` directory. The directory must be shared by all ranks (one
filesystem), as DeepSpeed's own checkpoints assume; without one, ``train.output_dir=s3://...`` keeps
the checkpoints in object storage (``trainer.checkpoint_s3``, the same guarantees).

Nothing is unpickled on load: every file is read with ``torch.load(weights_only=True)``, DeepSpeed's
own files through :class:`WeightsOnlyCheckpointEngine` with an allowlist of the few DeepSpeed
types its optimizer states hold; a file that needs anything else is refused, naming the file.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from dataio import storage
from scan.collectives import barrier, is_distributed
from trainer.distributed import DistEnv

log = logging.getLogger(__name__)

LATEST = "latest"
FP32_WEIGHTS = "model_fp32.pt"
_PARTIAL = ".partial"
_NAME = re.compile(r"^step(\d{8})(?:-(\d+))?$")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be read without unpickling arbitrary objects."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _key(name: str) -> tuple[int, int]:
    """(step, version) of a checkpoint name: its order in the run's history."""
    m = _NAME.match(name)
    assert m is not None, name
    return int(m.group(1)), int(m.group(2) or 0)


order = _key  # the sort key of checkpoint names (also for trainer.checkpoint_s3)


def is_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint's name (``stepNNNNNNNN`` or ``stepNNNNNNNN-V``)."""
    return _NAME.match(name) is not None


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, without numpy objects."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# weights-only loading


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed types found inside its own checkpoint files (optimizer states): plain
    containers of numbers and tensors, safe to rebuild without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's own types allowed; anything else that
    would need unpickling is refused with an error naming the file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint file {path} holds objects that only unpickling could rebuild; refusing to "
            f"load it (it may have been tampered with). Detail: {str(err).splitlines()[0]}") from None


def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with :func:`safe_load`."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    return WeightsOnlyCheckpointEngine


def install_weights_only_loader(ds_engine: Any) -> None:
    """Makes ``ds_engine.load_checkpoint`` read every file with ``weights_only=True``."""
    ds_engine.checkpoint_engine = _weights_only_engine_class()(ds_engine._config)


# ---------------------------------------------------------------------------------------------
# the directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The file-system steps of a save, each one call (a test kills the process before each of them).
def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)


def _write_latest(ckpt_dir: Path, name: str) -> None:
    path = ckpt_dir / LATEST
    # durable: fsync the pointer before the rename (_rename fsyncs the directory after it)
    storage.write_text_atomic(path, name + "\n", durable=True,
                              replace=lambda tmp, dst: _rename(Path(tmp), Path(dst)))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Names of complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_key)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint ``latest`` names, or None when there is no checkpoint yet."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if not _NAME.match(name) or not (ckpt_dir / name).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {name!r}, but {ckpt_dir / name} is not a "
                                f"complete checkpoint; available: {complete_tags(ckpt_dir) or 'none'}")
    return name


def _new_name(ckpt_dir: Path, step: int) -> str:
    return new_name(complete_tags(ckpt_dir), step)


def new_name(complete: list[str], step: int) -> str:
    """``stepNNNNNNNN``, or the next ``-V`` version when that step was saved before."""
    base = tag_for_step(step)
    versions = [_key(n)[1] for n in complete if _key(n)[0] == step]
    return base if not versions else f"{base}-{max(versions) + 1}"


def save(ds_engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], env: DistEnv,
         keep: int, fp32_weights: Callable[[], dict[str, torch.Tensor]] | None = None) -> str:
    """Saves a complete checkpoint of optimizer step ``step``; every rank must call it.

    ``fp32_weights`` (called on every rank: it may gather ZeRO partitions) gives the trained
    weights in fp32, which rank 0 writes as ``model_fp32.pt``. Returns the checkpoint's name.
    """
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*" + _PARTIAL):  # an earlier save that crashed
            _remove_tree(stale)
        for stale in ckpt_dir.glob(LATEST + "*"):
            if storage.is_temp_name(stale.name):
                stale.unlink()
        name = _new_name(ckpt_dir, step)
    else:
        name = ""
    if is_distributed():
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    partial = ckpt_dir / (name + _PARTIAL)
    barrier()
    ds_engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state,
                              save_latest=False)
    torch.save(capture_rng(), partial / f"rng_rank{env.rank}.pt")
    weights = fp32_weights() if fp32_weights is not None else None
    if env.is_main and weights is not None:
        torch.save(weights, partial / FP32_WEIGHTS)
    barrier()  # every rank's files are in place before the directory becomes visible
    if env.is_main:
        _rename(partial, ckpt_dir / name)
        _write_latest(ckpt_dir, name)
        _prune(ckpt_dir, name, keep)
        log.info("checkpoint %s saved", ckpt_dir / name)
    barrier()
    return name


def _prune(ckpt_dir: Path, latest: str, keep: int) -> None:
    """Deletes, after ``latest`` is in place, every checkpoint outside the newest ``keep`` of the
    history up to ``latest`` (the older saves of one step among them)."""
    kept = kept_names(complete_tags(ckpt_dir), latest, keep)
    for name in complete_tags(ckpt_dir):
        if name not in kept:
            _remove_tree(ckpt_dir / name)


def kept_names(complete: list[str], latest: str, keep: int) -> set[str]:
    """The checkpoints a prune keeps: the newest ``keep`` of the history up to ``latest`` (one
    version per step, the last) and ``latest`` itself."""
    head = _key(latest)
    history = [n for n in complete if _key(n) <= head]
    newest_per_step = {_key(n)[0]: n for n in history}  # the last version of each step
    return set(sorted(newest_per_step.values(), key=_key)[-max(keep, 1):]) | {latest}


def load(ds_engine: Any, ckpt_dir: Path, resume: str, env: DistEnv) -> dict[str, Any]:
    """Restores engine, optimizer, scheduler and this rank's RNG; returns the client state.

    ``resume`` is ``latest`` or a checkpoint name such as ``step00000120``.
    """
    name = latest_tag(ckpt_dir) if resume == LATEST else resume
    if name is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    if not _NAME.match(name) or not (ckpt_dir / name).is_dir():
        raise FileNotFoundError(f"--resume {resume!r}: {ckpt_dir / name} is not a complete checkpoint; "
                                f"available: {complete_tags(ckpt_dir) or 'none'}")
    install_weights_only_loader(ds_engine)
    path, client_state = ds_engine.load_checkpoint(str(ckpt_dir), tag=name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / name}")
    rng_path = ckpt_dir / name / f"rng_rank{env.rank}.pt"
    if rng_path.is_file():
        restore_rng(safe_load(rng_path))
    else:  # the run was saved with fewer ranks: this rank's streams start fresh
        log.warning("%s missing (checkpoint saved with fewer ranks); RNG not restored", rng_path)
    log.info("resumed from %s", ckpt_dir / name)
    return client_state
