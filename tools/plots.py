"""Training curves of one run, drawn from its JSON-lines run log (``trainer.telemetry.JsonlRunLog``).

``plot_run(run_log, out_dir)`` writes
- ``loss.png``: the training loss per optimizer step (raw, faint) and its moving average on a log
  axis (the warm-up epochs' all-negatives sum is ~50x the hardest-negative loss), the switch from
  the warm-up to hardest negatives (``loss.warmup_epochs``) marked, and the learning rate on a
  second axis;
- ``recall.png``: R@1/5/10 of both directions (i2t solid, t2i dashed) per epoch, and rsum per epoch.

A run without any evaluation record yet (training still in its first epoch, or evaluation off) gets
only ``loss.png``: ``recall.png`` is not written and the log says so. A log without step records is
an error, because there is nothing to draw.

Records that appear twice (steps replayed after a resume, see ``JsonlRunLog``) count once: the later
record wins. Null numbers (non-finite at write time) leave a gap in the line.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from dataio import storage  # noqa: E402
from scan.metrics import RECALLS  # noqa: E402
from trainer.telemetry import read_run_log  # noqa: E402

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"
RECALL_PNG = "recall.png"
_DPI = 100


def _latest_by(records: list[dict[str, Any]], kind: str, key: str) -> list[dict[str, Any]]:
    """Records of ``kind``, one per value of ``key`` (the last one in the file), sorted by key."""
    latest: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("kind") == kind and record.get(key) is not None:
            latest[int(record[key])] = record
    return [latest[k] for k in sorted(latest)]


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values at each position (NaNs are skipped,
    a position whose whole window is NaN stays NaN). Same length as ``values``."""
    finite = np.isfinite(values)
    # Prefix sums with a leading 0: the window ending at i covers [max(0, i + 1 - window), i].
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - window)
    n = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        with storage.atomic_path(path) as tmp:  # never a half-written PNG
            fig.savefig(tmp, dpi=_DPI, format="png")
    finally:
        plt.close(fig)


def _mark_warmup(ax: plt.Axes, steps: list[dict[str, Any]], warmup_epochs: int) -> None:
    """Shade the warm-up epochs (hinge over all negatives) and mark where hardest negatives start."""
    switch = next((int(r["step"]) for r in steps if int(r["epoch"]) >= warmup_epochs), None)
    if not warmup_epochs or switch is None or switch == int(steps[0]["step"]):
        return
    ax.axvspan(int(steps[0]["step"]), switch, color="0.85", alpha=0.5, linewidth=0,
               label=f"warm-up: all negatives (epoch{'s' * (warmup_epochs > 1)} < {warmup_epochs})")
    ax.axvline(switch, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"hardest negatives from step {switch}")


def plot_loss(steps: list[dict[str, Any]], out_png: Path, warmup_epochs: int = 0) -> None:
    x = np.array([int(r["step"]) for r in steps])
    loss = np.array([_number(r.get("loss")) for r in steps])
    lr = np.array([_number(r.get("lr")) for r in steps])
    # About 50 points per window keeps the trend readable from 20 steps to 100k steps.
    window = max(1, len(steps) // 50)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _mark_warmup(ax, steps, warmup_epochs)
    ax.plot(x, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(x, moving_average(loss, window), color="tab:blue", linewidth=1.8,
            label=f"loss, mean of last {window}")
    finite = loss[np.isfinite(loss)]
    if finite.size and (finite > 0).all():  # a hinge can reach 0 exactly: then stay linear
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(lr).any():
        ax_lr = ax.twinx()
        ax_lr.plot(x, lr, color="tab:orange", linewidth=1.0, label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more = ax_lr.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right")
    ax.set_title("training loss per step")
    fig.tight_layout()
    _save(fig, out_png)


def plot_recall(evals: list[dict[str, Any]], out_png: Path, source: Path) -> None:
    epochs = np.array([int(r["epoch"]) for r in evals])
    metrics = [r.get("metrics") or {} for r in evals]
    if not any(f"{d}_{k}" in m for m in metrics for d in ("i2t", "t2i") for k in RECALLS):
        raise ValueError(f"{source}: eval records carry no i2t_r1 … t2i_r10 metrics; "
                         f"keys found: {sorted({k for m in metrics for k in m})}")
    fig, (ax_r, ax_sum) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"r1": "tab:blue", "r5": "tab:orange", "r10": "tab:green"}
    for direction, style in (("i2t", "-"), ("t2i", "--")):
        for k in RECALLS:
            y = np.array([_number(m.get(f"{direction}_{k}")) for m in metrics])
            ax_r.plot(epochs, y, style, marker="o", markersize=3, color=colors[k],
                      label=f"{direction} R@{k[1:]}")
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("recall (%)")
    ax_r.set_title("R@K per epoch (i2t solid, t2i dashed)")
    ax_r.grid(alpha=0.3)
    ax_r.legend(fontsize=8, ncol=2)
    rsum = np.array([_number(m.get("rsum")) for m in metrics])
    ax_sum.plot(epochs, rsum, marker="o", color="tab:red")
    if np.isfinite(rsum).any():
        best = int(np.nanargmax(rsum))
        ax_sum.annotate(f"best {rsum[best]:.1f} (epoch {epochs[best]})", (epochs[best], rsum[best]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax_sum.margins(x=0.08, y=0.15)  # room for the annotation
    ax_sum.set_xlabel("epoch")
    ax_sum.set_ylabel("rsum")
    ax_sum.set_title("rsum per epoch")
    ax_sum.grid(alpha=0.3)
    for ax in (ax_r, ax_sum):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save(fig, out_png)


def plot_run(run_log: str | Path, out_dir: str | Path, warmup_epochs: int = 0) -> dict[str, Path]:
    """Draw ``loss.png`` and, when the log has evaluation records, ``recall.png`` into ``out_dir``.
    ``warmup_epochs`` (the run's ``loss.warmup_epochs``) marks the switch to hardest negatives.

    Returns {"loss": path} or {"loss": path, "recall": path}. Raises ValueError naming the file
    when it holds no step records, or eval records without recall metrics.
    """
    run_log, out_dir = Path(run_log), Path(out_dir)
    records = read_run_log(run_log)
    steps = _latest_by(records, "step", "step")
    if not steps:
        raise ValueError(f"{run_log}: no step records (kind 'step'); nothing to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"loss": out_dir / LOSS_PNG}
    plot_loss(steps, written["loss"], warmup_epochs)
    evals = _latest_by(records, "eval", "epoch")
    if evals:
        written["recall"] = out_dir / RECALL_PNG
        plot_recall(evals, written["recall"], run_log)
    else:
        log.warning("%s: no evaluation records yet; %s not written", run_log, RECALL_PNG)
    log.info("plots written: %s", ", ".join(str(p) for p in written.values()))
    return written
