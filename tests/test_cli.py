"""The `scan` command end to end on the generated set: every subcommand runs as a user would run it.

One short training on generated region features (the module fixture) feeds evaluate, explain and
retrieve; extract, import-precomp and the demo run on their own small inputs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataio.shards import read_manifest
from dataio.sources.synthetic import write_synthetic
from helpers_dist import free_port
from tools.explain import figure_size

REPO = Path(__file__).resolve().parents[1]
SCAN = str(Path(sys.executable).with_name("scan"))
TINY = str(REPO / "configs" / "train_tiny.yaml")


def scan(*args: str, cwd: Path = REPO, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([SCAN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"scan {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SCAN trained for a few epochs on generated features, with its train and val shards."""
    root = tmp_path_factory.mktemp("cli")
    train = write_synthetic(str(root / "train"), 160, seed=0, split="train", dim=64, shard_size=80)
    val = write_synthetic(str(root / "val"), 20, seed=1, split="val", dim=64, shard_size=20)
    vocab = root / "vocab.json"
    out = scan("build-vocab", "--shards", train, "--out", str(vocab)).stdout
    assert "entries" in out and json.loads(vocab.read_text())["itos"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    run = root / "run"
    scan("train", "--config", TINY, f"data.train_shards={train}", f"data.val_shards={val}",
         f"data.vocab={vocab}", f"train.output_dir={run}", "train.epochs=5", "optim.lr_update=[100]",
         "data.batch_size=32", "model.embed_size=64", "model.word_dim=32", "optim.lr=5e-3",
         # Summed violations give every negative a gradient: a short run from scratch learns in a
         # few epochs (hardest negatives alone need many more, as VSE++ notes).
         "loss.max_violation=false", "eval.precision=fp32")
    return {"root": root, "train": train, "val": val, "run": run}


@pytest.mark.integration  # trains, or starts a local Ray
def test_train_writes_a_run_with_per_epoch_recalls(trained):
    records = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(5))
    assert evals[-1]["metrics"]["rsum"] > evals[0]["metrics"]["rsum"]  # it learned something
    assert (trained["run"] / "checkpoints" / "latest").is_file()


@pytest.mark.integration  # trains, or starts a local Ray
def test_evaluate_a_run_and_an_ensemble(trained):
    out = trained["root"] / "eval"
    one = json.loads(scan("evaluate", "--run-dir", str(trained["run"]), "--shards", trained["val"],
                          "--out", str(out), "eval.topk=3", "eval.precision=fp32").stdout)
    assert one["protocol"] == "split" and 0 < one["rsum"] <= 600
    assert (out / "metrics.json").is_file() and (out / "topk.jsonl").is_file()
    both = json.loads(scan("evaluate", "--run-dir", str(trained["run"]), "--run-dir", str(trained["run"]),
                           "--shards", trained["val"], "eval.precision=fp32").stdout)
    assert both["rsum"] == pytest.approx(one["rsum"])  # the mean of a model with itself is the model


@pytest.mark.integration  # trains
def test_evaluate_checks_its_output_and_protocol_before_encoding(trained, tmp_path):
    """eval.save_sims without --out, and a protocol whose size the split does not have, are named
    before any image is encoded (they were found after encoding, one after the other)."""
    base = ["evaluate", "--run-dir", str(trained["run"]), "--shards", trained["val"]]
    (tmp_path / "file").write_text("x")
    for extra, words in ((["eval.save_sims=true"], ["config key 'eval.save_sims'", "--out"]),
                         (["eval.topk=5", "--out", str(tmp_path / "file" / "eval")], ["--out", "not a folder"]),
                         (["eval.protocol=f30k1k"], ["config key 'eval.protocol'", "'f30k1k'", "1,000",
                                                     "20 images", trained["val"]])):
        proc = scan(*base, *extra, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        for word in words:
            assert word in proc.stderr, proc.stderr[-2000:]
        assert "encoded" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration  # trains, or starts a local Ray
def test_evaluate_over_two_ranks_equals_one_process(trained):
    """`scan evaluate` under torchrun: tiles spread over 2 gloo ranks give the same exact recalls."""
    args = ["evaluate", "--run-dir", str(trained["run"]), "--shards", trained["val"], "eval.precision=fp32"]
    one = json.loads(scan(*args).stdout)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), "-m", "app.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout) == one


