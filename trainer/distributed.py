"""Rank and world from the environment, and joining the process group (the collectives over it
are the library's: ``scan.collectives``).

Every launcher this project supports (plain ``python``, ``deepspeed``, ``deepspeed --hostfile``
with ``--no_ssh``, ``torchrun``) exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; in one process without a launcher we set single-process
defaults so that DeepSpeed does not go looking for MPI (mpi4py). Several processes meet through the
launcher's rendezvous (``env://``); one process skips it and listens on loopback only.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dataio.ranks import env_ranks, launched
from scan.collectives import group_running

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the one free-port helper; tests use it too)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_env(local_rank: int | None = None) -> DistEnv:
    """Reads rank/world/local rank from the launcher's environment (defaults: one process).

    ``local_rank`` is the ``--local_rank=N`` argument the deepspeed launcher appends; the
    environment wins when both are present (they agree under every launcher we use).
    """
    if not launched():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_loopback_port()))
    elif "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank or 0)
    rank, world, local = env_ranks()
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        # No GPU: DeepSpeed must use its CPU accelerator (it otherwise probes for CUDA/XPU/...).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        _share_cores_between_local_ranks()
    return DistEnv(rank=rank, world=world, local_rank=local, device=device)


def _share_cores_between_local_ranks() -> None:
    """On CPU, each of a node's L ranks computes on cores / L threads unless ``OMP_NUM_THREADS``
    says otherwise: torchrun sets it to 1, the deepspeed launcher (without
    ``--bind_cores_to_rank``) does not, and L ranks of all-core threads oversubscribe the cores
    (measured on 2 cores: a median step of 1.43 s instead of 0.068 s)."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")  # torchrun, deepspeed
    if "OMP_NUM_THREADS" in os.environ or not local or int(local) <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // int(local))
    torch.set_num_threads(threads)
    log.info("%d local ranks on %d cores: %d compute thread(s) per rank (OMP_NUM_THREADS is unset; "
             "set it to choose)", int(local), cores, threads)


def init_process_group(env: DistEnv) -> None:
    """Joins the process group through DeepSpeed (nccl on GPU, gloo on CPU); idempotent."""
    import deepspeed

    if not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory allreduce is JIT-compiled on first use (~50 s per fresh
        # environment); gloo is enough for the CPU path, which is for development and tests.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if group_running():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if env.world == 1:
        _init_single_process(backend)  # DeepSpeed adopts a group that is already initialised
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=env.rank, world_size=env.world)
    log.info("rank %d/%d (local %d) joined the %s process group", env.rank, env.world,
             env.local_rank, backend)


def close_process_group(synchronise: bool = True) -> None:
    """Leave the process group, if one is running, before the interpreter exits: gloo's worker
    threads torn down at exit can abort the process ("terminate called without an active
    exception", SIGABRT) after the work is done. ``synchronise`` first waits for every rank, so
    that none leaves while another still talks to it (off after an error: the others may be gone)."""
    if not group_running():
        return
    if synchronise:
        dist.barrier()
    dist.destroy_process_group()


def _init_single_process(backend: str) -> None:
    """The process group of a run without peers, opening no socket beyond loopback.

    ``env://`` would start a TCPStore, whose server listens on every interface whatever
    MASTER_ADDR says; one process needs no rendezvous, so an in-memory HashStore replaces it.
    The backend still listens (gloo: one socket per group, on the address the host name resolves
    to, often the LAN one; NCCL: its bootstrap, on the first non-loopback interface), so its
    interface is pinned to loopback unless the user chose one.
    """
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME",
                              loopback)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _loopback_interface() -> str | None:
    """The loopback interface's name (Linux ``lo``, macOS ``lo0``), None if there is none."""
    return next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
