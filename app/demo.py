"""``scan demo``: the whole system on real photos, from pixels to explained, evaluated models.

The command line fills a `DemoOptions`; `run_demo` runs the stages in turn:

1. source: Flickr8k's photos in ``DemoOptions.data`` (by default ``../shared/data/flickr8k`` beside
   the repository; ``dataset_flickr8k.json``: train 6,000,
   val 1,000 images, 5 captions each; ``--quick``: the first 1,000 train and 500 val images), or
   ``--data DIR``; without them the generated captioned-image set (rendered coloured shapes);
2. extraction with a local Ray (EfficientNet-Lite0 grid features, 7 × 7 cells at 224 px) into shards;
3. the frozen MiniLM token features of every caption, once (``scan.text_features``), shared by
   every training below;
4. SCAN trained with DeepSpeed, t2i and i2t at once, each in its own ``scan train`` process with
   cores / 2 threads (``--jobs 1``: one after the other in this process), each validated on val
   (fp32); their ensemble (the mean of the two val similarity matrices); then the VSE++ global
   baseline (``configs/demo_vse.yaml``: ``model.kind: vse``) trained and validated the same way, on
   the same shards and text features, on all cores;
5. a report in the demo folder (``app.demo_report``): recalls beside the published Flickr8K rows, loss and recall plots,
   per-word attention pictures, a retrieval page, ``report.md`` / ``report.json``.

Every stage is idempotent: rerunning reuses committed shards and cached text features, and resumes
each training's latest checkpoint (a finished one is not retrained).

Why this budget (2 CPU cores, at most 20 minutes from a fresh clone; 15.7-17.5 measured): Lite0 at 224 px
extracts the 7,000 photos in under 3.5 minutes (Lite2 at 260 px: about 9) and gives 49 cells instead
of 81, which makes every cross-attention pair 40% cheaper; an epoch over the 30,000 training captions
then takes about 90 s of one thread and an fp32 evaluation of the 1,000 × 5,000 val matrix about 50 s
(each tile cut to its own longest caption), so each direction
trains for 3 epochs (warm-up with all negatives, hardest negatives, the last at lr / 10) and is
validated once at the end. The two directions train side by side because the step is made of
small operators that two threads barely speed up: two 1-thread trainings at once end in about the
time of one on two threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tqdm import tqdm

from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.metrics import build_telemetry
from dataio import storage
from dataio.sources import ImageItem
from scan import configfile
from scan.config import ExperimentConfig, load_experiment
from trainer.train import loader_spec, prepare_text_features, train

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
FLICKR8K_JSON = "dataset_flickr8k.json"
BACKBONE = "efficientnet-lite0"
QUICK = {"train": 1000, "val": 500}  # images of each split with --quick
# The i2t model: the demo's config with the paper's i2t temperature (λ1 = 4).
DIRECTIONS = {"t2i": [], "i2t": ["xattn.direction=i2t", "xattn.lambda_softmax=4"]}

def demo_items(data: Path | None, generated: int, images_dir: Path, seed: int = 0,
               quick: bool = False) -> tuple[str, list[ImageItem]]:
    """(source name, items of the train and val splits). Generated scenes are rendered once into
    ``images_dir`` so that every later picture (attention maps, retrieval page) can show them."""
    if data is not None and (data / FLICKR8K_JSON).is_file():
        from dataio.sources.karpathy import karpathy_items

        items = list(karpathy_items(str(data / FLICKR8K_JSON), str(data / "images"),
                                    splits=["train", "val"]))
        name = f"Flickr8k ({data})"
        if quick:
            items = [i for split, n in QUICK.items() for i in [j for j in items if j.split == split][:n]]
            name = f"Flickr8k, quick: first {QUICK['train']} train and {QUICK['val']} val images ({data})"
        return name, items
    from dataio.sources.synthetic import synthetic_items

    images_dir.mkdir(parents=True, exist_ok=True)
    scenes = [*synthetic_items(generated, seed=seed, split="train", size=224),
              *synthetic_items(max(generated // 6, 50), seed=seed + 1, split="val", size=224)]
    items = []
    for item in scenes:
        path = images_dir / f"{item.key}.png"
        if not path.is_file():
            with storage.atomic_path(path) as tmp:
                item.load().save(tmp, format="PNG")
        items.append(dataclasses.replace(item, image=str(path)))
    return "generated captioned shapes", items


def extract(items: list[ImageItem], shards: Path, workers: int) -> dict:
    """The demo's extraction job. ``workers`` 0: on CPUs one actor per core, each with one thread
    (a Lite0 forward barely speeds up with a second thread, so actors side by side extract more
    images per second, with the same features to the bit); on GPUs one per GPU."""
    import torch

    if not workers and not torch.cuda.is_available():
        workers = os.cpu_count() or 1
    summary = run_job(items, JobConfig(dest=str(shards), backbone=BACKBONE, images_per_shard=250,
                                       workers=workers, num_cpus=os.cpu_count(), use_gpu=True))
    if summary.units_failed:
        raise RuntimeError(f"extraction failed for units {summary.units_failed}")
    return summary.to_dict()


def _resume_tag(cfg: ExperimentConfig) -> str | None:
    return "latest" if (Path(cfg.train.output_dir) / "checkpoints" / "latest").is_file() else None


def train_model(cfg: ExperimentConfig) -> dict:
    """DeepSpeed training in this process; resumes the run's latest checkpoint when there is one."""
    telemetry = build_telemetry(cfg, rank=0, local_rank=0)
    resume = _resume_tag(cfg)  # no checkpoint yet: whatever an unfinished run logged is replaced
    return train(cfg, resume=resume, telemetry=telemetry, overwrite=resume is None)


