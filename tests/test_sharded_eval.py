"""Sharded evaluator: exact equality with recall_metrics (ties included), COCO folds, ensembles,
top-K export, save-sims, bad input. Multi-rank runs use real gloo process groups (torchrun)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sharded_eval_fixtures import stable_topk, tied_embeddings, tile_matrix
from helpers_dist import free_port
from scan.eval.encode import Embeddings, encode_records, save_embeddings
from scan.metrics import coco_1k_folds, recall_metrics, retrieval_ranks
from scan.eval.sharded import evaluate_embeddings
from scan.eval.store import load_sims, write_topk
from scan.eval.tiles import Member, make_plan, protocol_folds, score_tile
from scan.xattn import XAttnConfig

REPO = Path(__file__).resolve().parents[1]
T2I_AVG = XAttnConfig(direction="t2i", agg="mean", lambda_softmax=9.0)
I2T_LSE = XAttnConfig(direction="i2t", agg="lse", lambda_softmax=4.0, lambda_lse=5.0)


def _write_config(path: Path, xattn: XAttnConfig, **eval_fields) -> Path:
    path.write_text(yaml.safe_dump({"xattn": dataclasses.asdict(xattn), "eval": eval_fields}))
    return path


def _read_topk(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"i2t": [], "t2i": []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["direction"]].append(row)
    return out


@pytest.mark.integration
def test_two_gloo_ranks_equal_recall_metrics_exactly_with_ties(tmp_path: Path) -> None:
    emb = tied_embeddings(blocks=4, block=6)
    save_embeddings(emb, str(tmp_path / "emb.pt"))
    cfg = _write_config(tmp_path / "cfg.yaml", T2I_AVG, image_block=6, topk=4, save_sims=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(REPO / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "app.cli", "evaluate-embeddings", "--config", str(cfg),
         "--embeddings", str(tmp_path / "emb.pt"), "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    members = [Member(emb, T2I_AVG)]
    plan = make_plan(emb.num_images, 5, folds=protocol_folds("split", emb.num_images), image_block=6)
    sims = tile_matrix(members, plan)
    i2t, t2i = retrieval_ranks(sims, 5)
    # The construction really produces ties at the positives, in both directions.
    own = sims.reshape(24, 24, 5)[np.arange(24), np.arange(24)]
    assert (sims == own.max(1)[:, None]).sum(1).max() > 1  # an image ties with foreign captions
    assert (sims == sims[np.arange(120) // 5, np.arange(120)][None]).sum(0).max() > 1

    summary = json.loads((tmp_path / "out/metrics.json").read_text())
    assert summary["metrics"] == recall_metrics(sims, 5)
    assert summary["tiles_computed"] == 16 and summary["tiles_loaded"] == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rsum"] == summary["metrics"]["rsum"]
    # Saved tiles memory-map into exactly the matrix that was ranked.
    saved = load_sims(tmp_path / "out/sims")
    assert isinstance(saved, np.memmap) and saved.shape == (24, 120)
    np.testing.assert_array_equal(saved, sims)
    # Exact per-query ranks and top-K, both directions, from the JSON-lines export.
    top = _read_topk(tmp_path / "out/topk.jsonl")
    assert [r["rank"] - 1 for r in top["i2t"]] == i2t.tolist()
    assert [r["rank"] - 1 for r in top["t2i"]] == t2i.tolist()
    for direction, matrix in (("i2t", sims), ("t2i", sims.T)):
        s, idx = stable_topk(matrix, 4)
        assert [[h["index"] for h in r["topk"]] for r in top[direction]] == idx.tolist()
        assert [[h["score"] for h in r["topk"]] for r in top[direction]] == s.astype(float).tolist()
    assert top["i2t"][3]["query"] == "img0003" and top["i2t"][3]["topk"][0]["key"].startswith("img")
    assert top["t2i"][7]["query"] == "img0001#2"

    # One process, another tiling: the same ranks as the brute-force matrix of one xattn call.
    full = score_tile(members, slice(None), slice(None)).numpy()
    np.testing.assert_allclose(full, sims, rtol=0, atol=1e-5)
    single = evaluate_embeddings(members, image_block=5, topk=0)
    assert single.metrics == recall_metrics(full, 5) == summary["metrics"]
    assert single.tiles_computed == 25


def test_coco_1k_scores_the_folds_and_5k_everything() -> None:
    emb = tied_embeddings(blocks=5, block=8, seed=1)  # five 8-image folds stand in for 1,000
    members = [Member(emb, T2I_AVG)]
    res_1k = evaluate_embeddings(members, protocol="coco1k", fold_images=8, image_block=5)
    res_5k = evaluate_embeddings(members, protocol="coco5k", fold_images=8, image_block=5)
    plan = make_plan(40, 5, folds=protocol_folds("coco1k", 40, 8), image_block=5)
    assert all(b[1] - b[0] <= 5 and (b[0] // 8) == ((b[1] - 1) // 8) for b in plan.blocks)
    sims = tile_matrix(members, plan)
    ref = coco_1k_folds(sims, 5, folds=5)
    assert res_1k.folds == res_5k.folds == ref["folds"]
    assert res_1k.metrics == ref["mean"]
    assert res_1k.metrics["rsum"] == pytest.approx(
        sum(res_1k.metrics[d][r] for d in ("i2t", "t2i") for r in ("r1", "r5", "r10")))
    assert res_5k.metrics == res_5k.full == recall_metrics(sims, 5)
    assert res_1k.full is None  # 1K scores only the tiles inside a fold: a fifth of the work
    per_fold = sum(1 for b in plan.blocks if b[0] < 8)
    assert res_1k.tiles_computed == 5 * per_fold ** 2 and res_5k.tiles_computed == len(plan.blocks) ** 2


def test_ensemble_averages_member_tiles() -> None:
    a = tied_embeddings(blocks=3, block=5, seed=2)
    b = dataclasses.replace(tied_embeddings(blocks=3, block=5, seed=3), image_keys=a.image_keys)
    members = [Member(a, T2I_AVG), Member(b, I2T_LSE)]
    res = evaluate_embeddings(members, image_block=5)
    plan = make_plan(15, 5, folds=[(0, 15)], image_block=5)
    s1, s2 = tile_matrix(members[:1], plan), tile_matrix(members[1:], plan)
    assert res.metrics == recall_metrics((s1 + s2) / 2, 5)
    assert res.metrics != recall_metrics(s1, 5)  # the second model changes the figures
    other = dataclasses.replace(b, image_keys=[k + "x" for k in a.image_keys])
    with pytest.raises(ValueError, match="ensemble member 1 was encoded from a different split"):
        evaluate_embeddings([Member(a, T2I_AVG), Member(other, I2T_LSE)])


def test_topk_export_single_process(tmp_path: Path) -> None:
    emb = tied_embeddings(blocks=3, block=4, seed=4)
    res = evaluate_embeddings([Member(emb, T2I_AVG)], image_block=3, topk=50)
    write_topk(tmp_path / "top.jsonl", res, emb)
    rows = _read_topk(tmp_path / "top.jsonl")
    assert len(rows["i2t"]) == 12 and len(rows["t2i"]) == 60
    assert all(len(r["topk"]) == 50 for r in rows["i2t"])  # 60 candidates
    assert all(len(r["topk"]) == 12 for r in rows["t2i"])  # only 12 images exist


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    emb = tied_embeddings(blocks=2, block=3)
    with pytest.raises(ValueError, match="29 captions for 6 images is not 5 captions per image"):
        Embeddings(emb.images, emb.img_lens, emb.captions[:29], emb.cap_lens[:29], emb.image_keys, 5)
    with pytest.raises(ValueError, match="'f30k1k' expects the 1,000-image"):
        evaluate_embeddings([Member(emb, T2I_AVG)], protocol="f30k1k")
    with pytest.raises(ValueError, match="'coco1k' expects five 1000-image folds"):
        evaluate_embeddings([Member(emb, T2I_AVG)], protocol="coco1k")
    with pytest.raises(ValueError, match="'coco10k' is not one of"):
        evaluate_embeddings([Member(emb, T2I_AVG)], protocol="coco10k")
    nan = dataclasses.replace(emb, images=emb.images.clone())
    nan.images[4, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite similarity in tile \(1, 1\): image 4, caption 15"):
        evaluate_embeddings([Member(nan, T2I_AVG)], image_block=3)
    # A resume directory of one evaluation is never reused for another.
    evaluate_embeddings([Member(emb, T2I_AVG)], image_block=3, work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="holds records of a different evaluation"):
        evaluate_embeddings([Member(emb, I2T_LSE)], image_block=3, work_dir=tmp_path / "w")


class _Sample:
    def __init__(self, key: str, n_caps: int) -> None:
        self.key, self.regions = key, np.ones((3, 4), np.float16)
        self.captions = [f"caption {i}" for i in range(n_caps)]
        self.tokens = [["caption", str(i)] for i in range(n_caps)]


class _Identity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode_images(self, regions: torch.Tensor, img_lens: torch.Tensor) -> torch.Tensor:
        return regions * self.w

    def encode_captions(self, tokens: torch.Tensor, cap_lens: torch.Tensor) -> torch.Tensor:
        return tokens[..., None].float().expand(-1, -1, 4) * self.w


def test_encode_refuses_wrong_caption_count() -> None:
    records = [_Sample("a", 5), _Sample("b", 4)]
    with pytest.raises(ValueError, match="image 'b' has 4 captions .* eval.caps_per_image is 5"):
        encode_records(_Identity(), records, encode_text=lambda t, r: [1, 2], caps_per_image=5,
                       precision="fp32")


def test_results_say_their_precision() -> None:
    """Reported figures are fp32 unless asked (issue 10: bf16 moved 6.5% of image queries)."""
    emb = tied_embeddings(blocks=2, block=5, seed=4)
    assert evaluate_embeddings([Member(emb, T2I_AVG)]).precision == "fp32"
    low = evaluate_embeddings([Member(emb.to("cpu", torch.bfloat16), T2I_AVG)])
    assert low.precision == "bf16"
    from scan.config import EvalConfig

    assert EvalConfig().precision == "fp32"
