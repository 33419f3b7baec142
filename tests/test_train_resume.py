"""Kill-and-resume: a run SIGKILLed after a checkpoint and resumed with ``--resume latest`` has
exactly the per-step losses of an uninterrupted run (CPU, fp32, fixed seed); a crash mid-save
leaves the previous checkpoint in use."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_dist import REPO, cpu_env, run_train, train_args
from trainer.telemetry import read_run_log

STEPS = 14  # 60 captions / batch 6 = 10 steps per epoch: the runs cross an epoch boundary
CKPT_EVERY = 3
RUN = ("data.batch_size=6", "data.num_workers=2", f"train.max_steps={STEPS}",
       f"train.ckpt_every_steps={CKPT_EVERY}", "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from dataio.sources.synthetic import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("resume_shards")), 12, seed=3, dim=64,
                           shard_size=5)


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after resuming) keeps the later one."""
    return {r["step"]: r["loss"] for r in read_run_log(run_dir / "metrics.jsonl") if r["kind"] == "step"}


def _kill_after_first_checkpoint(shards: str, out: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", *train_args(shards, out, *RUN)],
                            cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("straight")
    done = run_train(shards, out, *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(out)


def test_killed_run_resumes_with_identical_losses(shards, straight, tmp_path):
    out = tmp_path / "killed"
    assert _kill_after_first_checkpoint(shards, out) == -signal.SIGKILL
    killed_at = len(_losses(out))
    assert killed_at < STEPS
    resumed = run_train(shards, out, *RUN, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    losses = _losses(out)
    assert sorted(straight) == sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    assert len(set(straight.values())) > STEPS // 2  # training moved: losses are not constant


def test_partial_save_leaves_previous_checkpoint_in_use(shards, straight, tmp_path):
    """A crash mid-save (simulated: a half-written ``<tag>.partial`` directory and a stray temp
    ``latest``) does not change what ``--resume latest`` loads, and the next save cleans it up."""
    out = tmp_path / "partial"
    first = run_train(shards, out, *RUN[:-2], "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000003"
    crashed = ckpt / "step00000004.partial"
    shutil.copytree(ckpt / "step00000003", crashed)
    for f in sorted(crashed.iterdir())[::2]:  # drop every other file: a torn write
        f.unlink()
    (ckpt / "latest.tmp-999").write_text("step00000004.partial\n")
    resumed = run_train(shards, out, *RUN[:-2], "train.max_steps=5", resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step00000003" in resumed.stderr
    losses = _losses(out)
    for step in range(1, 6):
        assert losses[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    assert (ckpt / "latest").read_text().strip() == "step00000005"
    assert not crashed.exists()

