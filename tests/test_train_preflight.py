"""Nothing lost silently, errors before the work: a training run refuses a folder holding another
run (unless --resume or --overwrite), a resumed run logs each step once, and every input (shards,
val shards, model.img_dim against the manifest, the output folder) is checked before the first
step, naming the key, the value and the file; a truncated shard under data.on_error=skip is
skipped and counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_dist import run_train
from scan.config import load_experiment
from scan.configfile import ConfigError
from trainer import preflight
from trainer.telemetry import read_run_log

TINY = ("data.batch_size=6", "train.max_steps=6", "train.ckpt_every_steps=3")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from dataio.sources.synthetic import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("preflight_shards")), 12, seed=3, dim=64,
                           shard_size=5)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_run_log(run_dir / "metrics.jsonl") if r["kind"] == "step"]


def _cfg(shards: str, out: Path, *overrides: str):
    return load_experiment(None, [f"data.train_shards={shards}", f"train.output_dir={out}", *overrides])


# --------------------------------------------------------------------------------------- in-process
def test_img_dim_is_taken_from_the_manifest_or_checked_against_it(shards, tmp_path):
    assert load_experiment().model.img_dim == 0  # not given: from the shards
    assert preflight.check_inputs(_cfg(shards, tmp_path)).model.img_dim == 64
    assert preflight.check_inputs(_cfg(shards, tmp_path, "model.img_dim=64")).model.img_dim == 64
    with pytest.raises(ConfigError) as err:
        preflight.check_inputs(_cfg(shards, tmp_path, "model.img_dim=2048"))
    for word in ("model.img_dim", "2048", str(Path(shards)), "64"):
        assert word in str(err.value)


def test_missing_or_misnamed_shards_are_named_by_key_and_path(shards, tmp_path):
    base = Path(shards).parent
    for key, spec, words in (
            ("data.val_shards", str(base / "nothere" / "manifest.json"), ["nothere/manifest.json"]),
            ("data.train_shards", str(base / "manifest.jsn"), ["manifest.jsn does not exist"]),
            ("data.train_shards", str(base / "shard-000000.tar.json") + "/", ["is a file"])):
        cfg = _cfg(shards, tmp_path, f"{key}={spec}")
        with pytest.raises(ConfigError) as err:
            preflight.check_inputs(cfg)
        message = str(err.value)
        assert f"config key '{key}'" in message and "manifest.jsn/manifest.json" not in message
        for word in words:
            assert word in message, message
    with pytest.raises(ConfigError, match="data.vocab.*does not exist"):
        preflight.check_inputs(_cfg(shards, tmp_path, f"data.vocab={tmp_path / 'v.json'}"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir.*is a file, not a folder"):
        preflight.check_inputs(_cfg(shards, tmp_path / "file" / "run"))


def test_trim_keeps_each_step_up_to_the_checkpoint_and_earlier_validations(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = ([{"kind": "step", "step": s, "epoch": s // 4} for s in range(1, 9)]
               + [{"kind": "eval", "epoch": 0, "metrics": {}}, {"kind": "eval", "epoch": 1, "metrics": {}}])
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    preflight.trim_run_logs(tmp_path, step=5, epoch=1)
    kept = read_run_log(log)
    assert [r["step"] for r in kept if r["kind"] == "step"] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in kept if r["kind"] == "eval"] == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


# ------------------------------------------------------------------------------------------ the CLI
@pytest.mark.integration
def test_a_second_run_is_refused_resume_logs_each_step_once_overwrite_replaces(shards, tmp_path):
    out = tmp_path / "run"
    first = run_train(shards, out, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    log_before = (out / "metrics.jsonl").read_text()

    again = run_train(shards, out, *TINY)  # a new run into the same folder
    assert again.returncode == 2
    assert f"{str(out)!r} holds another run" in again.stderr and "--overwrite" in again.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts  # nothing renamed
    assert (out / "metrics.jsonl").read_text() == log_before  # nothing appended

    resumed = run_train(shards, out, *TINY, resume="step00000003")  # steps 4-6 replayed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(out) == [1, 2, 3, 4, 5, 6]

    replaced = run_train(shards, out, *TINY, "train.max_steps=4", "train.ckpt_every_steps=0",
                         resume=None, extra=["--overwrite"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert _steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step00000004"]


@pytest.mark.integration
def test_input_errors_come_before_the_first_step(shards, tmp_path):
    out = tmp_path / "run"
    missing_val = str(Path(shards).parent / "val" / "manifest.json")
    r = run_train(shards, out, *TINY, f"data.val_shards={missing_val}")
    assert r.returncode == 2 and "config key 'data.val_shards'" in r.stderr and missing_val in r.stderr
    r = run_train(shards, out, *TINY, "model.img_dim=1280")
    assert r.returncode == 2 and "config key 'model.img_dim': 1280" in r.stderr
    assert "step 1 " not in r.stderr and not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()


@pytest.mark.integration
def test_a_truncated_shard_is_skipped_and_counted_or_named_by_its_url(tmp_path):
    from dataio.sources.synthetic import write_synthetic

    spec = write_synthetic(str(tmp_path / "shards"), 12, seed=3, dim=64, shard_size=5)
    cut = tmp_path / "shards" / "shard-000001.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    stopped = run_train(spec, tmp_path / "raise", *TINY)
    assert stopped.returncode == 2
    assert "corrupt or truncated tar" in stopped.stderr and str(cut) in stopped.stderr
    assert "RetryingReader object" not in stopped.stderr
    skipped = run_train(spec, tmp_path / "skip", *TINY, "data.on_error=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipping bad input" in skipped.stderr and str(cut) in skipped.stderr
    steps = [r for r in read_run_log(tmp_path / "skip" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 6 and steps[-1]["skipped_samples"] > 0
