"""The sharded evaluation as a Ray job: one actor per GPU (or per ``--num-cpus`` CPUs) scores
tile rows; the driver combines the O(N + M) positives between the passes and the counts at the end.

Same tiles, records and outputs as ``scan evaluate-embeddings`` (``scan.eval.sharded``):
actor r owns the tile rows a ≡ r (mod actors), scores its diagonal tiles in pass 1 and the rest of
its rows in pass 2. Submit with
``ray job submit --address http://HEAD:8265 -- python -m app.cli evaluate-ray --config c.yaml
--embeddings e.pt --out DIR``; the output directory (and the embeddings files) must be reachable
from every node (a shared file system), as for resuming under torchrun.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from cluster.local_ray import ray, session  # ray through local_ray: a local Ray stays on loopback
from scan.config import EvalConfig
from scan.eval.sharded import run_tiles
from scan.eval.store import TileStore, write_outputs
from scan.eval.tiles import (EvalResult, Member, Partial, TilePlan, finish, fingerprint, plan_members,
                             precision_of)

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class TileWorker:
    """Holds the ensemble's embeddings on its device and scores the tiles it is given."""

    def __init__(self, members: list[Member], plan: TilePlan, work_dir: str, sims_dir: str | None,
                 topk: int, memory_budget_mb: int) -> None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.members = [Member(m.emb.to(device), m.scorer) for m in members]
        self.plan, self.topk, self.budget = plan, topk, memory_budget_mb
        self.store = TileStore(work_dir, sims_dir)

    def run(self, tiles: list[tuple[int, int]], positives: Partial | None = None) -> Partial:
        return run_tiles(self.members, self.plan, tiles, self.store, topk=self.topk,
                         memory_budget_mb=self.budget, positives=positives)


def evaluate_on_ray(members: Sequence[Member], ev: EvalConfig, *, out_dir: str, actors: int = 0,
                    num_cpus: float = 1, address: str | None = None) -> tuple[EvalResult, int]:
    """``scan evaluate-ray``: connects to Ray (``address``, else RAY_ADDRESS, else a local Ray) and
    evaluates on ``actors`` actors (0: one per GPU of the cluster, else one per ``num_cpus`` CPUs)
    with the settings of ``ev``; returns the result and the number of actors."""
    with session(address, None):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
        result = run_on_actors(members, out_dir=out_dir, protocol=ev.protocol, image_block=ev.image_block,
                               topk=ev.topk, memory_budget_mb=ev.memory_budget_mb, save_sims=ev.save_sims,
                               actors=actors, num_cpus=num_cpus, num_gpus=1 if gpus else 0)
    return result, actors


def run_on_actors(members: Sequence[Member], *, out_dir: str, protocol: str = "split",
                  image_block: int = 0, topk: int = 0, memory_budget_mb: int = 1024,
                  save_sims: bool = False, actors: int = 1, num_cpus: float = 1,
                  num_gpus: float = 0) -> EvalResult:
    """Runs both passes on ``actors`` actors of the connected Ray; writes ``out_dir`` outputs."""
    out = Path(out_dir)
    plan = plan_members(members, protocol=protocol, image_block=image_block, world=actors,
                        save_sims=save_sims)
    work_dir, sims_dir = str(out / "tiles"), str(out / "sims") if save_sims else None
    store = TileStore(work_dir, sims_dir)
    store.check_plan(lambda: fingerprint(members, plan, topk), 0, lambda: None)
    shared = ray.put(list(members))  # one copy in the object store, read by every actor
    options = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": num_cpus}
    pool = [TileWorker.options(**options).remote(shared, plan, work_dir, sims_dir, topk,
                                                 memory_budget_mb) for _ in range(actors)]
    positives = Partial.combine(ray.get([w.run.remote(plan.diagonal_tiles(r, actors))
                                         for r, w in enumerate(pool)]))
    log.info("pass 1 done: %d diagonal tiles", len(plan.blocks))
    rest = ray.get([w.run.remote(plan.offdiagonal_tiles(r, actors), positives)
                    for r, w in enumerate(pool)])
    total = Partial.combine([positives, *rest])
    if sims_dir:
        store.write_sims_index(plan)
    result = finish(plan, total, protocol, precision_of(members))
    write_outputs(out, result, members[0].emb, actors=actors)
    for w in pool:
        ray.kill(w)
    return result
