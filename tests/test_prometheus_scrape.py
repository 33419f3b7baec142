"""A real Prometheus server (Debian's `prometheus`) scrapes the training exporter; its HTTP API
returns the loss series.

The server binary is installed by scripts/ensure_prometheus.sh when missing; the tests skip only
when that script reports that apt-get is unavailable here (exit status 2).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from cluster.metrics import PrometheusExporter
from helpers_dist import free_port
from trainer.telemetry import read_run_log

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
POLL_S = 20.0  # the first sample shows after ~5 s on these machines


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    result = subprocess.run(["bash", str(REPO / "scripts" / "ensure_prometheus.sh")],
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 2:
        pytest.skip(f"prometheus is not installed and cannot be installed here: {result.stderr.strip()}")
    assert result.returncode == 0, f"scripts/ensure_prometheus.sh failed:\n{result.stderr[-3000:]}"
    found = shutil.which("prometheus")
    assert found, "scripts/ensure_prometheus.sh succeeded but `prometheus` is not on PATH"
    return found


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@contextmanager
def prometheus_server(binary: str, targets: list[str], workdir: Path) -> Iterator[str]:
    """A Prometheus scraping ``targets`` every second; yields its base URL; always stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: scan-test\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_shipped_scrape_config_is_valid(prometheus_bin):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it)")
    result = subprocess.run([promtool, "check", "config", str(REPO / "configs" / "prometheus" / "scan.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_loss_series_of_a_training_feed(prometheus_bin, tmp_path):
    exporter = PrometheusExporter(0, labels={"run": "scrape-test", "rank": 0})
    losses = {}  # step -> loss fed
    stop = threading.Event()

    def report(step: int) -> None:
        losses[step] = 4.0 / (1.0 + 0.1 * step)
        exporter.observe_step(step=step, epoch=0, loss=losses[step], samples_per_s=640.0,
                              step_time_s=0.2, data_wait_s=0.01, lr=2e-4, grad_norm=1.0,
                              loss_scale=None, skipped_samples=0, memory_bytes=1 << 30)

    def feed() -> None:
        # A training-like run: a falling loss, one step every 0.2 s, until the test has its series.
        step = 1
        while not stop.wait(0.2):
            step += 1
            report(step)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        start = time.time()
        report(1)  # before any scrape, so no NaN "no step yet" sample reaches Prometheus
        feeder.start()
        with prometheus_server(prometheus_bin, [f"127.0.0.1:{exporter.port}"], tmp_path) as base:
            query = 'scan_train_loss{run="scrape-test"}'
            deadline = time.monotonic() + POLL_S
            series = []
            while time.monotonic() < deadline:
                # Enough to see the loss fall: at least 3 scraped samples in the range query.
                series = api(base, "/api/v1/query_range", query=query, start=start, end=time.time(),
                             step="1s")["result"]
                if series and len(series[0]["values"]) >= 3:
                    break
                time.sleep(0.5)
            stop.set()  # the feed's record is complete from here on
            feeder.join(timeout=5)
            assert series, f"no {query} series after {POLL_S} s"
            (only,) = series
            assert only["metric"]["job"] == "scan-test" and only["metric"]["rank"] == "0"
            values = [float(v) for _, v in only["values"]]
            assert len(values) >= 3, values
            fed = set(losses.values())
            assert all(v in fed for v in values), (values, sorted(fed))
            assert values == sorted(values, reverse=True) and values[-1] < values[0], values

            (instant,) = api(base, "/api/v1/query", query=query)["result"]
            assert float(instant["value"][1]) in fed
            (steps,) = api(base, "/api/v1/query", query='scan_train_steps_total{run="scrape-test"}')["result"]
            assert float(steps["value"][1]) >= 3
            (up,) = api(base, "/api/v1/query", query="up")["result"]
            assert up["value"][1] == "1"
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(timeout=5)
        exporter.close()


# A real (tiny) training run in its own process, exporting through build_telemetry as a launcher
# would: synthetic shards, GRU text encoder, fp32 on CPU, one process without a launcher.
TRAIN_DRIVER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from cluster.metrics import build_telemetry
from dataio.sources.synthetic import write_synthetic
from scan.config import ExperimentConfig
from trainer.train import train

work, port, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = ExperimentConfig(name="scrape-train")
cfg.data.train_shards = write_synthetic(work + "/shards", 160, dim=32, shard_size=40)
cfg.data.batch_size, cfg.data.num_workers = 8, 0
cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = 32, 16, 16
cfg.train.precision, cfg.train.epochs, cfg.train.max_steps = "fp32", 1, steps
cfg.train.output_dir = work + "/run"
cfg.metrics.port_base = port
telemetry = build_telemetry(cfg, rank=0, local_rank=0)


class KeepServing:  # the run may end within one scrape interval: serve the last values a bit longer
    def __getattr__(self, name):
        return getattr(telemetry, name)

    def close(self):
        pass


train(cfg, telemetry=KeepServing())
time.sleep(3)  # at 1 s scrape interval: at least two scrapes of the final values
telemetry.close()
"""


def test_prometheus_scrapes_a_real_training_run(prometheus_bin, tmp_path):
    port = free_port()
    with prometheus_server(prometheus_bin, [f"127.0.0.1:{port}"], tmp_path / "prom") as base:
        start = time.time()
        train_log = tmp_path / "train.log"
        with open(train_log, "w") as out:
            run = subprocess.run([sys.executable, "-c", TRAIN_DRIVER, str(tmp_path), str(port), "30"],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
        assert run.returncode == 0, f"training failed:\n{train_log.read_text()[-4000:]}"
        end = time.time()
        # Samples are in the TSDB once scraped; poll in case the last scrape is still being ingested.
        query = 'scan_train_loss{run="scrape-train"}'
        deadline, series = time.monotonic() + POLL_S, []
        while time.monotonic() < deadline:
            series = api(base, "/api/v1/query_range", query=query, start=start, end=end + 2,
                         step="1s")["result"]
            if series:
                break
            time.sleep(0.5)
        assert series, f"no {query} series after the run:\n{train_log.read_text()[-2000:]}"
        (only,) = series
        assert only["metric"]["rank"] == "0" and only["metric"]["job"] == "scan-test"

        # Every scraped value is a loss the run logged (the same float, exact through text formats).
        logged = {r["loss"] for r in read_run_log(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"}
        assert len(logged) == 30
        values = [(t, float(v)) for t, v in only["values"]]
        # NaN (no step yet) while the model is being built, then only logged losses.
        first = next((i for i, (_, v) in enumerate(values) if not math.isnan(v)), len(values))
        assert first < len(values), f"only NaN scraped: {values}"
        assert all(v in logged for _, v in values[first:]), (values, sorted(logged))
        # The instant query at a time the exporter was up returns the loss then.
        t_last, v_last = values[-1]
        (instant,) = api(base, "/api/v1/query", query=query, time=t_last)["result"]
        assert float(instant["value"][1]) == v_last
