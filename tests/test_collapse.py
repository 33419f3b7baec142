"""A collapsed run is caught while it trains (trainer.collapse), and a healthy one is not.

The collapse value is checked against the real loss on an all-equal score matrix; a run made to
collapse (every region feature zero, so every score is 0) stops with a clear error, or with
``train.on_collapse=continue`` trains on with the alerts in its run log and validation metrics.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dataio.shard_writer import ShardWriter, write_manifest
from dataio.shards import manifest_url
from dataio.sources.synthetic import synthetic_samples, write_synthetic
from dataio.text import tokenize
from helpers_dist import run_train
from scan.loss import hardest_negative_loss
from trainer.collapse import collapse_value
from trainer.telemetry import read_run_log

pytestmark = pytest.mark.integration
CAPTION = "a red square above a blue circle"


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_collapse_value_is_the_loss_of_equal_scores(max_violation: bool, mask: bool):
    ids = [0, 1, 2, 0, 3, 2, 2, 4]  # duplicates: pairs of the same image are no negatives (mask)
    scores = torch.full((8, 8), 0.37)
    want = hardest_negative_loss(scores, 0.2, max_violation, torch.tensor(ids) if mask else None)
    got = collapse_value([ids], 0.2, max_violation, mask, cross_device=True)
    assert got == pytest.approx(float(want), rel=1e-6)
    # Mined over the gathered batch or within each rank's: the same ids split over two ranks.
    assert collapse_value([ids[:3], ids[3:]], 0.2, max_violation, mask, True) == pytest.approx(got)
    per_rank = sum(float(hardest_negative_loss(torch.zeros(len(p), len(p)), 0.2, max_violation,
                                               torch.tensor(p) if mask else None)) for p in (ids[:3], ids[3:]))
    assert collapse_value([ids[:3], ids[3:]], 0.2, max_violation, mask, False) == pytest.approx(per_rank)


def _zero_feature_shards(dest: Path, split: str, n: int) -> str:
    """Generated scenes made indistinguishable: every region feature zero, every caption the same,
    so every image-caption pair scores alike whatever the model learns."""
    with ShardWriter(str(dest), split=split, max_samples=20) as w:
        for s in synthetic_samples(n, seed=1, split=split, dim=64):
            w.write(replace(s, regions=np.zeros_like(s.regions), captions=[CAPTION] * 5,
                            tokens=[tokenize(CAPTION)] * 5))
    write_manifest(str(dest), w.records, split=split, extractor={"name": "zeros", "dim": 64, "version": 1})
    return manifest_url(str(dest))


@pytest.fixture(scope="module")
def dead(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("dead")
    return _zero_feature_shards(root / "train", "train", 24), _zero_feature_shards(root / "val", "val", 10)


def _alerts(run: Path) -> list[dict]:
    return [r for r in read_run_log(run / "metrics.jsonl") if r["kind"] == "alert"]


def test_a_collapsed_run_stops_with_a_clear_error(dead, tmp_path: Path):
    train, val = dead
    done = run_train(train, tmp_path / "run", f"data.val_shards={val}", "train.collapse_steps=5",
                     "train.epochs=1")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "training stopped: collapsed model at epoch 0, step 5" in done.stderr
    assert "train.collapse_steps" in done.stderr and "train.on_collapse=continue" in done.stderr
    (alert,) = _alerts(tmp_path / "run")
    assert alert["alert"] == "collapse" and alert["step"] == 5 and "collapse value 3.2" in alert["message"]


def test_told_to_continue_it_trains_on_and_its_metrics_say_so(dead, tmp_path: Path):
    train, val = dead
    done = run_train(train, tmp_path / "run", f"data.val_shards={val}", "train.collapse_steps=5",
                     "train.epochs=1", "train.on_collapse=continue")
    assert done.returncode == 0, done.stderr[-3000:]
    messages = [a["message"] for a in _alerts(tmp_path / "run")]
    assert len(messages) == 2
    assert "training loss has sat at its collapse value" in messages[0]
    assert "validation's scores are constant (" in messages[1] and "for every pair" in messages[1]
    (val_record,) = [r for r in read_run_log(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    metrics = val_record["metrics"]
    # The worst order: i2t ranks 46th of 50 captions (R@10 0), t2i 10th of 10 images (R@10 100).
    assert metrics["collapsed"] == 1 and metrics["i2t_medr"] == 46 and metrics["t2i_medr"] == 10
    assert metrics["rsum"] == 100.0
    assert metrics["ties_i2t"] == 10 and metrics["ties_t2i"] == 50
    assert "had a competitor scoring exactly their positive's score" in done.stderr


def test_a_healthy_run_raises_no_alert(tmp_path: Path):
    shards = write_synthetic(str(tmp_path / "train"), 24, seed=2, dim=64, shard_size=12)
    val = write_synthetic(str(tmp_path / "val"), 10, seed=2, split="val", dim=64, shard_size=10)
    done = run_train(shards, tmp_path / "run", f"data.val_shards={val}", "train.collapse_steps=2",
                     "train.epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _alerts(tmp_path / "run") == []
    evals = [r for r in read_run_log(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and all("collapsed" not in r["metrics"] for r in evals)
