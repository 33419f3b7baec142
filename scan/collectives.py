"""Collectives over the torch.distributed group, each a no-op without one.

The library's one answer to "is a process group running" (:func:`group_running`, :func:`group_world`), the padded
gathers (differentiable for training, plain for evaluation embeddings) and the small reductions.
Joining a group is the runtime's job (``trainer.distributed``); nothing here starts one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def group_running() -> bool:
    """A torch.distributed process group is initialised (of any size)."""
    return dist.is_available() and dist.is_initialized()


def group_world() -> tuple[int, int]:
    """(rank, world) of the running process group, (0, 1) when none is running."""
    if group_running():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return group_world()[1] > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks without autograd (for logging and checks); a copy, input untouched."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def all_gather_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """(W, len(values)) int64: every rank's ``values``, in rank order."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    if not is_distributed():
        return local[None]
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.stack(out)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order ([obj] without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_padded(x: torch.Tensor, counts: list[int], length: int | None = None, *,
                  differentiable: bool = True) -> torch.Tensor:
    """Concatenates every rank's ``x`` in rank order.

    ``x`` is (B_r, L_r, ...) on rank r (or (B_r,) for lengths and ids); ``counts`` is [B_0, ...,
    B_{W-1}] (from ``all_gather_ints``). Rows are padded to max(counts) and the second axis to
    ``length`` (the global maximum of L_r) with zeros, gathered, then the padding rows are dropped:
    result (sum B_r, length, ...). ``differentiable`` uses
    ``torch.distributed.nn.functional.all_gather``, whose backward sums every rank's gradient for
    this rank's slice; otherwise a plain gather, on the backend's device (NCCL: this GPU), whose
    result comes back on ``x``'s device.
    """
    if not is_distributed():
        return x if length is None else _pad_axis(x, 1, length)
    padded = _pad_axis(x, 0, max(counts))
    if length is not None:
        padded = _pad_axis(padded, 1, length)
    if differentiable:
        parts = dist_nn.all_gather(padded)
    else:
        comm = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                else torch.device("cpu"))
        parts = [torch.empty_like(padded, device=comm) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded.to(comm))
        parts = [p.to(x.device) for p in parts]
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def _pad_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    missing = size - x.shape[axis]
    if missing < 0:
        raise ValueError(f"cannot pad axis {axis} of size {x.shape[axis]} down to {size}")
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=axis)
