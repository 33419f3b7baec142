"""The evaluation as a Ray job (`ray job submit` to a real `ray start --head`), two tile actors."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from sharded_eval_fixtures import tied_embeddings
from helpers_dist import free_ports
from scan.eval.encode import save_embeddings
from scan.eval.sharded import evaluate_embeddings
from scan.eval.store import load_sims
from scan.eval.tiles import Member
from scan.xattn import XAttnConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv/bin"
T2I = XAttnConfig(direction="t2i", agg="mean", lambda_softmax=9.0)
I2T = XAttnConfig(direction="i2t", agg="lse", lambda_softmax=4.0, lambda_lse=20.0)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with its dashboard (the job API).

    Started with ``--block`` in its own session so that teardown ends exactly the processes it
    started (``ray stop`` would stop every Ray on the machine, other users' too).
    """
    temp = Path("/tmp") / f"ray_h6_{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    # RAY_AUTH_MODE=disabled: Ray 2.60 turns token auth on when ~/.ray/auth_token exists (left by
    # other local clusters); this private head and its clients then go without.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    # Every fixed port on a free one: with the defaults, another Ray on this machine holding the
    # dashboard agent's port leaves the job API answering "No available agent" for good.
    # Chosen together (free_ports holds them all open), so that no two flags get the same port.
    flags = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
             "--node-manager-port", "--object-manager-port")
    ports = dict(zip(flags, map(str, free_ports(len(flags)))))
    errors = open(f"{temp}.err", "w+")  # why a head that exits did (a file: a pipe could fill)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
         "--temp-dir", str(temp), "--disable-usage-stats",
         *[x for flag, port in ports.items() for x in (flag, port)]],
        env=env, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start --head exited: {Path(errors.name).read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Ray dashboard did not come up in 120 s"
                time.sleep(0.5)
        yield address, env
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
        errors.close()
        Path(errors.name).unlink(missing_ok=True)


def _submit(address: str, env: dict, entry: str) -> subprocess.CompletedProcess:
    for _ in range(15):  # the job agent can come up a little after the dashboard answers
        job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--",
                              "bash", "-c", entry], env=env, capture_output=True, text=True,
                             timeout=300)
        if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return job


def test_ray_job_ranks_a_constant_matrix_last(ray_head, tmp_path: Path) -> None:
    """A dead model (every score 0) through the Ray evaluator: every query ranks after all its
    competitors (ties count against it), every recall is 0, and the output says why."""
    address, env = ray_head
    emb = tied_embeddings(blocks=4, block=5, seed=3)
    dead = dataclasses.replace(emb, images=emb.images * 0, captions=emb.captions * 0)
    save_embeddings(dead, str(tmp_path / "dead.pt"))
    (tmp_path / "dead.yaml").write_text(yaml.safe_dump(
        {"xattn": dataclasses.asdict(T2I), "eval": {"image_block": 5}}))
    out = tmp_path / "out"
    job = _submit(address, env, f"cd {REPO} && {BIN / 'python'} -m app.cli evaluate-ray --actors 2 "
                                f"--num-cpus 1 --config {tmp_path / 'dead.yaml'} "
                                f"--embeddings {tmp_path / 'dead.pt'} --out {out}")
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["tiles_computed"] == 16
    m = summary["metrics"]
    assert m["rsum"] == 0.0 and m["i2t"]["medr"] == 20 * 5 - 5 + 1 and m["t2i"]["medr"] == 20
    assert m["ties"] == {"i2t": 20, "t2i": 100, "queries": 120}
    assert "100.0% of the queries" in summary["warning"]
    assert "100.0% of the queries" in job.stdout


def test_ray_job_two_actors_equals_in_process_ensemble(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    a = tied_embeddings(blocks=4, block=5, seed=7)
    b = dataclasses.replace(tied_embeddings(blocks=4, block=5, seed=8), image_keys=a.image_keys)
    for name, emb, xattn in (("a", a, T2I), ("b", b, I2T)):
        save_embeddings(emb, str(tmp_path / f"{name}.pt"))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"xattn": dataclasses.asdict(xattn), "eval": {"image_block": 5, "save_sims": True,
                                                          "topk": 3}}))
    out = tmp_path / "out"
    entry = (f"cd {REPO} && {BIN / 'python'} -m app.cli evaluate-ray --actors 2 --num-cpus 1 "
             f"--config {tmp_path / 'a.yaml'} --embeddings {tmp_path / 'a.pt'} "
             f"--config {tmp_path / 'b.yaml'} --embeddings {tmp_path / 'b.pt'} --out {out}")
    _submit(address, env, entry)

    summary = json.loads((out / "metrics.json").read_text())
    ref = evaluate_embeddings([Member(a, T2I), Member(b, I2T)], image_block=5)
    assert summary["actors"] == 2 and summary["tiles_computed"] == 16
    assert summary["metrics"] == ref.metrics
    assert np.asarray(load_sims(out / "sims")).shape == (20, 100)
    assert len((out / "topk.jsonl").read_text().splitlines()) == 20 + 100
