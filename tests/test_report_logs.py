"""train.report_to: TensorBoard event files (read back through TensorBoard's own reader) and W&B
offline runs hold the scalars of metrics.jsonl, recall curves included."""
from __future__ import annotations

import importlib.util

import pytest

from cluster.metrics import build_telemetry
from scan.config import ExperimentConfig, load_experiment
from scan.configfile import ConfigError
from trainer.report_logs import TensorBoardLog, build_report_logs
from trainer.telemetry import read_run_log

EVALS = {0: {"i2t": {"r1": 10.0, "r5": 30.0}, "rsum": 120.0, "t2i": {"medr": 7.0}},
         1: {"i2t": {"r1": 20.0, "r5": 45.0}, "rsum": 180.0, "t2i": {"medr": 4.0}}}


def feed(telemetry, steps_per_epoch: int = 3) -> None:
    for epoch, metrics in EVALS.items():
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i + 1
            telemetry.observe_step(step=step, epoch=epoch, loss=2.0 / step, samples_per_s=50.0 + step,
                                   step_time_s=0.1, data_wait_s=0.01, lr=1e-3, grad_norm=None,
                                   loss_scale=None, skipped_samples=0, memory_bytes=1 << 20)
        telemetry.observe_eval(epoch=epoch, metrics=metrics)
    telemetry.close()


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_report_to_is_a_typed_list():
    cfg = load_experiment(None, ["train.report_to=[tensorboard]"])
    assert cfg.train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="train.report_to"):
        load_experiment(None, ["train.report_to=[mlflow]"])


def test_tensorboard_holds_the_run_logs_scalars_and_recall_curves(tmp_path):
    cfg = ExperimentConfig(name="tb")
    cfg.train.report_to = ["tensorboard"]
    cfg.metrics.enabled = False
    feed(build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path))
    got = scalars(tmp_path / "tensorboard")
    log = read_run_log(tmp_path / "metrics.jsonl")
    steps = [r for r in log if r["kind"] == "step"]
    # Every step's loss, at its step, as in metrics.jsonl (float32 in the event file).
    assert [s for s, _ in got["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert "train/grad_norm" not in got  # unknown values are left out, not logged as 0
    # The recall curves: one point per evaluation, at the last step of its epoch.
    assert got["eval/i2t_r1"] == [(3, 10.0), (6, 20.0)]
    assert got["eval/rsum"] == [(3, 120.0), (6, 180.0)]
    assert got["eval/t2i_medr"] == [(3, 7.0), (6, 4.0)]
    assert got["eval/epoch"] == [(3, 0.0), (6, 1.0)]


def test_only_rank_0_writes_tensorboard(tmp_path):
    cfg = ExperimentConfig()
    cfg.train.report_to = ["tensorboard"]
    assert build_report_logs(cfg, rank=1, run_dir=tmp_path) == []
    (sink,) = build_report_logs(cfg, rank=0, run_dir=tmp_path)
    assert isinstance(sink, TensorBoardLog)
    sink.close()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (optional: pip install wandb)")
def test_wandb_offline_run_is_written_under_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = ExperimentConfig(name="wb")
    cfg.train.report_to = ["wandb"]
    cfg.metrics.enabled = False
    feed(build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_an_error_before_the_run(tmp_path):
    cfg = ExperimentConfig()
    cfg.train.report_to = ["wandb"]
    with pytest.raises(ConfigError, match=r"'train.report_to': 'wandb' needs .*pip install wandb"):
        build_telemetry(cfg, rank=0, local_rank=0, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
