"""Where this process stands among a launcher's processes: the one place that reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``.

Every launcher sets them (torchrun, the deepspeed launcher, Ray's workers); a process started alone
has none, and ``trainer.distributed.read_env`` then sets the one-process values before joining its
group. The data layer, the training runtime and the command line all ask here.
"""
from __future__ import annotations

import os


def launched() -> bool:
    """Whether a launcher set this process's rank (``RANK`` or ``WORLD_SIZE`` in the environment)."""
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (0, 1, 0 without a launcher;
    a launcher that set one of RANK / WORLD_SIZE must set both)."""
    if launched() and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        missing = "RANK" if "RANK" not in os.environ else "WORLD_SIZE"
        raise ValueError(f"environment variable {missing} is not set (the launcher set only one of "
                         "RANK and WORLD_SIZE)")
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"environment RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit values, else the launcher's ``RANK`` / ``WORLD_SIZE``, else 0 / 1."""
    rank = _env_int("RANK", 0) if rank is None else rank
    world = _env_int("WORLD_SIZE", 1) if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    return rank, world
