"""Where an evaluation keeps its work: resume records, saved similarity tiles and its outputs.

Each finished tile is recorded atomically (``records/tile_A_B.npz``: counts, positives, top-K) so
a killed evaluation rerun with the same work dir computes only the missing tiles; ``save_sims``
writes every tile as ``.npy`` plus ``index.json`` that ``load_sims`` maps into one (N, M) array.
Writes go through ``dataio.storage.atomic_write`` without fsync: it cost ~50 ms per tile here,
and a record lost to a machine crash is recomputed.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dataio import storage
from dataio.npy import load_npz, open_npy
from scan.eval.encode import Embeddings
from scan.eval.tiles import EvalResult, TilePlan, TileRecord
from scan.metrics import tie_warning

log = logging.getLogger(__name__)


class TileStore:
    """Resume records and saved similarity tiles on a local or shared file system."""

    def __init__(self, work_dir: str | os.PathLike | None, sims_dir: str | os.PathLike | None) -> None:
        self.work_dir = Path(work_dir) if work_dir else None
        self.sims_dir = Path(sims_dir) if sims_dir else None

    def check_plan(self, fingerprint: Callable[[], dict], rank: int,
                   barrier: Callable[[], None]) -> None:
        """Refuses records of another evaluation; rank 0 writes ``plan.json``, others wait.

        ``fingerprint`` is called only with a work dir (it hashes every embedding).
        """
        if self.work_dir is None:
            return
        path = self.work_dir / "plan.json"
        if rank == 0:
            (self.work_dir / "records").mkdir(parents=True, exist_ok=True)
            if self.sims_dir:
                self.sims_dir.mkdir(parents=True, exist_ok=True)
            current = fingerprint()
            if path.exists():
                old = json.loads(path.read_text())
                if old != current:
                    raise ValueError(
                        f"work dir {self.work_dir} holds records of a different evaluation "
                        f"({path}: {_first_difference(old, current)}); use a fresh directory")
            else:
                storage.write_bytes_atomic(path, json.dumps(current, indent=1).encode())
        barrier()

    def _record_path(self, a: int, b: int) -> Path:
        assert self.work_dir is not None
        return self.work_dir / "records" / f"tile_{a:05d}_{b:05d}.npz"

    def load(self, a: int, b: int) -> TileRecord | None:
        path = self._record_path(a, b) if self.work_dir else None
        if path is None or not path.exists():
            return None
        if self.sims_dir and not (self.sims_dir / _tile_name(a, b)).exists():
            return None  # resumed with save_sims on: this tile's scores are still needed
        try:
            return TileRecord(a, b, **load_npz(path))
        except (OSError, ValueError, TypeError) as err:  # e.g. empty or cut short by a machine crash
            log.warning("resume record %s is unreadable (%s); recomputing the tile", path, err)
            return None

    def save(self, rec: TileRecord, scores: torch.Tensor) -> None:
        # The scores first, then the record: a record on disk means the tile is complete.
        if self.sims_dir:
            self.sims_dir.mkdir(parents=True, exist_ok=True)
            storage.atomic_write(self.sims_dir / _tile_name(rec.a, rec.b),
                         lambda f: np.save(f, scores.cpu().numpy()))
        if self.work_dir:
            fields = {k: v for k, v in asdict(rec).items() if k not in ("a", "b")}
            storage.atomic_write(self._record_path(rec.a, rec.b), lambda f: np.savez(f, **fields))

    def write_sims_index(self, plan: TilePlan) -> None:
        assert self.sims_dir is not None
        tiles = [{"file": _tile_name(a, b), "rows": [plan.rows(a).start, plan.rows(a).stop],
                  "cols": [plan.cols(b).start, plan.cols(b).stop]}
                 for a in range(len(plan.blocks)) for b in range(len(plan.blocks))]
        index = {"shape": [plan.n_images, plan.n_captions], **plan.describe(), "tiles": tiles}
        storage.write_bytes_atomic(self.sims_dir / "index.json", json.dumps(index).encode())


def _tile_name(a: int, b: int) -> str:
    return f"tile_{a:05d}_{b:05d}.npy"


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"key {key!r} was {str(old.get(key))[:80]!r}, now {str(new.get(key))[:80]!r}"
    return "no difference"


def load_sims(sims_dir: str | os.PathLike) -> np.ndarray:
    """The saved (N, M) float32 matrix, memory-mapped read-only.

    The tiles are copied once into ``sims.npy`` next to them (through a temporary name), so later
    calls only map that file.
    """
    sims_dir = Path(sims_dir)
    full = sims_dir / "sims.npy"
    if not full.exists():
        index_path = sims_dir / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} does not exist: not a finished save_sims directory")
        index = json.loads(index_path.read_text())
        with storage.atomic_path(full) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                            shape=tuple(index["shape"]))
            for tile in index["tiles"]:
                path = sims_dir / tile["file"]
                if not path.exists():
                    raise FileNotFoundError(f"similarity tile {path} listed in {index_path} is missing")
                (r0, r1), (c0, c1) = tile["rows"], tile["cols"]
                out[r0:r1, c0:c1] = open_npy(path)
            out.flush()
            del out
    return open_npy(full)


def write_topk(path: str | os.PathLike, result: EvalResult, emb: Embeddings) -> None:
    """Per-query top-K as JSON lines, both directions, with image and caption keys (atomic)."""
    if not result.topk:
        raise ValueError("write_topk: the evaluation ran with topk = 0")
    lines = []
    for direction, ranks in (("i2t", result.i2t_ranks), ("t2i", result.t2i_ranks)):
        scores, index = result.topk[direction]
        for q in range(scores.shape[0]):
            if direction == "i2t":
                query, name = emb.image_keys[q], emb.caption_key
            else:
                query, name = emb.caption_key(q), emb.image_keys.__getitem__
            hits = [{"key": name(int(j)), "index": int(j), "score": float(s)}
                    for s, j in zip(scores[q], index[q]) if j >= 0]
            lines.append(json.dumps({"direction": direction, "query": query, "query_index": q,
                                     "rank": int(ranks[q]) + 1, "topk": hits}))
    storage.write_bytes_atomic(Path(path), ("\n".join(lines) + "\n").encode())


def write_outputs(out_dir: str | os.PathLike, result: EvalResult, emb: Embeddings,
                  **extra: object) -> None:
    """``metrics.json`` (plus ``extra`` fields) and, when top-K ran, ``topk.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if result.topk:
        write_topk(out / "topk.jsonl", result, emb)
    summary = {"protocol": result.protocol, "precision": result.precision,
               "metrics": result.metrics, "full": result.full,
               "folds": result.folds, "tiles_computed": result.tiles_computed,
               "tiles_loaded": result.tiles_loaded, **extra}
    if (warning := tie_warning(result.metrics)):
        summary["warning"] = warning
    storage.write_bytes_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
