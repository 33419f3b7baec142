"""Ties count against the query, on every path that ranks; the reference's recall functions as a peer.

A model that gives every pair one score must get the recall of the worst order (at or below
chance), never a perfect one: scan.metrics, the sharded evaluator's tiles (diagonal and not), its
COCO 1K folds, the retrieval tool's ranks. The Ray evaluator's job is in test_sharded_eval_ray.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference_scan as ref
from scan.eval.encode import Embeddings
from scan.eval.sharded import evaluate_embeddings
from scan.eval.tiles import Member
from scan.metrics import coco_1k_folds, rank_counts, recall_metrics, tie_warning
from scan.xattn import XAttnConfig
from tools.retrieve import _first_relevant

T2I = XAttnConfig(direction="t2i", agg="mean", lambda_softmax=9.0)


def chance(n_images: int, cpi: int) -> dict[str, dict[str, float]]:
    """Expected R@K of a random order: t2i K/N; i2t 1 - C(M - cpi, K) / C(M, K)."""
    m = n_images * cpi
    return {"t2i": {f"r{k}": 100.0 * min(k, n_images) / n_images for k in (1, 5, 10)},
            "i2t": {f"r{k}": 100.0 * (1 - math.comb(m - cpi, k) / math.comb(m, k)) for k in (1, 5, 10)}}


def assert_at_or_below_chance(metrics: dict, n_images: int, cpi: int) -> None:
    expected = chance(n_images, cpi)
    for direction in ("i2t", "t2i"):
        for k, value in expected[direction].items():
            assert metrics[direction][k] <= value + 1e-9, (direction, k, metrics[direction][k], value)


def zero_embeddings(n_images: int, cpi: int = 5, k: int = 4, n: int = 5, d: int = 8) -> Embeddings:
    """Embeddings of a dead model: every region and word vector zero, so every pair scores 0."""
    return Embeddings(torch.zeros(n_images, k, d), torch.full((n_images,), k),
                      torch.zeros(n_images * cpi, n, d), torch.full((n_images * cpi,), n),
                      [f"img{i:03d}" for i in range(n_images)], cpi)


def test_constant_matrix_is_at_or_below_chance_on_every_in_process_path():
    n, cpi = 20, 5
    const = np.zeros((n, n * cpi), np.float32)
    m = recall_metrics(const, cpi)
    assert_at_or_below_chance(m, n, cpi)
    assert m["i2t"]["r10"] == m["t2i"]["r10"] == 0.0 and m["rsum"] == 0.0
    assert m["ties"] == {"i2t": n, "t2i": n * cpi, "queries": n + n * cpi}
    assert "100.0% of the queries" in tie_warning(m)

    folds = coco_1k_folds(const, cpi)  # five folds of 4 images: R@5 of t2i is chance (100%) there
    for fold in folds["folds"]:
        assert_at_or_below_chance(fold, n // 5, cpi)
    assert folds["mean"]["ties"] == m["ties"]

    members = [Member(zero_embeddings(n, cpi), T2I)]
    for block in (4, 7, 20):  # diagonal tiles only, several tiles, a ragged last one
        result = evaluate_embeddings(members, image_block=block)
        assert result.metrics == m, block
        assert result.score_range == (0.0, 0.0)
    coco = evaluate_embeddings(members, protocol="coco1k", fold_images=4, image_block=2)
    assert coco.metrics == folds["mean"]

    # The retrieval tool: a constant gallery puts the ground truth after every other item.
    scores = torch.zeros(n * cpi)
    relevant = torch.zeros(n * cpi, dtype=torch.bool)
    relevant[:cpi] = True
    assert _first_relevant(scores, relevant) == n * cpi - cpi + 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cpi", [1, 5])
def test_reference_recalls_equal_ours_without_ties(seed: int, cpi: int):
    rng = np.random.default_rng(seed)
    n = 50
    sims = rng.normal(size=(n, n * cpi)) + 1.5 * np.repeat(np.eye(n), cpi, axis=1)
    ours = recall_metrics(sims, cpi)
    assert ours["ties"] == {"i2t": 0, "t2i": 0, "queries": n + n * cpi}
    (r_i2t, (ranks_i2t, _)), (r_t2i, (ranks_t2i, _)) = (ref.i2t(n, sims, True, cpi),
                                                          ref.t2i(n, sims, True, cpi))
    fields = ("r1", "r5", "r10", "medr", "meanr")
    assert tuple(ours["i2t"][f] for f in fields) == r_i2t
    assert tuple(ours["t2i"][f] for f in fields) == r_t2i
    i2t, t2i, _, _ = rank_counts(sims, cpi)
    np.testing.assert_array_equal(i2t, ranks_i2t)
    np.testing.assert_array_equal(t2i, ranks_t2i)


@pytest.mark.parametrize("levels", [2, 3, 8])
def test_ours_never_above_the_reference_with_ties(levels: int):
    """Scores on a few levels tie often; the reference's argsort breaks ties somehow, we count
    every tie against the query: our ranks are at least theirs, our recalls at most theirs."""
    rng = np.random.default_rng(levels)
    n, cpi = 40, 5
    sims = rng.integers(0, levels, size=(n, n * cpi)).astype(np.float64)
    ours = recall_metrics(sims, cpi)
    assert ours["ties"]["i2t"] + ours["ties"]["t2i"] > 0
    i2t, t2i, _, _ = rank_counts(sims, cpi)
    for mine, (theirs, (ranks, _)) in ((i2t, ref.i2t(n, sims, True, cpi)),
                                       (t2i, ref.t2i(n, sims, True, cpi))):
        assert (mine >= ranks).all()
    for direction, theirs in (("i2t", ref.i2t(n, sims, cpi=cpi)), ("t2i", ref.t2i(n, sims, cpi=cpi))):
        for k, value in zip(("r1", "r5", "r10"), theirs[:3]):
            assert ours[direction][k] <= value
        assert ours[direction]["meanr"] >= theirs[4]


def test_coco_1k_rsum_is_the_sum_of_the_six_fold_mean_recalls():
    rng = np.random.default_rng(5)
    size, cpi = 20, 5
    sims = rng.normal(size=(5 * size, 5 * size * cpi)) + 1.2 * np.repeat(np.eye(5 * size), cpi, axis=1)
    mean = coco_1k_folds(sims, cpi)["mean"]
    peer = ref.evalrank_fold5(sims, cpi)
    np.testing.assert_allclose([mean["i2t"][f] for f in ("r1", "r5", "r10", "medr", "meanr")], peer["i2t"])
    np.testing.assert_allclose([mean["t2i"][f] for f in ("r1", "r5", "r10", "medr", "meanr")], peer["t2i"])
    assert mean["rsum"] == pytest.approx(sum(peer["i2t"][:3]) + sum(peer["t2i"][:3]))
    assert mean["rsum"] == pytest.approx(peer["mean_rsum"])
    # What the reference prints as rsum: 6 x the mean i2t average recall, another number.
    assert abs(peer["printed_rsum"] - mean["rsum"]) > 1.0


def test_tie_warning_only_above_one_percent():
    rng = np.random.default_rng(9)
    n = 100
    sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
    assert recall_metrics(sims)["ties"]["t2i"] == 0 and tie_warning(recall_metrics(sims)) is None
    # Tie 5 caption queries (5 of 600 queries, 0.8%): counted, no warning.
    for c in range(5):
        sims[1, c] = sims[0, c]
    m = recall_metrics(sims)
    assert m["ties"]["t2i"] == 5 and tie_warning(m) is None
    for c in range(5, 20):  # 20 of 600 (3.3%): a warning in words
        sims[(c // 5 + 1) % n, c] = sims[c // 5, c]
    m = recall_metrics(sims)
    assert m["ties"]["t2i"] == 20
    assert "3.3% of the queries" in tie_warning(m) and "collapsed" in tie_warning(m)


@pytest.mark.integration
def test_two_gloo_ranks_rank_a_constant_matrix_last(tmp_path):
    """The torchrun path of the sharded evaluator (tiles over two ranks, counts combined)."""
    import dataclasses
    import json
    import os
    import subprocess

    import yaml

    from helpers_dist import REPO, free_port
    from scan.eval.encode import save_embeddings

    n = 12
    save_embeddings(zero_embeddings(n), str(tmp_path / "dead.pt"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"xattn": dataclasses.asdict(T2I),
                                                        "eval": {"image_block": 4}}))
    proc = subprocess.run(
        [str(REPO / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "app.cli", "evaluate-embeddings", "--config",
         str(tmp_path / "cfg.yaml"), "--embeddings", str(tmp_path / "dead.pt"), "--out", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics == recall_metrics(np.zeros((n, 5 * n), np.float32), 5)
    assert_at_or_below_chance(metrics, n, 5)
    assert metrics["ties"] == {"i2t": n, "t2i": 5 * n, "queries": 6 * n}
