"""How training metrics leave the training loop: the ``Telemetry`` interface and the JSON-lines run log.

The training loop calls ``observe_step`` after every optimizer step, ``observe_eval`` after every
evaluation and ``close`` once at the end. Implementations:

- ``JsonlRunLog`` (here): one JSON object per line in ``<run dir>/metrics.jsonl``.
- ``cluster.metrics.PrometheusExporter``: a per-rank ``/metrics`` HTTP endpoint. It lives in
  ``cluster`` because ``trainer`` never imports ``cluster`` (docs/ARCHITECTURE.md); whoever builds
  the run (``cluster.metrics.build_telemetry``) hands the trainer a ``Fanout`` of both.

Nothing here imports prometheus-client.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

from dataio import storage

log = logging.getLogger(__name__)

RUN_LOG_NAME = "metrics.jsonl"


@runtime_checkable
class Telemetry(Protocol):
    """What the training loop reports. All calls are cheap and never raise for ordinary values.

    ``observe_step`` arguments (one optimizer step on this rank):
      step: global optimizer step (1-based after the first step), epoch: current epoch (0-based),
      loss: this step's training loss, samples_per_s: captions per second on this rank,
      step_time_s: wall time of the whole step, data_wait_s: the part of it spent waiting for data,
      lr: current learning rate, grad_norm: global gradient norm before clipping (None: unknown),
      loss_scale: dynamic fp16 loss scale (None: not fp16),
      skipped_samples: bad samples skipped by this rank's data pipeline, CUMULATIVE since the
      process started (the dataio skip counter as it stands now, not a per-step delta),
      memory_bytes: peak accelerator memory, or the process's resident memory on CPU.

    ``observe_eval`` takes the metrics mapping from ``scan.metrics`` (R@K per direction, rsum,
    medr, meanr; nested mappings are allowed).

    Sinks may also define ``observe_alert(*, kind, step, epoch, message)``: something is wrong with
    the run itself (``trainer.collapse``: a collapsed model); :func:`alert` calls it where defined.
    """

    def observe_step(self, *, step: int, epoch: int, loss: float, samples_per_s: float,
                     step_time_s: float, data_wait_s: float, lr: float, grad_norm: float | None,
                     loss_scale: float | None, skipped_samples: int, memory_bytes: int) -> None: ...

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"i2t": {"r1": 50}, "rsum": 300}`` → ``{"i2t_r1": 50.0, "rsum": 300.0}``.

    Lists are numbered (``{"folds": [{"rsum": 1}]}`` → ``{"folds_0_rsum": 1.0}``). Numbers only (bool, int, float, numpy / torch scalars); anything else raises ValueError naming
    the key, because an evaluation result that is not a number is a bug upstream.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, (list, tuple)):
            value = {str(i): item for i, item in enumerate(value)}
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=name + "_"))
            continue
        try:
            flat[name] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"evaluation metric {name!r}: {value!r} is not a number") from exc
    return flat


def _json_number(value: float | None) -> float | None:
    # JSON has no NaN / Infinity: a non-finite value is written as null so every reader can parse it.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class JsonlRunLog:
    """Appends one JSON object per line to a run log; each line is flushed as soon as it is written.

    Which process writes: with ``per_rank=False`` (the default) only rank 0 writes, to
    ``<run_dir>/metrics.jsonl``, and other ranks' calls do nothing (their numbers differ only by
    their local batches). With ``per_rank=True`` every rank writes its own
    ``<run_dir>/metrics.rank<R>.jsonl``.

    Records: ``{"kind": "step", "time": <unix s>, "rank": R, "step": ..., "epoch": ..., "loss": ...,
    ...}`` with the ``observe_step`` fields, and ``{"kind": "eval", "time": ..., "rank": R,
    "epoch": E, "metrics": {"i2t_r1": ..., ...}}`` (flattened), and ``{"kind": "alert", "alert":
    "collapse", "step": ..., "epoch": ..., "message": ...}``. Non-finite numbers become null.

    The file is opened in append mode at the first record, so a resumed run continues the same
    log; the trainer first cuts it back to the checkpoint's step (:func:`rewrite_run_log`), so
    each step appears once. Each record goes out in a single ``write`` of a complete line, so a
    crash can at most leave one truncated last line, which ``read_run_log`` drops with a warning.
    """

    def __init__(self, run_dir: str | Path, *, rank: int = 0, per_rank: bool = False) -> None:
        self.rank = rank
        name = f"metrics.rank{rank}.jsonl" if per_rank else RUN_LOG_NAME
        self.path: Path | None = Path(run_dir) / name if (per_rank or rank == 0) else None
        self._file = None  # opened at the first record: the trainer may rewrite the log before

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            log.info("run log: appending to %s", self.path)
        record = {"kind": record.pop("kind"), "time": time.time(), "rank": self.rank, **record}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def observe_step(self, *, step: int, epoch: int, loss: float, samples_per_s: float,
                     step_time_s: float, data_wait_s: float, lr: float, grad_norm: float | None,
                     loss_scale: float | None, skipped_samples: int, memory_bytes: int) -> None:
        self._write({
            "kind": "step", "step": int(step), "epoch": int(epoch), "loss": _json_number(loss),
            "samples_per_s": _json_number(samples_per_s), "step_time_s": _json_number(step_time_s),
            "data_wait_s": _json_number(data_wait_s), "lr": _json_number(lr),
            "grad_norm": _json_number(grad_norm), "loss_scale": _json_number(loss_scale),
            "skipped_samples": int(skipped_samples), "memory_bytes": int(memory_bytes),
        })

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        flat = {k: _json_number(v) for k, v in flatten_metrics(metrics).items()}
        self._write({"kind": "eval", "epoch": int(epoch), "metrics": flat})

    def observe_alert(self, *, kind: str, step: int, epoch: int, message: str) -> None:
        self._write({"kind": "alert", "alert": kind, "step": int(step), "epoch": int(epoch),
                     "message": message})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Fanout:
    """Forwards every call to several telemetry sinks, in order (an empty Fanout reports nothing).

    ``close`` closes every sink even when one of them fails, then re-raises the first failure.
    """

    def __init__(self, sinks: Iterable[Telemetry]) -> None:
        self.sinks = list(sinks)

    def observe_step(self, **fields: Any) -> None:
        for sink in self.sinks:
            sink.observe_step(**fields)

    def observe_eval(self, *, epoch: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.observe_eval(epoch=epoch, metrics=metrics)

    def observe_alert(self, **fields: Any) -> None:
        for sink in self.sinks:
            alert(sink, **fields)

    def close(self) -> None:
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # keep closing the others (ports, files) before reporting
                log.error("closing telemetry sink %r failed: %s", sink, exc)
                first = first or exc
        if first is not None:
            raise first


def alert(telemetry: Telemetry, *, kind: str, step: int, epoch: int, message: str) -> None:
    """Reports an alert to the sinks that record alerts (the run log, Prometheus); others skip it."""
    observe = getattr(telemetry, "observe_alert", None)
    if observe is not None:
        observe(kind=kind, step=step, epoch=epoch, message=message)


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines run log, in file order.

    A truncated last line (a crash mid-write) is dropped with a warning; a bad line anywhere else
    raises ValueError naming the file and line number.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    # A complete log ends with "\n", so the last element is "" unless the last write was cut short.
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: dropping truncated last line %d", path, number)
                break
            raise ValueError(f"{path}: line {number} is not JSON: {exc}") from exc
    return records


def rewrite_run_log(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrites a run log with only the records ``keep`` accepts (a temporary file renamed over
    it: a crash leaves the old log or the new one); returns how many were dropped."""
    records = read_run_log(path)
    kept = [r for r in records if keep(r)]
    if len(kept) < len(records):
        storage.write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept),
                                  durable=True)
    return len(records) - len(kept)
