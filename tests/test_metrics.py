"""Telemetry sinks: the JSON-lines run log, fan-out, and the Prometheus exporter scraped over HTTP."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import PrometheusExporter, build_telemetry
from dataio.errors import SkipCounter
from helpers_dist import free_port
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer.telemetry import Fanout, JsonlRunLog, Telemetry, flatten_metrics, read_run_log


def step_fields(step: int, **changes) -> dict:
    fields = dict(step=step, epoch=0, loss=1.0 / step, samples_per_s=100.0 + step, step_time_s=0.5,
                  data_wait_s=0.05, lr=2e-4, grad_norm=1.5, loss_scale=None, skipped_samples=0,
                  memory_bytes=1 << 20)
    fields.update(changes)
    return fields


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- run log -------------------------------------------------------------------------------------

def test_run_log_writes_one_flushed_json_object_per_line(tmp_path):
    run_log = JsonlRunLog(tmp_path / "run")
    run_log.observe_step(**step_fields(1))
    # Flushed per line: readable before close.
    records = read_run_log(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 1 and records[0]["kind"] == "step" and records[0]["loss"] == 1.0
    run_log.observe_step(**step_fields(2, loss=float("nan"), grad_norm=None, loss_scale=1024.0))
    run_log.observe_eval(epoch=0, metrics={"i2t": {"r1": 40.0, "r5": 70}, "rsum": 300.5})
    run_log.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    step2, evaluation = json.loads(lines[1]), json.loads(lines[2])
    # Non-finite numbers become null so that strict JSON readers can parse every line.
    assert step2["loss"] is None and step2["grad_norm"] is None and step2["loss_scale"] == 1024.0
    assert step2["rank"] == 0 and step2["step"] == 2 and isinstance(step2["time"], float)
    assert evaluation == {**evaluation, "kind": "eval", "epoch": 0,
                          "metrics": {"i2t_r1": 40.0, "i2t_r5": 70.0, "rsum": 300.5}}


def test_run_log_appends_on_resume_and_other_ranks_write_nothing_by_default(tmp_path):
    for step in (1, 2):
        run_log = JsonlRunLog(tmp_path)
        run_log.observe_step(**step_fields(step))
        run_log.close()
    other = JsonlRunLog(tmp_path, rank=1)
    other.observe_step(**step_fields(3))
    other.close()
    assert other.path is None
    assert [r["step"] for r in read_run_log(tmp_path / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_run_log_per_rank_files(tmp_path):
    for rank in (0, 1):
        run_log = JsonlRunLog(tmp_path, rank=rank, per_rank=True)
        run_log.observe_step(**step_fields(5))
        run_log.close()
    for rank in (0, 1):
        (record,) = read_run_log(tmp_path / f"metrics.rank{rank}.jsonl")
        assert record["rank"] == rank


def test_read_run_log_drops_truncated_last_line_but_rejects_corruption_inside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"kind": "step", "step": 1})
    path.write_text(good + "\n" + '{"kind": "st')
    assert read_run_log(path) == [{"kind": "step", "step": 1}]
    path.write_text(good + "\n" + "not json\n" + good + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        read_run_log(path)


def test_flatten_metrics_names_a_non_number():
    assert flatten_metrics({"a": {"b": {"c": 1}}, "d": True}) == {"a_b_c": 1.0, "d": 1.0}
    assert flatten_metrics({"folds": [{"rsum": 1}, {"rsum": 2}]}) == {"folds_0_rsum": 1.0, "folds_1_rsum": 2.0}
    with pytest.raises(ValueError, match=r"'t2i_r1'.*'oops'"):
        flatten_metrics({"t2i": {"r1": "oops"}})


class Recorder:
    def __init__(self, fail_close: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_close = fail_close

    def observe_step(self, **fields) -> None:
        self.calls.append(("step", fields["step"]))

    def observe_eval(self, *, epoch, metrics) -> None:
        self.calls.append(("eval", epoch))

    def close(self) -> None:
        self.calls.append(("close",))
        if self.fail_close:
            raise RuntimeError("close failed")


def test_fanout_forwards_in_order_and_closes_every_sink_despite_a_failure():
    first, second = Recorder(fail_close=True), Recorder()
    fan = Fanout([first, second])
    assert isinstance(fan, Telemetry) and isinstance(first, Telemetry)
    fan.observe_step(**step_fields(7))
    fan.observe_eval(epoch=2, metrics={"rsum": 1.0})
    with pytest.raises(RuntimeError, match="close failed"):
        fan.close()
    assert first.calls == second.calls == [("step", 7), ("eval", 2), ("close",)]


# ---- Prometheus exporter -------------------------------------------------------------------------

@pytest.fixture
def exporter():
    exp = PrometheusExporter(0, labels={"run": "unit", "rank": 3})
    yield exp
    exp.close()


def test_exporter_serves_step_metrics_with_labels(exporter):
    assert isinstance(exporter, Telemetry)
    fixed = {("rank", "3"), ("run", "unit")}
    before = scrape(exporter.url)
    # Not reported yet: NaN, not a made-up 0.
    for name in ("scan_train_loss", "scan_train_lr", "scan_train_grad_norm", "scan_memory_bytes", "scan_eval_rsum"):
        assert math.isnan(before[(name, frozenset(fixed))]), name
    assert before[("scan_train_steps_total", frozenset(fixed))] == 0
    exporter.observe_step(**step_fields(1, loss=0.75, lr=1e-3, skipped_samples=2, memory_bytes=12345))
    exporter.observe_step(**step_fields(2, loss=0.5, grad_norm=None, loss_scale=65536.0,
                                        skipped_samples=5, memory_bytes=23456))
    got = scrape(exporter.url)
    key = frozenset(fixed)
    assert got[("scan_train_loss", key)] == 0.5
    assert got[("scan_train_samples_per_second", key)] == 102.0
    assert got[("scan_train_step_seconds", key)] == 0.5
    assert got[("scan_train_data_wait_seconds", key)] == 0.05
    assert got[("scan_train_lr", key)] == 2e-4
    assert math.isnan(got[("scan_train_grad_norm", key)])
    assert got[("scan_train_loss_scale", key)] == 65536.0
    assert got[("scan_train_step", key)] == 2 and got[("scan_train_epoch", key)] == 0
    assert got[("scan_train_steps_total", key)] == 2
    # Cumulative skip counts 2 then 5 add up to a counter of 5, not 7.
    assert got[("scan_data_skipped_samples_total", key)] == 5
    assert got[("scan_memory_bytes", key)] == 23456
    assert any(name.startswith("process_") for name, _ in got)


def test_exporter_skip_counter_survives_a_restarted_pipeline_count(exporter):
    for skipped in (4, 1, 3):  # a new pipeline restarted its count at 0 after 4
        exporter.observe_step(**step_fields(1, skipped_samples=skipped))
    got = scrape(exporter.url)
    assert got[("scan_data_skipped_samples_total", frozenset({("rank", "3"), ("run", "unit")}))] == 7


def test_exporter_serves_eval_recalls(exporter):
    metrics = {"i2t_r1": 45.0, "i2t_r5": 75.0, "i2t_r10": 85.0, "t2i": {"r1": 30.0, "r5": 60.0, "r10": 72.0},
               "rsum": 367.0, "i2t_medr": 2.0, "t2i_meanr": 9.5, "fold": 3}
    exporter.observe_eval(epoch=4, metrics=metrics)
    got = scrape(exporter.url)
    fixed = {("rank", "3"), ("run", "unit")}

    def at(metric, **labels):
        return got[(metric, frozenset(fixed | set(labels.items())))]

    assert at("scan_eval_recall", direction="i2t", k="1") == 45.0
    assert at("scan_eval_recall", direction="i2t", k="10") == 85.0
    assert at("scan_eval_recall", direction="t2i", k="5") == 60.0
    assert at("scan_eval_rsum") == 367.0
    assert at("scan_eval_rank", direction="i2t", stat="medr") == 2.0
    assert at("scan_eval_rank", direction="t2i", stat="meanr") == 9.5
    assert at("scan_eval_metric", name="fold") == 3.0
    assert at("scan_eval_epoch") == 4


def test_exporter_coco_folds_headline_is_the_mean(exporter):
    fold = {"i2t": {"r1": 10.0}, "t2i": {"r1": 20.0}, "rsum": 30.0}
    mean = {"i2t": {"r1": 11.0}, "t2i": {"r1": 21.0}, "rsum": 32.0}
    exporter.observe_eval(epoch=1, metrics={"folds": [fold, fold], "mean": mean})
    got = scrape(exporter.url)
    fixed = {("rank", "3"), ("run", "unit")}
    assert got[("scan_eval_recall", frozenset(fixed | {("direction", "t2i"), ("k", "1")}))] == 21.0
    assert got[("scan_eval_rsum", frozenset(fixed))] == 32.0
    assert got[("scan_eval_metric", frozenset(fixed | {("name", "folds_1_i2t_r1")}))] == 10.0


def test_exporter_reads_the_dataio_skip_counter_by_kind_at_scrape_time():
    skips = SkipCounter()
    exp = PrometheusExporter(0, labels={"rank": 0}, skips=skips)
    try:
        assert not [k for k in scrape(exp.url) if k[0] == "scan_data_skipped_samples_by_kind_total"]
        skips.add("corrupt_tar")
        skips.merge({"non_finite": 2, "corrupt_tar": 1})  # as counts from DataLoader workers arrive
        got = scrape(exp.url)
        by_kind = {dict(labels)["kind"]: v for (name, labels), v in got.items()
                   if name == "scan_data_skipped_samples_by_kind_total"}
        assert by_kind == {"corrupt_tar": 2, "non_finite": 2}
    finally:
        exp.close()


def test_exporter_port_in_use_error_names_the_address(exporter):
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{exporter.port} is already in use.*metrics\.port_base"):
        PrometheusExporter(exporter.port)


def test_exporter_close_releases_the_port():
    port = free_port()
    first = PrometheusExporter(port)
    first.close()
    first.close()  # idempotent
    second = PrometheusExporter(port)
    try:
        assert scrape(second.url)
    finally:
        second.close()


def test_build_telemetry_from_config(tmp_path):
    cfg = ExperimentConfig(name="unit-run")
    cfg.metrics.port_base = free_port() - 1
    cfg.metrics.targets_dir = str(tmp_path / "targets")
    telemetry = build_telemetry(cfg, rank=0, local_rank=1, run_dir=tmp_path)
    try:
        telemetry.observe_step(**step_fields(1, loss=0.25))
        got = scrape(f"http://127.0.0.1:{cfg.metrics.port_base + 1}/metrics")
        losses = {dict(labels)["rank"]: v for (name, labels), v in got.items() if name == "scan_train_loss"}
        assert losses == {"0": 0.25}
    finally:
        telemetry.close()
    assert read_run_log(tmp_path / "metrics.jsonl")[0]["loss"] == 0.25

    cfg.metrics.enabled = False
    telemetry = build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path)
    assert [type(s) for s in telemetry.sinks] == [JsonlRunLog]
    telemetry.close()


def test_ranks_sharing_a_host_get_free_ports_written_as_scrape_targets(tmp_path):
    """Two runs' local rank 0 on one host (the default metrics.port_base 0) never collide; each
    port is in the run folder and in the scrape list while the rank runs."""
    cfg = ExperimentConfig(name="shared-host")
    cfg.metrics.targets_dir = str(tmp_path / "targets")
    runs = [build_telemetry(cfg, rank=r, local_rank=0, run_dir=tmp_path / f"run{r}") for r in (0, 1)]
    try:
        ports = []
        for r, telemetry in enumerate(runs):
            telemetry.observe_step(**step_fields(1, loss=0.5 + r))
            (entry,) = json.loads((tmp_path / f"run{r}" / "metrics_targets" / f"rank{r}.json").read_text())
            (target,) = entry["targets"]
            assert entry["labels"] == {"run_dir": str((tmp_path / f"run{r}").resolve())}
            got = scrape(f"http://{target}/metrics")
            assert got[("scan_train_loss", frozenset({("run", "shared-host"), ("rank", str(r)),
                                                      ("host", socket.gethostname())}))] == 0.5 + r
            ports.append(int(target.rsplit(":", 1)[1]))
        assert len(set(ports)) == 2
        listed = sorted(p.name for p in (tmp_path / "targets").iterdir())
        assert listed == sorted(f"{socket.gethostname()}-{os.getpid()}-{port}.json" for port in ports)
    finally:
        for telemetry in runs:
            telemetry.close()
    assert list((tmp_path / "targets").iterdir()) == []  # a finished rank leaves the scrape list


def test_a_taken_fixed_port_is_a_config_error_before_the_run_log(tmp_path, exporter):
    cfg = ExperimentConfig()
    cfg.metrics.port_base = exporter.port
    cfg.metrics.targets_dir = str(tmp_path / "targets")
    with pytest.raises(ConfigError, match=rf"{exporter.port} is already in use.*'metrics.port_base' is "
                                          rf"{exporter.port} \(0: a free port"):
        build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_killed_runs_scrape_entry_is_dropped_by_the_next_run(tmp_path):
    """A rank killed before close leaves its entry; the next rank on the host removes it (its
    process is gone) and keeps live ones."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host, targets = socket.gethostname(), tmp_path / "targets"
    targets.mkdir()
    stale, live = targets / f"{host}-{dead}-1234.json", targets / f"{host}-{os.getppid()}-1235.json"
    for path in (stale, live):
        path.write_text("[]")
    cfg = ExperimentConfig()
    cfg.metrics.targets_dir = str(targets)
    telemetry = build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path / "run")
    try:
        assert not stale.exists() and live.exists()
    finally:
        telemetry.close()


def test_exporter_counts_alerts_by_kind_and_fanout_forwards_them(exporter, tmp_path):
    from trainer.telemetry import Fanout, JsonlRunLog, alert

    log = JsonlRunLog(tmp_path, rank=0)
    alert(Fanout([log, exporter]), kind="collapse", step=7, epoch=1, message="every score equal")
    log.close()
    fixed = {("rank", "3"), ("run", "unit")}
    assert scrape(exporter.url)[("scan_train_alerts_total", frozenset({*fixed, ("kind", "collapse")}))] == 1
    (record,) = read_run_log(tmp_path / "metrics.jsonl")
    assert (record["kind"], record["alert"], record["step"], record["message"]) == \
        ("alert", "collapse", 7, "every score equal")