@pytest.mark.integration  # trains, or starts a local Ray
def test_explain_writes_a_png_of_the_expected_size(trained):
    png = trained["root"] / "explain.png"
    caption = "a red circle in the top left"
    out = scan("explain", "--run-dir", str(trained["run"]), "--shards", trained["val"], "--caption", caption,
               "--out", str(png)).stdout
    assert "score" in out
    words = len(caption.split())  # one tile per word, plus the picture's own tile
    assert Image.open(png).size == figure_size(words)


@pytest.mark.integration  # trains, or starts a local Ray
def test_retrieve_finds_the_query_captions_own_image(trained):
    from dataio.pipeline import image_records

    records = list(image_records(trained["val"]))[:5]
    page = trained["root"] / "page.html"
    args = ["retrieve", "--run-dir", str(trained["run"]), "--shards", trained["val"], "-k", "5", "--html", str(page)]
    for r in records:
        args += ["--text", r.captions[0]]
    out = scan(*args, "--image", records[0].key).stdout
    ranks = [int(m) for m in re.findall(r"ground truth at rank (\d+)", out)]
    assert len(ranks) == 6
    # After the short training most caption queries find their own image among 20 in the top 5.
    assert sum(rank <= 5 for rank in ranks[:5]) >= 3, out
    assert page.is_file() and records[0].key in page.read_text()


@pytest.mark.integration  # trains, or starts a local Ray
def test_extract_and_import_precomp(tmp_path):
    out = scan("extract", "--config", str(REPO / "configs" / "extract.yaml"), "source.synthetic=6",
               "source.splits=[train]", "backbone=efficientnet-lite0", f"dest={tmp_path / 'extracted'}",
               "images_per_shard=3", "num_cpus=2", "progress=false").stdout
    manifest = read_manifest(str(tmp_path / "extracted" / "train" / "manifest.json"))
    assert sum(s["samples"] for s in manifest["shards"]) == 6 and "6 in the output" in out

    precomp = tmp_path / "precomp"
    precomp.mkdir()
    np.save(precomp / "test_ims.npy", np.random.default_rng(0).standard_normal((4, 36, 32)).astype(np.float32))
    (precomp / "test_caps.txt").write_text("".join(f"a photo number {i} of a thing\n" for i in range(20)))
    scan("import-precomp", "--data-dir", str(precomp), "--split", "test", "--out", str(tmp_path / "imported"))
    manifest = read_manifest(str(tmp_path / "imported" / "manifest.json"))
    assert sum(s["samples"] for s in manifest["shards"]) == 4


