"""Run-log plots: both PNGs from a synthetic metrics.jsonl written by the real JsonlRunLog."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from tools.plots import _latest_by, moving_average, plot_run
from trainer.telemetry import JsonlRunLog, read_run_log


def _step(sink: JsonlRunLog, step: int, loss: float, lr: float = 2e-4) -> None:
    sink.observe_step(step=step, epoch=step // 10, loss=loss, samples_per_s=100.0, step_time_s=0.1,
                      data_wait_s=0.01, lr=lr, grad_norm=1.0, loss_scale=None, skipped_samples=0,
                      memory_bytes=1 << 20)


def _metrics(epoch: int) -> dict:
    base = 10.0 * (epoch + 1)
    i2t = {"r1": base, "r5": base + 10, "r10": base + 20, "medr": 5.0, "meanr": 9.0}
    t2i = {"r1": base - 2, "r5": base + 8, "r10": base + 18, "medr": 6.0, "meanr": 10.0}
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[k] + t2i[k] for k in ("r1", "r5", "r10"))}


def _png_ok(path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5, f"{path} looks blank"


def test_loss_and_recall_pngs(tmp_path):
    sink = JsonlRunLog(tmp_path)
    for step in range(1, 31):
        _step(sink, step, loss=50.0 / step + (step % 3))
        if step % 10 == 0:
            sink.observe_eval(epoch=step // 10 - 1, metrics=_metrics(step // 10 - 1))
    _step(sink, 31, loss=math.inf)  # written as null: a gap, not a crash
    sink.close()
    out = tmp_path / "plots"
    written = plot_run(tmp_path / "metrics.jsonl", out)
    assert set(written) == {"loss", "recall"}
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "recall.png"]  # no temp files left
    for path in written.values():
        _png_ok(path)


def test_only_loss_without_eval(tmp_path, caplog):
    sink = JsonlRunLog(tmp_path)
    for step in range(1, 6):
        _step(sink, step, loss=1.0 / step)
    sink.close()
    written = plot_run(tmp_path / "metrics.jsonl", tmp_path)
    assert set(written) == {"loss"}
    assert not (tmp_path / "recall.png").exists()
    assert "no evaluation records" in caplog.text
    _png_ok(written["loss"])


def test_no_steps_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "eval", "epoch": 0, "metrics": _metrics(0)}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl.*no step records"):
        plot_run(path, tmp_path)


def test_eval_without_recalls_is_an_error(tmp_path):
    sink = JsonlRunLog(tmp_path)
    _step(sink, 1, 1.0)
    sink.observe_eval(epoch=0, metrics={"loss": 3.0})
    sink.close()
    with pytest.raises(ValueError, match="no i2t_r1"):
        plot_run(tmp_path / "metrics.jsonl", tmp_path)


def test_moving_average_skips_gaps():
    values = np.array([1.0, 3.0, np.nan, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(moving_average(values, 2), [1.0, 2.0, 3.0, np.nan, 5.0, 6.0])


def test_replayed_records_count_once_the_later_wins(tmp_path):
    sink = JsonlRunLog(tmp_path)
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0), (3, 30.0), (4, 40.0)):
        _step(sink, step, loss)  # resumed from step 1: steps 2 and 3 logged again
    sink.observe_eval(epoch=0, metrics=_metrics(0))
    sink.observe_eval(epoch=0, metrics=_metrics(5))  # the re-run evaluation of epoch 0
    sink.close()
    records = read_run_log(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in _latest_by(records, "step", "step")] == \
        [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert [r["metrics"]["rsum"] for r in _latest_by(records, "eval", "epoch")] == [_metrics(5)["rsum"]]


def test_loss_on_a_log_axis_with_the_switch_to_hardest_negatives_marked(tmp_path, monkeypatch):
    """A warm-up epoch's loss ~50x the hardest-negative one: a log axis keeps both readable, and
    the switch (the first step of epoch loss.warmup_epochs) is drawn and named."""
    import tools.plots as plots

    drawn = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.update({path.name: fig}), save(fig, path)))
    sink = JsonlRunLog(tmp_path)
    for step in range(1, 31):  # epoch = step // 10: epoch 0 is steps 1-9, epoch 1 starts at step 10
        _step(sink, step, loss=400.0 - step if step < 10 else 9.0 - step / 10)
    sink.close()
    plot_run(tmp_path / "metrics.jsonl", tmp_path, warmup_epochs=1)
    ax = drawn["loss.png"].axes[0]
    assert ax.get_yscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert "hardest negatives from step 10" in labels
    assert any(label.startswith("warm-up: all negatives") for label in labels)
    switch = [line for line in ax.get_lines() if line.get_label() == "hardest negatives from step 10"]
    assert list(switch[0].get_xdata()) == [10, 10]
    _png_ok(tmp_path / "loss.png")

    drawn.clear()
    plot_run(tmp_path / "metrics.jsonl", tmp_path)  # no warm-up: nothing marked
    assert not [label for label in drawn["loss.png"].axes[0].get_legend_handles_labels()[1]
                if "negatives" in label]
