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
from trainer import checkpoint
from trainer.telemetry import read_run_log

pytestmark = pytest.mark.integration

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
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", *train_args(shards, out, *RUN)],
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


CRASH = Path(__file__).with_name("helpers_crash.py")
# 60 captions / batch 6 = 10 steps per epoch; saves: 1 = step 5, 2 = step 10 (periodic),
# 3 = step 10 again at the epoch's end (new name step00000010-1), 4 = step 14 (max_steps).
KILL_RUN = ("data.batch_size=6", "data.num_workers=2", f"train.max_steps={STEPS}",
            "train.ckpt_every_steps=5", "train.keep_checkpoints=2")
EPOCH_END_SAVE_STEPS = ("rename step00000010-1.partial into place", "replace latest",
                        "remove step00000010")


@pytest.mark.parametrize("op", [1, 2, 3], ids=EPOCH_END_SAVE_STEPS)
def test_a_kill_at_every_step_of_a_save_resumes_exactly(shards, straight, tmp_path, op):
    """Issue 10: when the epoch-end save repeated a periodic save's step, the old folder was moved
    away before the new one was renamed in: a kill there left `latest` naming a missing folder."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(CRASH), "3", str(op), "--", "train", *train_args(shards, out, *KILL_RUN)]
    killed = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"fs-step 3 {op} " in killed.stderr  # died just before this step of the epoch-end save
    ckpt = out / "checkpoints"
    expected = "step00000010-1" if op > 2 else "step00000010"
    assert checkpoint.latest_tag(ckpt) == expected  # names a complete checkpoint either way
    resumed = run_train(shards, out, *KILL_RUN, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt / expected}" in resumed.stderr
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    assert checkpoint.complete_tags(ckpt)[-1] == checkpoint.latest_tag(ckpt) == "step00000014"
    assert not list(ckpt.glob("*.partial")) and not list(ckpt.glob("latest.tmp-*"))


def test_a_checkpoint_at_the_epochs_last_partial_batch_resumes(shards, tmp_path):
    """Issue 10: max_steps on an epoch's last, partial batch saved start_sample=60 with batch 7,
    which resuming refused (not a multiple of the batch size)."""
    run = ("data.batch_size=7", "data.num_workers=1")  # 60 captions: 8 batches of 7 and one of 4
    straight = tmp_path / "straight"
    assert run_train(shards, straight, *run, "train.max_steps=12").returncode == 0
    out = tmp_path / "stopped"
    first = run_train(shards, out, *run, "train.max_steps=9")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(shards, out, *run, "train.max_steps=12", resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _losses(straight), _losses(out)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_resuming_mid_epoch_with_another_epoch_order_names_the_keys(shards, tmp_path):
    out = tmp_path / "run"
    assert run_train(shards, out, *RUN[:-2], "train.max_steps=3").returncode == 0
    done = run_train(shards, out, *RUN[:-2], "train.max_steps=5", "train.seed=7", resume="latest")
    assert done.returncode == 2
    assert "inside epoch 0" in done.stderr and "train.seed was 0, now 7" in done.stderr
    assert "Traceback" not in done.stderr