def expected_steps(cfg: ExperimentConfig) -> int:
    """Optimizer steps of a whole one-process training of ``cfg`` (a progress bar's total)."""
    plan = loader_spec(cfg, None, rank=0, world=1).plan(epoch=0)  # the trainer's own plan, one rank
    per_epoch = plan.num_batches // max(cfg.train.grad_accum, 1)
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


class StepProgress:
    """The last optimizer step in a run's ``metrics.jsonl`` so far (0 before the first), read
    incrementally: each poll parses only the lines appended since the one before (the log grows to
    about 1 MB over a demo training, and the bar polls every 2 s beside the trainings)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.offset = 0  # bytes of whole lines read so far
        self.step = 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # replaced by a shorter file: anew
                    self.offset, self.step = 0, 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.step
        whole = chunk.rfind(b"\n") + 1  # a line being written has no newline yet
        for line in chunk[:whole].splitlines():
            if line.startswith(b'{"kind": "step"'):
                self.step = max(self.step, json.loads(line)["step"])
        self.offset += whole
        return self.step


def steps_logged(run_dir: Path) -> int:
    """The last optimizer step in the run's log so far (0 before the first)."""
    return StepProgress(run_dir).poll()


def train_concurrently(cfgs: dict[str, ExperimentConfig], threads: int, what: str) -> dict[str, dict]:
    """Each config trained by its own ``scan train`` process with ``threads`` torch threads, all at
    once (on few cores, two 1-thread trainings finish sooner than the same two one after the other
    on all threads: the step's small operators do not scale across threads). One progress bar over
    their optimizer steps; a failed training stops the others and its log is named. Returns each
    run's training summary."""
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    totals = {name: expected_steps(cfg) for name, cfg in cfgs.items()}  # a bad manifest fails here
    progress = {name: StepProgress(Path(cfg.train.output_dir)) for name, cfg in cfgs.items()}
    try:
        for name, cfg in cfgs.items():
            run_dir = Path(cfg.train.output_dir)
            cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(run_dir / "config.yaml")]
            cmd += ["--resume", "latest"] if _resume_tag(cfg) else ["--overwrite"]  # (as train_model)
            with open(run_dir / "train.log", "ab") as err, open(run_dir / "train.stdout", "wb") as out:
                procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err), run_dir)
        with tqdm(total=sum(totals.values()), desc=what, unit="step", mininterval=2.0,
                  dynamic_ncols=True, postfix="each run validates after every epoch") as bar:
            while True:
                codes = {name: p.poll() for name, (p, _) in procs.items()}
                done = {name: progress[name].poll() for name in procs}
                bar.update(sum(done.values()) - bar.n)
                validating = [n for n, c in codes.items() if c is None and done[n] >= totals[n]]
                if validating:  # no steps to count while a run validates: say so
                    bar.set_postfix_str(" and ".join(validating) + " validating on val", refresh=False)
                for name, code in codes.items():
                    if code not in (None, 0):
                        log_path = procs[name][1] / "train.log"
                        tail = log_path.read_text(errors="replace").splitlines()[-15:]
                        raise RuntimeError(f"training {name} failed (exit status {code}); the end of "
                                           f"{log_path}:\n" + "\n".join(tail))
                if all(code == 0 for code in codes.values()):
                    break
                time.sleep(2.0)
    finally:
        for p, _ in procs.values():  # after a failure or an interrupt: no orphan trainings
            if p.poll() is None:
                p.terminate()
                p.wait()
    return {name: json.loads((d / "train.stdout").read_text().strip().splitlines()[-1])
            for name, (_, d) in procs.items()}


