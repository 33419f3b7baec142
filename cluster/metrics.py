"""Prometheus export of training metrics: one ``/metrics`` endpoint per rank.

Each rank serves its own registry on ``addr:port`` (127.0.0.1 by default). The port is a free one
by default (``metrics.port_base: 0``), so runs sharing a host never collide: it is logged,
written to ``<run dir>/metrics_targets/rank<R>.json`` and listed, while the rank runs, in
``metrics.targets_dir`` (Prometheus' file_sd format), which configs/prometheus/scan.yml watches.
``metrics.port_base: N`` puts rank r of a node on N + local rank instead; a taken port is an
error before any work.
``PrometheusExporter`` implements ``trainer.telemetry.Telemetry``; ``build_telemetry`` composes it
with the JSON-lines run log (and the ``train.report_to`` logs) from an experiment config, which is
what a launcher hands the trainer.

Exported (every series also carries the exporter's constant labels, e.g. ``run`` and ``rank``):
  scan_train_loss, scan_train_samples_per_second, scan_train_step_seconds,
  scan_train_data_wait_seconds, scan_train_lr, scan_train_grad_norm, scan_train_loss_scale,
  scan_train_step, scan_train_epoch, scan_train_steps_total, scan_data_skipped_samples_total,
  scan_data_skipped_samples_by_kind_total{kind} (dataio's counter, read at scrape time),
  scan_memory_bytes, scan_eval_recall{direction,k}, scan_eval_rsum, scan_eval_rank{direction,stat},
  scan_eval_metric{name} (any other evaluation number), scan_eval_epoch, scan_train_alerts_total{kind}
  (trainer.collapse: a collapsed model),
  plus the process_* / python_* collectors of prometheus-client.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, PlatformCollector,
                               ProcessCollector, start_http_server)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dataio.errors import SKIPS, SkipCounter
from dataio.storage import write_text_atomic
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer.report_logs import build_report_logs, check_report_to
from trainer.outputs import local_dir
from trainer.telemetry import Fanout, JsonlRunLog, Telemetry, flatten_metrics

log = logging.getLogger(__name__)

# Flattened evaluation keys: "i2t_r1", "t2i_r10" → direction, k; "i2t_medr", "t2i_meanr" →
# direction, statistic. A "mean_" prefix (COCO 1K: {"folds": [...], "mean": {...}}) is the headline.
_RECALL_KEY = re.compile(r"^(?:mean_)?(?P<direction>i2t|t2i)[_.]?r@?(?P<k>\d+)$")
_RANK_KEY = re.compile(r"^(?:mean_)?(?P<direction>i2t|t2i)[_.]?(?P<stat>medr|meanr)$")
_RSUM_KEY = re.compile(r"^(?:mean_)?rsum$")


class SkipsByKind(Collector):
    """scan_data_skipped_samples_by_kind_total{kind}: dataio's skip counter, read at scrape time.

    ``dataio.errors.SKIPS`` holds this process's counts (DataLoader workers' counts are merged into
    it batch by batch), so the breakdown is live even between steps.
    """

    def __init__(self, counter: SkipCounter, labels: Mapping[str, str]) -> None:
        self.counter, self.labels = counter, dict(labels)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("scan_data_skipped_samples_by_kind",
                                     "Bad samples skipped by the data pipeline, by problem kind",
                                     labels=[*sorted(self.labels), "kind"])
        for kind, count in sorted(self.counter.get().items()):
            family.add_metric([*(self.labels[k] for k in sorted(self.labels)), kind], count)
        yield family


class PrometheusExporter:
    """A ``Telemetry`` sink serving the latest training numbers of one rank over HTTP.

    ``port`` 0 lets the operating system pick a free port (tests); the bound port is ``self.port``.
    ``labels`` are attached to every series (``{"run": "scan", "rank": "3"}``). ``registry`` None
    gives the exporter its own registry with the process / platform / GC collectors, so several
    exporters can live in one process; pass a registry to serve it elsewhere instead.
    ``skips`` is the dataio skip counter broken down by kind (default: this process's
    ``dataio.errors.SKIPS``).
    Raises OSError naming the address when the port is taken.
    """

    def __init__(self, port: int, *, addr: str = "127.0.0.1", labels: Mapping[str, Any] | None = None,
                 registry: CollectorRegistry | None = None, skips: SkipCounter = SKIPS) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        names = sorted(self.labels)

        def labelled(metric: Gauge | Counter) -> Gauge | Counter:
            # prometheus-client refuses .labels() on a metric without label names.
            return metric.labels(**self.labels) if names else metric

        def gauge(name: str, doc: str) -> Gauge:
            return labelled(Gauge(name, doc, names, registry=registry))

        def counter(name: str, doc: str) -> Counter:
            return labelled(Counter(name, doc, names, registry=registry))

        self._loss = gauge("scan_train_loss", "Training loss of the last step")
        self._speed = gauge("scan_train_samples_per_second",
                            "Captions per second on this rank, last step")
        self._step_time = gauge("scan_train_step_seconds", "Wall time of the last step")
        self._data_wait = gauge("scan_train_data_wait_seconds",
                                "Part of the last step spent waiting for data")
        self._lr = gauge("scan_train_lr", "Current learning rate")
        self._grad_norm = gauge("scan_train_grad_norm",
                                "Gradient norm before clipping (NaN: unknown)")
        self._loss_scale = gauge("scan_train_loss_scale",
                                 "Dynamic fp16 loss scale (NaN: not fp16)")
        self._step = gauge("scan_train_step", "Global optimizer step of the last report")
        self._epoch = gauge("scan_train_epoch", "Current training epoch")
        self._steps = counter("scan_train_steps", "Optimizer steps reported by this process")
        self._skipped = counter("scan_data_skipped_samples",
                                "Bad samples skipped by this rank's data pipeline")
        self._memory = gauge("scan_memory_bytes",
                             "Peak accelerator memory, or resident memory on CPU")
        self._recall = Gauge("scan_eval_recall", "Recall@K in percent of the last evaluation",
                             [*names, "direction", "k"], registry=registry)
        self._rsum = gauge("scan_eval_rsum", "Sum of the six recalls of the last evaluation")
        self._rank = Gauge("scan_eval_rank", "Median / mean rank of the true match, last evaluation",
                           [*names, "direction", "stat"], registry=registry)
        self._other = Gauge("scan_eval_metric", "Other numbers of the last evaluation",
                            [*names, "name"], registry=registry)
        self._eval_epoch = gauge("scan_eval_epoch", "Epoch of the last evaluation")
        self._alerts = Counter("scan_train_alerts", "Alerts about the run itself (kind: collapse)",
                               [*names, "kind"], registry=registry)
        registry.register(SkipsByKind(skips, self.labels))
        # Unknown until reported: NaN rather than a misleading 0 (the exporter starts before the
        # model is built, and Prometheus scrapes it from then on).
        for unknown in (self._loss, self._speed, self._step_time, self._data_wait, self._lr,
                        self._grad_norm, self._loss_scale, self._step, self._epoch, self._memory,
                        self._rsum, self._eval_epoch):
            unknown.set(math.nan)
        self._skipped_seen = 0  # the cumulative skip count already added to the counter

        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"Prometheus exporter: {addr}:{port} is already in use; choose "
                                         f"another port (experiment config key metrics.port_base)") from exc
            raise OSError(exc.errno, f"Prometheus exporter: cannot listen on {addr}:{port}: {exc}") from exc
        self.addr = addr
        self.port: int = self._server.server_address[1]
        log.info("Prometheus exporter on http://%s:%d/metrics labels=%s", addr, self.port, self.labels)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def observe_step(self, *, step: int, epoch: int, loss: float, samples_per_s: float,
                     step_time_s: float, data_wait_s: float, lr: float, grad_norm: float | None,
                     loss_scale: float | None, skipped_samples: int, memory_bytes: int) -> None:
        self._loss.set(loss)
        self._speed.set(samples_per_s)
        self._step_time.set(step_time_s)
        self._data_wait.set(data_wait_s)
        self._lr.set(lr)
        self._grad_norm.set(math.nan if grad_norm is None else grad_norm)
        self._loss_scale.set(math.nan if loss_scale is None else loss_scale)
        self._step.set(step)
        self._epoch.set(epoch)
        self._steps.inc()
        self._memory.set(memory_bytes)
        # skipped_samples is cumulative (Telemetry contract); a Prometheus counter only goes up.
        if skipped_samples < self._skipped_seen:
            # A new data pipeline in this process restarted its count: everything it reports is new.
            log.info("skip count went from %d to %d: counting a new pipeline", self._skipped_seen,
                     skipped_samples)
            self._skipped_seen = 0
        self._skipped.inc(skipped_samples - self._skipped_seen)
        self._skipped_seen = skipped_samples

    def observe_alert(self, *, kind: str, step: int, epoch: int, message: str) -> None:
        self._alerts.labels(**self.labels, kind=kind).inc()

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._eval_epoch.set(epoch)
        for key, value in flatten_metrics(metrics).items():
            name = key.lower()
            if (m := _RECALL_KEY.match(name)):
                self._recall.labels(**self.labels, direction=m["direction"], k=str(int(m["k"]))).set(value)
            elif (m := _RANK_KEY.match(name)):
                self._rank.labels(**self.labels, direction=m["direction"], stat=m["stat"]).set(value)
            elif _RSUM_KEY.match(name):
                self._rsum.set(value)
            else:
                self._other.labels(**self.labels, name=key).set(value)

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None
        log.info("Prometheus exporter on %s:%d stopped", self.addr, self.port)


class ScrapeTarget:
    """Where this rank's exporter listens, in Prometheus' file_sd format (``[{"targets":
    ["addr:port"], "labels": {"run_dir": ...}}]``), written to ``<run dir>/metrics_targets/rank<R>.json``
    (kept: the run's record) and to ``<targets_dir>/<host>-<pid>-<port>.json`` (the scrape list that
    configs/prometheus/scan.yml watches; removed at ``close``, so a finished run leaves it, and
    the entries of this host's processes that died without closing are removed on the way in)."""

    def __init__(self, run_dir: str | Path, rank: int, exporter: PrometheusExporter,
                 targets_dir: str) -> None:
        entry = json.dumps([{"targets": [f"{exporter.addr}:{exporter.port}"],
                             "labels": {"run_dir": str(Path(run_dir).resolve())}}]) + "\n"
        record = Path(run_dir) / "metrics_targets" / f"rank{rank}.json"
        host = socket.gethostname()
        self.listed = (Path(targets_dir) / f"{host}-{os.getpid()}-{exporter.port}.json"
                       if targets_dir else None)
        if self.listed is not None:
            _drop_dead_targets(Path(targets_dir), host)
        for path in (record, self.listed):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, entry)
        log.info("metrics of rank %d: %s (labels %s; scrape target in %s)", rank, exporter.url,
                 exporter.labels, self.listed or record)

    def observe_step(self, **fields: Any) -> None:
        pass

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        if self.listed is not None:
            self.listed.unlink(missing_ok=True)


