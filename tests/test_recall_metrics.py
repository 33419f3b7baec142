"""Recall metrics: hand-computed cases (ties included), the reference's loops, COCO 1K folds, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scan.metrics import (coco_1k_folds, mean_metrics, metrics_from_ranks, recall_metrics,
                              retrieval_ranks)


def reference_ranks(sims, cpi):
    """kuanghuei/SCAN evaluation.py i2t / t2i rank loops (valid when there are no ties)."""
    n = sims.shape[0]
    i2t = np.zeros(n, dtype=np.int64)
    for index in range(n):
        inds = np.argsort(sims[index])[::-1]
        i2t[index] = min(np.where(inds == i)[0][0] for i in range(cpi * index, cpi * index + cpi))
    t2i = np.zeros(cpi * n, dtype=np.int64)
    for j in range(cpi * n):
        inds = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(inds == j // cpi)[0][0]
    return i2t, t2i


def reference_direction(ranks):
    return {"r1": 100.0 * len(np.where(ranks < 1)[0]) / len(ranks),
            "r5": 100.0 * len(np.where(ranks < 5)[0]) / len(ranks),
            "r10": 100.0 * len(np.where(ranks < 10)[0]) / len(ranks),
            "medr": np.floor(np.median(ranks)) + 1,
            "meanr": ranks.mean() + 1}


def test_hand_computed_small_case():
    # 3 images × 2 captions each; caption j belongs to image j // 2.
    sims = np.array([
        # c0    c1    c2    c3    c4    c5
        [0.90, 0.10, 0.50, 0.20, 0.30, 0.00],  # image 0: own best 0.90 → rank 0
        [0.80, 0.70, 0.60, 0.75, 0.95, 0.10],  # image 1: own best 0.75; better: 0.80, 0.95 → rank 2
        [0.20, 0.30, 0.40, 0.10, 0.05, 0.35],  # image 2: own best 0.35; better: 0.40 → rank 1
    ])
    i2t, t2i = retrieval_ranks(sims, caps_per_image=2)
    np.testing.assert_array_equal(i2t, [0, 2, 1])
    # column j: images scoring strictly above image j // 2.
    # c0: 0.90 top → 0; c1: own 0.10 < 0.70, 0.30 → 2; c2: own 0.60 < ... none above? 0.50, 0.40 → 0
    # c3: own 0.75 → 0; c4: own 0.05 < 0.30, 0.95 → 2; c5: own 0.35 > 0.00, 0.10 → 0
    np.testing.assert_array_equal(t2i, [0, 2, 0, 0, 2, 0])
    m = recall_metrics(sims, caps_per_image=2)
    assert m["i2t"] == {"r1": pytest.approx(100 / 3), "r5": 100.0, "r10": 100.0,
                        "medr": 2.0, "meanr": pytest.approx(2.0)}
    assert m["t2i"] == {"r1": pytest.approx(400 / 6), "r5": 100.0, "r10": 100.0,
                        "medr": 1.0, "meanr": pytest.approx(1 + 4 / 6)}
    assert m["rsum"] == pytest.approx(100 / 3 + 200 + 400 / 6 + 200)


def test_ties_count_against_the_query():
    # Every score equal: every competitor ties, so every query ranks last (the worst order).
    flat = recall_metrics(np.full((4, 8), 0.5), caps_per_image=2)
    assert flat["i2t"] == {"r1": 0.0, "r5": 0.0, "r10": 100.0, "medr": 7.0, "meanr": 7.0}  # 6 others
    assert flat["t2i"] == {"r1": 0.0, "r5": 100.0, "r10": 100.0, "medr": 4.0, "meanr": 4.0}  # 3 others
    assert flat["ties"] == {"i2t": 4, "t2i": 8, "queries": 12}
    # A negative tying the positive pushes it down, as one strictly above does; an own caption
    # tying the best own caption is no competitor.
    sims = np.array([[0.5, 0.5, 0.1, 0.2],
                     [0.5, 0.6, 0.1, 0.1]])
    i2t, t2i = retrieval_ranks(sims, caps_per_image=2)
    # image 0: best own 0.5 (twice), nothing else >= 0.5 → 0; image 1: 0.5 and 0.6 >= its 0.1 → 2
    np.testing.assert_array_equal(i2t, [0, 2])
    # c0: tie 0.5 / 0.5 → 1; c1: 0.6 beats 0.5 → 1; c2: tie 0.1 / 0.1 → 1; c3: 0.2 beats 0.1 → 1
    np.testing.assert_array_equal(t2i, [1, 1, 1, 1])
    assert recall_metrics(sims, caps_per_image=2)["ties"] == {"i2t": 0, "t2i": 2, "queries": 6}


def test_tie_free_figures_equal_the_strict_count():
    """On a matrix without ties, counting >= (ties against) and counting > (the earlier rule) give
    the same ranks, so every earlier tie-free figure stands to the digit."""
    rng = np.random.default_rng(3)
    sims = rng.normal(size=(30, 150)) + np.repeat(np.eye(30), 5, axis=1)
    own = sims.reshape(30, 30, 5)[np.arange(30), np.arange(30)].max(1)
    strict_i2t = (sims > own[:, None]).sum(1)
    strict_t2i = (sims > sims[np.arange(150) // 5, np.arange(150)][None]).sum(0)
    i2t, t2i = retrieval_ranks(sims, 5)
    np.testing.assert_array_equal(i2t, strict_i2t)
    np.testing.assert_array_equal(t2i, strict_t2i)
    m = recall_metrics(sims, 5)
    assert m == {**metrics_from_ranks(strict_i2t, strict_t2i), "ties": {"i2t": 0, "t2i": 0, "queries": 180}}


@pytest.mark.parametrize("cpi", [1, 5])
def test_matches_reference_loops_without_ties(cpi):
    rng = np.random.default_rng(0)
    n = 40
    # Signal on the diagonal blocks so that recalls are neither 0 nor 100.
    sims = rng.normal(size=(n, n * cpi)) + 1.5 * np.repeat(np.eye(n), cpi, axis=1)
    ours_i2t, ours_t2i = retrieval_ranks(sims, cpi)
    ref_i2t, ref_t2i = reference_ranks(sims, cpi)
    np.testing.assert_array_equal(ours_i2t, ref_i2t)
    np.testing.assert_array_equal(ours_t2i, ref_t2i)
    m = recall_metrics(sims, cpi)
    for direction, ranks in (("i2t", ref_i2t), ("t2i", ref_t2i)):
        assert m[direction] == pytest.approx(reference_direction(ranks))
    assert 0 < m["i2t"]["r1"] < 100


def test_metrics_from_ranks_medr_meanr_are_one_based():
    m = metrics_from_ranks(np.array([0, 1]), np.array([0, 3, 9, 12]))
    # i2t: median 0.5 → floor 0 → medr 1; mean 0.5 → meanr 1.5
    assert m["i2t"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.5}
    # t2i: median 6 → medr 7; mean 6 → meanr 7; r1 25, r5 50, r10 75
    assert m["t2i"] == {"r1": 25.0, "r5": 50.0, "r10": 75.0, "medr": 7.0, "meanr": 7.0}
    assert m["rsum"] == 50 + 100 + 100 + 25 + 50 + 75


def test_torch_input_and_bfloat16():
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(10, 50)).astype(np.float32)
    ref = recall_metrics(sims)
    assert recall_metrics(torch.from_numpy(sims)) == ref
    low = torch.from_numpy(sims).bfloat16()
    assert recall_metrics(low) == recall_metrics(low.float().numpy())


def test_coco_1k_folds_and_the_mean_rsum():
    rng = np.random.default_rng(2)
    size, cpi = 30, 5
    sims = rng.normal(size=(5 * size, 5 * size * cpi)) + 1.2 * np.repeat(np.eye(5 * size), cpi, axis=1)
    # Off-diagonal blocks must be ignored: make them overwhelmingly high.
    for f in range(5):
        sims[f * size:(f + 1) * size, :f * size * cpi] += 100.0
    out = coco_1k_folds(sims, caps_per_image=cpi)
    assert len(out["folds"]) == 5
    for f, fold in enumerate(out["folds"]):
        block = sims[f * size:(f + 1) * size, f * size * cpi:(f + 1) * size * cpi]
        assert fold == recall_metrics(block, cpi)
    mean = out["mean"]
    for d in ("i2t", "t2i"):
        for field in ("r1", "r5", "r10", "medr", "meanr"):
            assert mean[d][field] == pytest.approx(np.mean([fold[d][field] for fold in out["folds"]]))
    six_means = sum(mean[d][r] for d in ("i2t", "t2i") for r in ("r1", "r5", "r10"))
    assert mean["rsum"] == pytest.approx(six_means)
    assert mean["rsum"] == pytest.approx(np.mean([fold["rsum"] for fold in out["folds"]]))
    # The reference prints 6 × mean(i2t average recall) as rsum; it differs when i2t ≠ t2i.
    reference_printed = 6 * np.mean([(fold["i2t"]["r1"] + fold["i2t"]["r5"] + fold["i2t"]["r10"]) / 3
                                     for fold in out["folds"]])
    assert abs(reference_printed - mean["rsum"]) > 1.0


def test_mean_metrics_hand_values():
    a = metrics_from_ranks(np.array([0, 0]), np.array([0, 20]))
    b = metrics_from_ranks(np.array([0, 10]), np.array([20, 20]))
    m = mean_metrics([a, b])
    assert m["i2t"] == {"r1": 75.0, "r5": 75.0, "r10": 75.0, "medr": 3.5, "meanr": 3.5}
    assert m["t2i"]["r1"] == 25.0 and m["t2i"]["medr"] == pytest.approx((11 + 21) / 2)
    assert m["rsum"] == 3 * 75.0 + 3 * 25.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sims_are_refused(bad):
    sims = np.zeros((2, 10))
    sims[1, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite.*sims\[1, 3\]"):
        recall_metrics(sims)
    with pytest.raises(ValueError, match="non-finite"):
        coco_1k_folds(np.concatenate([sims] * 5, axis=0).repeat(5, axis=1)[:, :50])


def test_bad_shapes_and_ranks_are_refused():
    with pytest.raises(ValueError, match=r"\(2, 9\).*caps_per_image 5 = 10"):
        recall_metrics(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="2-D"):
        recall_metrics(np.zeros(10))
    with pytest.raises(ValueError, match="floating"):
        recall_metrics(np.zeros((2, 10), dtype=np.int64))
    with pytest.raises(ValueError, match="5 equal folds"):
        coco_1k_folds(np.zeros((12, 60)))
    with pytest.raises(ValueError, match="i2t_ranks"):
        metrics_from_ranks(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="t2i_ranks.*0-based"):
        metrics_from_ranks(np.array([0, 1]), np.array([-1, 1]))
    with pytest.raises(ValueError, match="no metrics"):
        mean_metrics([])