def final_sims(run_dir: Path):
    """The (N, M) val similarity matrix of the run's last validation (``eval.save_sims``)."""
    from scan.eval.store import load_sims

    found = sorted((run_dir / "eval").glob("epoch*/sims/index.json"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no saved val similarities (eval.save_sims)")
    return load_sims(found[-1].parent)


def ensemble_recalls(run_dirs: Sequence[Path], caps_per_image: int) -> tuple[dict, "np.ndarray"]:
    """Recalls of the mean of the runs' val similarity matrices (the paper's t2i + i2t ensemble),
    and that matrix."""
    import numpy as np

    from scan.metrics import recall_metrics

    sims = np.mean([np.asarray(final_sims(r), dtype=np.float64) for r in run_dirs], axis=0)
    return recall_metrics(sims, caps_per_image), sims.astype(np.float32)


def val_recalls(run_dir: Path) -> dict | None:
    """The run's last val evaluation as a recall dict with its epoch, or None."""
    from trainer.telemetry import read_run_log

    evals = [r for r in read_run_log(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if not evals:
        return None
    flat, epoch = evals[-1]["metrics"], evals[-1]["epoch"]
    out = {"i2t": {k: flat[f"i2t_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")},
           "t2i": {k: flat[f"t2i_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")},
           "rsum": flat["rsum"], "epoch": epoch}
    if "ties_queries" in flat:  # queries with a competitor tied with their positive
        out["ties"] = {k: int(flat[f"ties_{k}"]) for k in ("i2t", "t2i", "queries")}
    return out




@dataclass
class DemoOptions:
    """Every choice of ``scan demo`` (its command line's flags), typed, with its default."""
    out: Path | None = None  # the demo folder (None: runs/demo, or runs/demo-quick with quick)
    # Flickr8k (dataset_flickr8k.json and images/): the shared folder beside the repository; when
    # it is missing, generated scenes
    data: Path | None = REPO.parent / "shared" / "data" / "flickr8k"
    quick: bool = False  # the first QUICK images of each split
    generated: int = 600  # generated train scenes when there are no photos
    config: Path = REPO / "configs" / "demo.yaml"  # the SCAN experiment
    baseline_config: Path = REPO / "configs" / "demo_vse.yaml"  # VSE++ on the same features and budget
    baseline: bool = True  # also train and report the VSE++ baseline
    directions: Sequence[str] = tuple(DIRECTIONS)  # SCAN models trained (both: also their ensemble)
    jobs: int | None = None  # SCAN trainings at once (None: one per direction, up to the cores)
    workers: int = 0  # Ray extraction actors (0: one per CPU core, or one per GPU)
    pictures: int = 4  # attention pictures / retrieval queries
    overrides: Sequence[str] = ()  # key=value overrides of every experiment

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoOptions":
        """The options of ``scan demo``'s parsed command line (``app.cli``)."""
        return cls(out=Path(args.out) if args.out else None, data=Path(args.data) if args.data else None,
                   quick=args.quick, generated=args.generated, config=Path(args.config),
                   baseline=not args.no_baseline, directions=args.directions, jobs=args.jobs,
                   workers=args.workers, pictures=args.pictures, overrides=args.overrides)

    def folder(self) -> Path:
        return Path(self.out or ("runs/demo-quick" if self.quick else "runs/demo")).resolve()

    def groups(self) -> list[tuple[list[str], int]]:
        """The trainings in order: (names trained at once, torch threads each)."""
        cores = os.cpu_count() or 1
        jobs = max(1, min(self.jobs or cores, len(self.directions), cores))
        groups = ([(list(self.directions), cores // jobs)] if jobs > 1
                  else [([d], cores) for d in self.directions])
        return groups + ([(["vse"], cores)] if self.baseline else [])


class _Stages:
    """The demo's numbered stage lines (``[2/6] ...``) and each stage's time in seconds."""

    def __init__(self, count: int) -> None:
        self.count, self.done, self.timings = count, 0, {}

    def announce(self, line: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.count}] {line}", flush=True)

    @contextmanager
    def timed(self, key: str):
        t = time.time()
        yield
        self.timings[key] = time.time() - t


def _what(name: str) -> str:
    return "the VSE++ global baseline" if name == "vse" else f"SCAN {name}"


def experiment_configs(opts: DemoOptions, out: Path) -> dict[str, ExperimentConfig]:
    """Each training's experiment (SCAN per direction, then the baseline) on the demo's shards and
    text features, saved as its run folder's ``config.yaml``."""
    shards = out / "shards"
    models = {d: (opts.config, DIRECTIONS[d]) for d in opts.directions}
    if opts.baseline:
        models["vse"] = (opts.baseline_config, [])
    cfgs: dict[str, ExperimentConfig] = {}
    for name, (model_config, extra) in models.items():
        run_dir = out / name
        cfgs[name] = load_experiment(str(model_config), [
            *extra, f"data.train_shards={shards / 'train' / 'manifest.json'}",
            f"data.val_shards={shards / 'val' / 'manifest.json'}", f"train.output_dir={run_dir}",
            f"model.hf_feature_cache={out / 'text_features'}", "eval.save_sims=true", *opts.overrides])
        run_dir.mkdir(parents=True, exist_ok=True)
        configfile.save(cfgs[name], run_dir / "config.yaml")
    return cfgs


def train_group(cfgs: dict[str, ExperimentConfig], names: list[str], threads: int) -> dict[str, dict]:
    """One training group (at once when several), then each run's val recalls: name → run entry."""
    if len(names) > 1:
        summaries = train_concurrently({n: cfgs[n] for n in names}, threads, "training " + "+".join(names))
    else:
        summaries = {names[0]: train_model(cfgs[names[0]])}
    runs = {}
    for name in names:
        run_dir = Path(cfgs[name].train.output_dir)
        val = val_recalls(run_dir)
        if val is None:
            raise RuntimeError(f"{run_dir}: training ended without a validation (train.eval_every_epochs)")
        sims = final_sims(run_dir)
        val.update(images=int(sims.shape[0]), captions=int(sims.shape[1]))
        runs[name] = {"run_dir": str(run_dir), "summary": summaries[name], "val": val}
    return runs


def run_demo(opts: DemoOptions) -> str:
    """``scan demo``: every stage in turn (a rerun reuses the shards and resumes the trainings);
    returns the report's text."""
    from app.demo_report import DemoResults, make_pictures, write_report
    from tools.plots import plot_run

    out, directions = opts.folder(), list(opts.directions)
    groups = opts.groups()
    stages = _Stages(3 + len(groups))
    with stages.timed("extract"):
        source, items = demo_items(opts.data, opts.generated, out / "images", quick=opts.quick)
        stages.announce(f"extracting {len(items)} images of {source} with {BACKBONE} on a local Ray")
        extraction = extract(items, out / "shards", opts.workers)

    cfgs = experiment_configs(opts, out)
    cfg = cfgs[directions[0]]  # the first SCAN direction's: the report's settings
    with stages.timed("text features"):
        stages.announce("the frozen text encoder's token features of every caption, once "
                        f"({out / 'text_features'}; every training reads them)")
        prepare_text_features(cfg)

    runs: dict[str, dict] = {}
    for names, threads in groups:
        how = (f"at once, {len(names)} processes x {threads} thread{'s' * (threads > 1)}" if len(names) > 1
               else "in this process")
        with stages.timed("train " + "+".join(names)):
            stages.announce(f"training {' and '.join(_what(n) for n in names)} for "
                            f"{cfgs[names[0]].train.epochs} epochs ({cfg.train.precision}, DeepSpeed, "
                            f"{how}), then validating on val; run folder(s) "
                            + ", ".join(str(out / n) for n in names))
            runs.update(train_group(cfgs, names, threads))
    baseline = runs.pop("vse", None)

    ensemble, sims = None, final_sims(out / directions[0])
    if len(directions) > 1:
        ensemble, sims = ensemble_recalls([out / d for d in directions], cfg.eval.caps_per_image)

    with stages.timed("report"):
        stages.announce("report: plots, per-word attention pictures, retrieval page")
        for name in [*directions, *(["vse"] if baseline else [])]:
            plot_run(out / name / "metrics.jsonl", out / name, cfgs[name].loss.warmup_epochs)
        shown = make_pictures(cfg, out / directions[0], out, str(out / "shards" / "val" / "manifest.json"),
                              opts.pictures, [out / d for d in directions], sims)
    scan_and_baseline = None
    if baseline:  # the SCAN runs' and VSE++'s similarity matrices averaged
        scan_and_baseline, _ = ensemble_recalls([*(out / d for d in directions), out / "vse"],
                                                cfg.eval.caps_per_image)
    report = write_report(out, DemoResults(
        source=source, backbone=BACKBONE, precision=cfg.train.precision, timings=stages.timings,
        extraction=extraction, runs=runs, ensemble=ensemble, baseline=baseline, shown=shown,
        scan_and_baseline=scan_and_baseline, configs=cfgs, quick=opts.quick))
    return report.read_text()