def _drop_dead_targets(targets_dir: Path, host: str) -> None:
    """Remove this host's scrape-list entries whose process is gone (killed before ``close``)."""
    for path in targets_dir.glob(f"{host}-*-*.json"):
        pid = path.stem[len(host) + 1:].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("scrape list: removing %s (process %s is gone)", path, pid)
            path.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def build_telemetry(cfg: ExperimentConfig, *, rank: int, local_rank: int,
                    run_dir: str | Path | None = None) -> Telemetry:
    """The telemetry of one rank: the run log (rank 0 writes ``<run_dir>/metrics.jsonl``), the
    ``train.report_to`` logs (rank 0) and, when ``cfg.metrics.enabled``, a Prometheus exporter on
    ``cfg.metrics.addr`` labelled with the run name (``run``: ``name``), rank and host: on a free
    port (``metrics.port_base`` 0), or on ``port_base + local_rank``; either way written to
    ``<run_dir>/metrics_targets/rank<R>.json`` and listed in ``metrics.targets_dir``. Every error (a taken port, a missing package) comes before the
    run log is opened.
    """
    run_dir = run_dir or local_dir(cfg)  # this host's folder (train.output_dir unless s3://)
    check_report_to(cfg)
    exporter = None
    if cfg.metrics.enabled:
        labels = {"run": cfg.name, "rank": rank, "host": socket.gethostname()}
        port = cfg.metrics.port_base + local_rank if cfg.metrics.port_base else 0
        try:
            exporter = PrometheusExporter(port, addr=cfg.metrics.addr, labels=labels)
        except OSError as exc:  # a bad input, reported like one (exit code 2, no traceback)
            raise ConfigError(f"{exc.strerror}; config key 'metrics.port_base' is "
                              f"{cfg.metrics.port_base} (0: a free port for every rank)") from exc
    sinks: list[Telemetry] = []
    try:
        sinks.append(JsonlRunLog(run_dir, rank=rank))
        if exporter is not None:
            sinks += [exporter, ScrapeTarget(run_dir, rank, exporter, cfg.metrics.targets_dir)]
        sinks += build_report_logs(cfg, rank=rank, run_dir=run_dir)
    except BaseException:
        Fanout([*sinks, *([exporter] if exporter is not None and exporter not in sinks else [])]).close()
        raise
    return Fanout(sinks)
