"""Sharded evaluation: every rank scores its tiles once, two passes, the same result everywhere.

Which to call:
  * :func:`evaluate_embeddings`: ensemble members already encoded, settings as arguments;
  * :func:`evaluate_and_write`: the same with the settings of a config's ``eval`` section, writing
    ``metrics.json`` (and the top-K, similarity tiles) under an output directory;
  * :func:`encode_and_evaluate`: a model and a split of shards, encoded once over the ranks then
    evaluated (the trainer's end-of-epoch validation).
The tile plan and its counting are in ``scan.eval.tiles``, the resume records in ``scan.eval.store``,
the same plan over Ray actors in ``cluster.eval_job``.

Exact retrieval ranks over the full N × M similarity matrix (docs/DESIGN.md §4): the two passes
described in ``scan.eval.tiles``, run here over the torch.distributed ranks; rank r scores the tile
rows a ≡ r (mod world), so it needs only its image blocks' rows and every caption.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from scan.builders import scorer_for
from scan.collectives import all_gather_objects, barrier, group_world, is_distributed
from scan.config import EvalConfig, ExperimentConfig
from scan.eval.encode import EncodeText, encode_split
from scan.eval.store import TileStore, write_outputs
from scan.metrics import tie_warning
from scan.eval.tiles import (COCO_FOLD, EvalResult, Member, Partial, TilePlan, count_tile, finish,
                             fingerprint, plan_members, precision_of, score_tile)

log = logging.getLogger(__name__)


def torch_combine(part: Partial) -> Partial:
    """Combination over the torch.distributed group (O(N + M) numbers per rank)."""
    return part if not is_distributed() else Partial.combine(all_gather_objects(part))


def run_tiles(members: Sequence[Member], plan: TilePlan, tiles: Sequence[tuple[int, int]],
              store: TileStore, *, topk: int, memory_budget_mb: int, positives: Partial | None = None,
              progress: bool = False, desc: str = "tiles") -> Partial:
    """Scores (or loads the records of) ``tiles``; off-diagonal tiles need ``positives``."""
    part = Partial.empty(plan, topk)
    device = members[0].emb.images.device
    for a, b in tqdm(tiles, desc=desc, disable=not progress, unit="tile"):
        rec = store.load(a, b)
        if rec is not None:
            part.add(plan, rec, loaded=True)
            continue
        scores = score_tile(members, plan.rows(a), plan.cols(b), memory_budget_mb=memory_budget_mb)
        if a == b:
            rec = count_tile(plan, a, b, scores, topk)
        else:
            assert positives is not None, "off-diagonal tiles need the positives of pass 1"
            rec = count_tile(plan, a, b, scores, topk,
                             torch.from_numpy(positives.pos_img[plan.rows(a)]).to(device),
                             torch.from_numpy(positives.pos_cap[plan.cols(b)]).to(device))
        store.save(rec, scores)
        part.add(plan, rec, loaded=False)
    return part


def evaluate_embeddings(members: Sequence[Member], *, protocol: str = "split", image_block: int = 0,
                        fold_images: int = COCO_FOLD, topk: int = 0, memory_budget_mb: int = 1024,
                        rank: int = 0, world: int = 1,
                        work_dir: str | os.PathLike | None = None,
                        sims_dir: str | os.PathLike | None = None) -> EvalResult:
    """Exact sharded evaluation of encoded embeddings; call on every rank with the same members.

    Every rank returns the same result. ``work_dir`` enables resuming (must be shared by the ranks
    or stay with each rank); ``sims_dir`` saves every tile (``load_sims``).
    """
    plan = plan_members(members, protocol=protocol, image_block=image_block, fold_images=fold_images,
                        world=world, save_sims=sims_dir is not None)
    store = TileStore(work_dir, sims_dir)
    store.check_plan(lambda: fingerprint(members, plan, topk), rank, barrier)
    show = rank == 0
    diag = run_tiles(members, plan, plan.diagonal_tiles(rank, world), store, topk=topk,
                     memory_budget_mb=memory_budget_mb, progress=show, desc="eval pass 1")
    positives = torch_combine(diag)
    off = run_tiles(members, plan, plan.offdiagonal_tiles(rank, world), store, topk=topk,
                    memory_budget_mb=memory_budget_mb, positives=positives, progress=show,
                    desc="eval pass 2")
    total = Partial.combine([positives, torch_combine(off)])
    if sims_dir is not None:
        barrier()
        if rank == 0:
            store.write_sims_index(plan)
    result = finish(plan, total, protocol, precision_of(members))
    ties = result.metrics["ties"]
    log.info("eval %s (%s): %d tiles computed, %d resumed; rsum %.2f; queries with a tied "
             "competitor: %d i2t, %d t2i", protocol, result.precision, result.tiles_computed,
             result.tiles_loaded, result.metrics["rsum"], ties["i2t"], ties["t2i"])
    if (warning := tie_warning(result.metrics)):
        log.warning("eval %s: %s", protocol, warning)
    return result


def evaluate_and_write(members: Sequence[Member], ev: EvalConfig, *, rank: int = 0, world: int = 1,
             out_dir: str | os.PathLike | None = None) -> EvalResult:
    """``evaluate_embeddings`` with the settings of ``cfg.eval``; outputs go under ``out_dir``.

    ``out_dir/tiles`` holds the resume records, ``out_dir/sims`` the tiles when ``eval.save_sims``,
    ``out_dir/topk.jsonl`` the top-K export and ``out_dir/metrics.json`` the figures (rank 0).
    """
    out = Path(out_dir) if out_dir else None
    if out is None and (ev.save_sims or ev.topk):
        raise ValueError("eval.save_sims and eval.topk write files: give an output directory")
    result = evaluate_embeddings(
        members, protocol=ev.protocol, image_block=ev.image_block, topk=ev.topk,
        memory_budget_mb=ev.memory_budget_mb, rank=rank, world=world,
        work_dir=out / "tiles" if out else None,
        sims_dir=out / "sims" if out and ev.save_sims else None)
    if out is not None and rank == 0:
        write_outputs(out, result, members[0].emb)
    return result


def encode_and_evaluate(model: torch.nn.Module, cfg: ExperimentConfig, spec: str, *, encode_text: EncodeText,
                   out_dir: str | os.PathLike | None = None, max_images: int = 0,
                   protocol: str | None = None) -> EvalResult:
    """The end-of-epoch evaluation: every rank calls it (inside or outside the process group).

    Each rank encodes its contiguous block of the split (of its first ``max_images`` images when
    > 0) once, the embeddings are all-gathered and the tiles scored on the model's device; every
    rank returns the same result. ``protocol`` overrides ``cfg.eval.protocol``.
    """
    if cfg.model.kind == "scan_sal":
        from dataio.pipeline import require_saliency
        require_saliency(spec, "the evaluated split")
    rank, world = group_world()
    device = next(model.parameters()).device
    emb = encode_split(model, spec, encode_text=encode_text, caps_per_image=cfg.eval.caps_per_image,
                       precision=cfg.eval.precision, batch_size=cfg.data.batch_size, device=device,
                       rank=rank, world=world, on_error=cfg.data.on_error, max_images=max_images)
    ev = cfg.eval if protocol is None else replace(cfg.eval, protocol=protocol)
    return evaluate_and_write([Member(emb.to(device), scorer_for(cfg))], ev, rank=rank, world=world, out_dir=out_dir)
