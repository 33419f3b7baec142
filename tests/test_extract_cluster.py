"""The extraction job on a real Ray cluster started by the test: `ray start --head` on 127.0.0.1,
`ray job submit` of the CLI, and a driver killed mid-job then rerun.

The cluster is stopped by signalling the `ray start --block` process group this test created,
not with `ray stop`, which would kill every Ray process on the machine (other people's too).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataio.shard_reader import read_shard
from dataio.shard_writer import committed_shards
from dataio.shards import read_manifest
from dataio.sources.synthetic import synthetic_items
from helpers_dist import free_ports

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclass
class Head:
    gcs: str  # 127.0.0.1:port, for --address of drivers
    dashboard: str  # http://127.0.0.1:port, for `ray job submit`
    env: dict


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # answering (e.g. 401 under Ray's token authentication)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT lets `ray start --block` shut its processes down; then the group is made sure of."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test created for the head
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tempfile.mkdtemp(prefix="rayx", dir="/tmp")  # short: Ray's unix socket paths must fit
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    gcs, dash, client, nm, om, metrics, agent, agent_grpc, renv = free_ports(9)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray port on 127.0.0.1; RAY_AUTH_MODE=disabled:
    # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists (left by other local
    # clusters), and this private head and its clients go without. PATH: the job's `python` is
    # the venv's.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(renv), "--temp-dir", temp, "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", proc, log, timeout=180)
        yield Head(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", env=env)
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _keys(split_dir: Path) -> list[str]:
    m = read_manifest(str(split_dir))
    return [s.key for shard in m["shards"] for s in read_shard(str(split_dir / shard["name"]))]


def test_ray_job_submit_runs_the_cli_unchanged(ray_head, tiny_vit, tmp_path):
    dest, summary = tmp_path / "out", tmp_path / "summary.json"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": [".venv/", ".git/"]}),
           "--", "python", "-m", "app.cli", "extract", "source.synthetic=6", "source.splits=[train,val]",
           f"dest={dest}", f"backbone=hf:{tiny_vit}", "images_per_shard=4", "progress=false",
           f"summary_json={summary}"]
    r = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "succeeded" in r.stdout and "run " in r.stdout  # the job's own summary lines
    s = json.loads(summary.read_text())
    assert s["units_failed"] == [] and sorted(s["units_computed"]) == [
        "train-000000", "train-000001", "val-000000", "val-000001"]
    for split in ("train", "val"):
        want = {it.key for it in synthetic_items(6, split=split)}
        keys = _keys(dest / split)
        assert sorted(keys) == sorted(want)  # every image exactly once


def test_ray_job_submit_refuses_a_relative_dest(ray_head, tmp_path):
    """Inside the job, a relative dest would land in Ray's temporary copy of --working-dir (and the
    job would report success): the job fails first, naming the key and why."""
    dest = f"shards/rayjob-{tmp_path.name}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": [".venv/", ".git/"]}),
           "--", "python", "-m", "app.cli", "extract", "source.synthetic=2", f"dest={dest}",
           "backbone=efficientnet-lite0", "progress=false"]
    r = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "succeeded" not in out, out[-4000:]
    assert f"config key 'dest': {dest!r} is a relative path" in out and "Ray job" in out, out[-4000:]
    assert not (REPO / dest).exists()


def test_killed_driver_rerun_recomputes_only_unfinished_units(ray_head, tmp_path):
    dest, summary = tmp_path / "out", tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "app.cli", "extract", "source.synthetic=24", f"dest={dest}",
           "backbone=efficientnet-lite0", "images_per_shard=2", "batch_size=2",
           "workers=2", f"address={ray_head.gcs}", "progress=false", f"summary_json={summary}"]
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(cmd, cwd=REPO, env=ray_head.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while len(committed_shards(str(dest / "train"))) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    # The killed driver's actors are torn down by the cluster; wait until nothing changes.
    units_dir = dest / "train" / "_units"
    snapshot = None
    while True:
        time.sleep(2)
        now = {p.name: p.stat().st_mtime_ns for p in (dest / "train").glob("*.tar")}
        now.update({p.name: p.stat().st_mtime_ns for p in units_dir.glob("*.json")})
        if now == snapshot:
            break
        snapshot = now
    done = {p.stem for p in units_dir.glob("*.json")}
    stats_before = {name: json.loads((units_dir / f"{name}.json").read_text()) for name in done}
    assert 2 <= len(done) < 12, f"kill came too late to test a resume: {sorted(done)}"
    assert not (dest / "train" / "manifest.json").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    s = json.loads(summary.read_text())
    all_units = {f"train-{i:06d}" for i in range(12)}
    assert set(s["units_reused"]) == done
    assert set(s["units_computed"]) == all_units - done
    for name in done:  # untouched: same stats (run, timestamps) and same shard file
        assert json.loads((units_dir / f"{name}.json").read_text()) == stats_before[name]
        assert (dest / "train" / f"{name}.tar").stat().st_mtime_ns == snapshot[f"{name}.tar"]
    runs = {json.loads((units_dir / f"{n}.json").read_text())["run_id"] for n in all_units - done}
    assert runs == {s["run_id"]}
    assert sorted(_keys(dest / "train")) == sorted(it.key for it in synthetic_items(24))
