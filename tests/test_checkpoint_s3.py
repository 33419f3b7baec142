"""Checkpoints in object storage (``train.output_dir=s3://bucket/run``) against moto's real S3
server: a run killed in the middle of a checkpoint's upload leaves ``latest`` on the previous
complete checkpoint, and resumed from another host's (empty) local folder it logs exactly the losses
of an uninterrupted local run; nothing half-written stays in the bucket."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers_dist import REPO, cpu_env, run_train, train_args
from trainer.telemetry import read_run_log

pytestmark = pytest.mark.integration

CRASH = Path(__file__).with_name("helpers_crash.py")
STEPS = 8  # 60 captions / batch 6 = 10 steps per epoch: the kill and the end fall mid-epoch
RUN = ("data.batch_size=6", "data.num_workers=1", f"train.max_steps={STEPS}", "train.ckpt_every_steps=3",
       "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from dataio.sources.synthetic import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("s3ckpt_shards")), 12, seed=3, dim=64, shard_size=5)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_run_log(path) if r["kind"] == "step"}


def _objects(s3_server, bucket: str) -> dict[str, int]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def test_kill_mid_upload_then_resume_on_another_host(s3_server, shards, tmp_path):
    straight = run_train(shards, tmp_path / "local", *RUN)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = _losses(tmp_path / "local" / "metrics.jsonl")

    url = s3_server.make_bucket()
    bucket = url[len("s3://"):]
    out = f"{url}/run"
    args = train_args(shards, out, *RUN, f"train.staging_dir={tmp_path / 'host1'}")  # type: ignore[arg-type]
    # the second save (step 6) is killed before its second upload
    killed = subprocess.run([sys.executable, str(CRASH), "2", "2", "--", "train", *args], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    steps = [ln for ln in killed.stderr.splitlines() if ln.startswith("fs-step 2 ")]
    assert steps and steps[-1].split()[3] == "upload", steps
    objects = _objects(s3_server, bucket)
    assert objects, "nothing uploaded"
    assert s3_server.client().get_object(Bucket=bucket, Key="run/checkpoints/latest")["Body"].read() == b"step00000003\n"
    cut = [k for k in objects if k.startswith("run/checkpoints/step00000006/")]
    assert cut and "run/checkpoints/step00000006/COMPLETE" not in objects  # an upload cut short: no marker
    assert "run/checkpoints/step00000003/COMPLETE" in objects

    # another host: its own empty folder; the run log, vocabulary and checkpoint come from the bucket
    other = [a.replace(str(tmp_path / "host1"), str(tmp_path / "host2")) for a in args]
    resumed = subprocess.run([sys.executable, "-m", "app.cli", "train", *other, "--resume", "latest"],
                             cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step00000003" in resumed.stderr
    got = _losses(tmp_path / "host2" / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step

    objects = _objects(s3_server, bucket)
    names = {k.split("/")[2] for k in objects if k.startswith("run/checkpoints/step")}
    assert names == {"step00000006", "step00000008"}  # keep 2; the cut-short prefix was replaced
    assert all(f"run/checkpoints/{n}/COMPLETE" in objects for n in names)
    assert not [k for k in objects if ".tmp-" in k], objects
    for rank_file in ("rng_rank0.pt", "model_fp32.pt", "mp_rank_00_model_states.pt"):
        assert f"run/checkpoints/step00000008/{rank_file}" in objects
    uploaded = s3_server.client().get_object(Bucket=bucket, Key="run/metrics.jsonl")["Body"].read()
    assert (tmp_path / "host2" / "metrics.jsonl").read_bytes() == uploaded
    assert "run/vocab.json" in objects
    print(f"[s3-checkpoints] point 2: killed mid-upload of step 6 -> latest stayed step00000003; "
          f"resumed on another folder, losses of steps 1-{STEPS} equal the uninterrupted run's "
          f"(step {STEPS}: {got[STEPS]:.6f} vs {want[STEPS]:.6f})", file=sys.stderr)