@pytest.mark.integration  # trains, or starts a local Ray
def test_demo_on_the_generated_set(tmp_path):
    """The main job, small: generated scenes, Lite0 extraction on a local Ray, SCAN t2i and i2t and
    the VSE++ baseline (model.kind vse) for one epoch each, the ensemble, the report; a rerun reuses
    everything."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--data", str(tmp_path / "no-photos"), "--generated", "24",
            "--pictures", "1", "train.epochs=1", "data.batch_size=32",
            "model.embed_size=64", "loss.warmup_epochs=0"]
    proc = scan(*args)
    for direction in ("t2i", "i2t", "vse"):
        run = out / direction
        for name in ("config.yaml", "tokenizer/tokenizer_config.json", "metrics.jsonl", "loss.png",
                     "recall.png", "checkpoints/latest", "eval/epoch000/sims/index.json"):
            assert (run / name).exists(), f"{direction}/{name}"
    for name in ("report.md", "report.json", "retrieval.html", "text_features"):
        assert (out / name).exists(), name
    assert list((out / "attention").glob("*.png"))
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == "generated captioned shapes" and report["precision"] == "fp32"
    import torch
    if not torch.cuda.is_available():  # on a CPU the report names the kernels that ran
        kernels = torch.backends.cpu.get_cpu_capability()
        assert f"{os.cpu_count()} CPU cores (torch {kernels} kernels, " in report["machine"]
    assert report["runs"]["t2i"]["val"]["rsum"] > 0 and report["runs"]["i2t"]["val"]["rsum"] > 0
    assert report["ensemble"]["rsum"] > 0 and report["runs"]["t2i"]["val"]["images"] == 50
    assert "Val recalls" in proc.stdout and "Published Flickr8K rows" in proc.stdout
    assert "SCAN ensemble t2i + i2t" in proc.stdout and "VSE++ global baseline (model.kind vse)" in proc.stdout
    assert report["baseline"]["val"]["rsum"] > 0 and report["baseline"]["val"]["images"] == 50
    # The report states its noise, the commit and the configs, ranks beside recalls, and the
    # SCAN + VSE++ ensemble as a row of its own.
    assert re.fullmatch(r"[0-9a-f]{7,}( with local changes)?", report["commit"]), report["commit"]
    assert report["seeds"] == {"t2i": 0, "i2t": 0, "vse": 0} and report["quick"] is False
    assert all((out / path).exists() for path in report["configs"].values())
    assert f"commit {report['commit']}" in proc.stdout and "- noise: one training per model" in proc.stdout
    assert "| t2i medr | t2i meanr |" in proc.stdout
    assert report["scan_and_baseline"]["rsum"] > 0
    assert "ensemble of SCAN and VSE++ (mean of all their similarity matrices)" in proc.stdout
    again = scan(*args)  # reuses the shards, the text features and both finished trainings
    assert "shards reused from an earlier run" in again.stdout
    assert json.loads((out / "report.json").read_text())["runs"]["t2i"]["val"] == report["runs"]["t2i"]["val"]


@pytest.mark.integration  # trains
def test_concurrent_trainings_report_a_failure_with_its_log(trained, tmp_path):
    """The demo's trainings at once: one that fails stops the others and names its log's end."""
    from app.demo import expected_steps, steps_logged, train_concurrently
    from scan import configfile
    from scan.config import load_experiment

    common = [f"data.train_shards={trained['train']}", "data.batch_size=32", "model.embed_size=64",
              "model.word_dim=32", f"data.vocab={trained['root'] / 'vocab.json'}"]
    cfgs = {"good": load_experiment(TINY, [*common, f"train.output_dir={tmp_path / 'good'}", "train.epochs=50"]),
            "bad": load_experiment(TINY, [*common, f"train.output_dir={tmp_path / 'bad'}",
                                          f"data.vocab={tmp_path / 'no-such-vocab.json'}"])}
    captions = sum(s["captions"] for s in read_manifest(trained["train"])["shards"])
    total = 50 * -(-captions // 32)
    assert expected_steps(cfgs["good"]) == total
    for name, cfg in cfgs.items():
        (tmp_path / name).mkdir()
        configfile.save(cfg, tmp_path / name / "config.yaml")
    with pytest.raises(RuntimeError, match=r"(?s)training bad failed.*bad/train.log.*no-such-vocab.json"):
        train_concurrently(cfgs, 1, "training good+bad")
    assert steps_logged(tmp_path / "good") < total  # stopped, not left to finish


def test_step_progress_reads_only_whole_new_lines(tmp_path):
    """The demo's bar polls each training's metrics.jsonl: only lines appended since the last poll
    are parsed, a line still being written is left for the next, a replaced log is read anew."""
    from app.demo import StepProgress, steps_logged

    log = tmp_path / "metrics.jsonl"
    progress = StepProgress(tmp_path)
    assert progress.poll() == 0  # no log yet
    with open(log, "wb") as f:
        f.write(b'{"kind": "step", "step": 1, "loss": 3.0}\n{"kind": "eval", "step": 9}\n')
        f.write(b'{"kind": "step", "step": 2')  # half a line
        f.flush()
        assert progress.poll() == 1
        offset = progress.offset
        f.write(b', "loss": 2.5}\n{"kind": "step", "step": 3, "loss": 2.0}\n')
    assert progress.poll() == 3 and progress.offset > offset
    assert progress.poll() == 3 and steps_logged(tmp_path) == 3
    log.write_bytes(b'{"kind": "step", "step": 1}\n')  # a fresh run's shorter log
    assert progress.poll() == 1


def test_demo_quick_selects_the_first_flickr8k_images(flickr8k, tmp_path):
    """--quick: the first 1,000 train and 500 val photos of dataset_flickr8k.json (no training here)."""
    from app.demo import DemoOptions, demo_items

    data = DemoOptions().data
    assert data == flickr8k  # the demo's default is the shared folder beside the repository
    name, items = demo_items(data, 0, tmp_path, quick=True)
    splits = [i.split for i in items]
    assert splits.count("train") == 1000 and splits.count("val") == 500 and "quick" in name
    name, items = demo_items(data, 0, tmp_path)
    assert [i.split for i in items].count("train") == 6000 and [i.split for i in items].count("val") == 1000
    assert all(len(i.captions) == 5 and os.path.isfile(i.image) for i in items[:50])


@pytest.mark.parametrize("args, words", [
    (["train", "--config", TINY, "xattn.agg=median"], ["xattn.agg", "median", "'mean'", "'lse'"]),
    (["train", "--config", TINY, "optim.learning_rate=1"], ["optim.learning_rate", "allowed keys"]),
    (["train", "--config", "no/such.yaml"], ["no/such.yaml", "does not exist"]),
    (["evaluate", "--run-dir", "no/such/run", "--shards", "x"], ["no/such/run", "checkpoint"]),
    (["extract", "source.synthetic=2", "dest=x", "images_per_unit=3"],
     ["unknown config key 'images_per_unit'", "images_per_shard"]),
    (["extract", "source.synthetic=2", "dest=x", "images_per_shard=0"], ["images_per_shard", "0", ">= 1"]),
    (["extract", "dest=x"], ["exactly one source", "source.karpathy", "source.synthetic"]),
    (["extract", "--config", "no/such.yaml", "dest=x"], ["no/such.yaml", "does not exist"]),
])
def test_config_and_input_errors_name_the_problem(args, words):
    proc = scan(*args, check=False)
    assert proc.returncode == 2
    for word in words:
        assert word in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_help_explains_every_command():
    top = scan("--help", check=False).stdout
    for command in ("demo", "extract", "import-precomp", "build-vocab", "train", "evaluate", "explain", "retrieve"):
        assert command in top
        assert "usage: " in scan(command, "--help").stdout


def test_extract_help_lists_the_config_keys_with_defaults():
    out = scan("extract", "--help").stdout
    for text in ("--config", "key=value", "source.karpathy=\"\"", "source.images=", "source.synthetic=0",
                 "dest=", "images_per_shard=256", "batch_size=32", "max_retries=2", "use_gpu=true",
                 "summary_json=", "Exactly one source"):
        assert text in out, text


def test_relative_output_paths_are_made_absolute_or_refused_inside_a_ray_job(tmp_path, monkeypatch):
    from app.cli import RAY_JOB_ENV, job_path
    from scan.configfile import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert job_path("dest", "shards/x") == str(tmp_path / "shards" / "x")
    for given in ("/abs/x", "s3://bucket/x", ""):
        assert job_path("dest", given) == given
    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # as Ray's job supervisor sets it for the entrypoint
    assert job_path("dest", "/abs/x") == "/abs/x"
    with pytest.raises(ConfigError, match=r"config key 'dest': 'shards/x' is a relative path.*Ray job"):
        job_path("dest", "shards/x")
    with pytest.raises(ConfigError, match=r"^--out: 'o' is a relative path"):
        job_path("--out", "o")
