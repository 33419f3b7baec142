"""``scan demo``: the whole system on real photos, from pixels to an explained, evaluated model.

1. source: the captioned photos of ``../shared/data/flickr8k-1k`` when that folder exists (or
   ``--data DIR``), otherwise the generated captioned-image set (rendered coloured shapes);
2. extraction with a local Ray (EfficientNet-Lite2 grid features, 9 × 9 cells) into local shards;
3. training with DeepSpeed in this one process (bf16), sharded evaluation of the val split each epoch;
4. a report in the run folder: the config, vocabulary, checkpoint, ``metrics.jsonl``, loss and
   recall plots, attention pictures, a retrieval page and ``report.md`` with the val recalls.

Every stage is idempotent: rerunning reuses committed shards and resumes the latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.metrics import build_telemetry
from dataio import storage
from dataio.sources import ImageItem
from scan import configfile
from scan.config import ExperimentConfig, load_experiment
from trainer.train import train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k-1k"
FLICKR8K_JSON = "dataset_flickr8k_1k.json"


def demo_items(data: Path | None, generated: int, images_dir: Path, seed: int = 0
               ) -> tuple[str, list[ImageItem]]:
    """(source name, items of the train and val splits). Generated scenes are rendered once into
    ``images_dir`` so that every later picture (attention maps, retrieval page) can show them."""
    if data is not None and (data / FLICKR8K_JSON).is_file():
        from dataio.sources.karpathy import karpathy_items

        return f"flickr8k-1k ({data})", list(karpathy_items(str(data / FLICKR8K_JSON), str(data / "images"),
                                                            splits=["train", "val"]))
    from dataio.sources.synthetic import synthetic_items

    images_dir.mkdir(parents=True, exist_ok=True)
    scenes = [*synthetic_items(generated, seed=seed, split="train", size=260),
              *synthetic_items(max(generated // 6, 50), seed=seed + 1, split="val", size=260)]
    items = []
    for item in scenes:
        path = images_dir / f"{item.key}.png"
        if not path.is_file():
            with storage.atomic_path(path) as tmp:
                item.load().save(tmp, format="PNG")
        items.append(dataclasses.replace(item, image=str(path)))
    return "generated captioned shapes", items


def extract(items: list[ImageItem], shards: Path, workers: int) -> dict:
    summary = run_job(items, JobConfig(dest=str(shards), backbone="efficientnet-lite2",
                                       images_per_shard=128, workers=workers, num_cpus=os.cpu_count(),
                                       use_gpu=True))
    if summary.units_failed:
        raise RuntimeError(f"extraction failed for units {summary.units_failed}")
    return summary.to_dict()


def train_model(cfg: ExperimentConfig) -> dict:
    """DeepSpeed training in this process; resumes the run's latest checkpoint when there is one."""
    ckpt = Path(cfg.train.output_dir) / "checkpoints" / "latest"
    telemetry = build_telemetry(cfg, rank=0, local_rank=0)
    return train(cfg, resume="latest" if ckpt.is_file() else None, telemetry=telemetry)


def run_baseline(shards: Path, out: Path) -> dict:
    """The global-embedding VSE++ baseline on the same shards (``trainer.baseline_vse``), its result
    also written to ``out``."""
    from trainer.baseline_vse import BaselineConfig, format_table, run, write_json

    result = run(str(shards / "train" / "manifest.json"), str(shards / "val" / "manifest.json"),
                 BaselineConfig())
    print(format_table(result))
    write_json(str(out), result)
    return result


def make_pictures(cfg: ExperimentConfig, run_dir: Path, val_spec: str, count: int) -> dict:
    """Attention pictures of the first val images with their first caption, and a retrieval page."""
    from dataio.pipeline import image_records
    from tools.explain import explain_pair
    from tools.inference import gallery_for_runs, load_run
    from tools.retrieve import ImageQuery, TextQuery, format_results, retrieve, write_html

    run = load_run(run_dir)
    out = run_dir / "attention"
    out.mkdir(exist_ok=True)
    records = []
    for record in image_records(val_spec):
        records.append(record)
        if len(records) == count:
            break
    explained = []
    for i, r in enumerate(records):
        png = out / f"{i:02d}_{r.key}.png"
        res = explain_pair(run.model, r.regions, r.captions[0], run.text, run.cfg.xattn, png,
                           boxes=r.boxes, image=r.meta.get("file"))
        explained.append({"png": str(png.relative_to(run_dir)), "key": r.key, "caption": r.captions[0],
                          "score": res["score"]})
    gallery = gallery_for_runs([str(run_dir)], val_spec)
    queries = [TextQuery(r.captions[1]) for r in records] + [ImageQuery(r.key) for r in records]
    results = [retrieve(gallery, q, 5) for q in queries]
    print(format_results(results))
    page = write_html(results, run_dir / "retrieval.html", gallery.image_files)
    return {"attention": explained, "retrieval_page": str(page.relative_to(run_dir)),
            "text_queries_own_image_in_top5": sum(1 for r in results[:len(records)]
                                                  if r.first_relevant is not None and r.first_relevant <= 5)}


def write_report(run_dir: Path, source: str, timings: dict, extraction: dict, summary: dict,
                 final: tuple[dict, dict] | None, baseline: dict | None, shown: dict) -> Path:
    """``report.md`` and ``report.json`` in the run folder."""
    def row(name: str, m: dict) -> str:
        return (f"| {name} | " + " | ".join(f"{m[d][k]:.1f}" for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))
                + f" | {m['rsum']:.1f} |")

    lines = ["# SCAN demo report", "", f"- source: {source}",
             f"- extraction: {extraction['images_written']} images, "
             + (f"{extraction['images_per_second']:.1f} images/s" if extraction["images_computed"]
                else "shards reused from an earlier run") + f", {len(extraction['skipped'])} skipped",
             f"- training: {summary['steps']} steps, optimizer {summary.get('optimizer')}",
             "- stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
             "## Val recalls", "",
             "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if final:
        last, best = final
        lines.append(row(f"SCAN, last epoch ({last['epoch']})", last))
        lines.append(row(f"SCAN, best val epoch ({best['epoch']})", best))
    if baseline:
        lines.append(row(f"VSE++ global-embedding baseline, best val epoch ({baseline['best_epoch']})",
                         baseline["val"]))
    lines += ["", "Plots: `loss.png`, `recall.png`. Retrieval page: "
              f"`{shown['retrieval_page']}`. Attention pictures:", ""]
    lines += [f"- `{a['png']}`: {a['caption']} (score {a['score']:.3f})" for a in shown["attention"]]
    report = run_dir / "report.md"
    storage.write_text_atomic(report, "\n".join(lines) + "\n")
    storage.write_text_atomic(run_dir / "report.json", json.dumps(
        {"source": source, "timings_s": timings, "extraction": extraction, "training": summary,
         "val": final[0] if final else None, "val_best": final[1] if final else None,
         "baseline": baseline, **shown}, indent=1))
    return report


def val_recalls(run_dir: Path) -> tuple[dict, dict] | None:
    """The (last, best by rsum) val evaluations of the run, as recall dicts with their epoch."""
    from trainer.telemetry import read_run_log

    evals = [r for r in read_run_log(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if not evals:
        return None

    def unflatten(record: dict) -> dict:
        flat = record["metrics"]
        return {"i2t": {k: flat[f"i2t_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")},
                "t2i": {k: flat[f"t2i_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")},
                "rsum": flat["rsum"], "epoch": record["epoch"]}

    return unflatten(evals[-1]), unflatten(max(evals, key=lambda r: r["metrics"]["rsum"]))


def run_demo(*, out: str, data: str | None, generated: int, config: str, workers: int, pictures: int,
             baseline: bool, overrides: Sequence[str]) -> str:
    """``scan demo``: every stage in turn (a rerun reuses the shards and resumes the training);
    returns the report's text."""
    out = Path(out).resolve()
    shards, run_dir = out / "shards", out / "run"
    timings: dict[str, float] = {}

    t = time.time()
    source, items = demo_items(Path(data) if data else None, generated, out / "images")
    print(f"[1/4] extracting {len(items)} images of {source} with EfficientNet-Lite2 on a local Ray")
    extraction = extract(items, shards, workers)
    timings["extract"] = time.time() - t

    t = time.time()
    cfg = load_experiment(config, [f"data.train_shards={shards / 'train' / 'manifest.json'}",
                                   f"data.val_shards={shards / 'val' / 'manifest.json'}",
                                   f"train.output_dir={run_dir}", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    configfile.save(cfg, run_dir / "config.yaml")
    print(f"[2/4] training {cfg.train.epochs} epochs ({cfg.train.precision}, DeepSpeed, 1 process), "
          f"evaluating val every epoch; run folder {run_dir}")
    summary = train_model(cfg)
    timings["train"] = time.time() - t

    t = time.time()
    baseline_result = None
    if baseline:
        print("[3/4] VSE++ global-embedding baseline on the same shards")
        baseline_result = run_baseline(shards, out / "baseline_vse.json")
    timings["baseline"] = time.time() - t

    t = time.time()
    print("[4/4] report: plots, attention pictures, retrieval page")
    from tools.plots import plot_run

    plot_run(run_dir / "metrics.jsonl", run_dir)
    shown = make_pictures(cfg, run_dir, str(shards / "val" / "manifest.json"), pictures)
    timings["report"] = time.time() - t
    report = write_report(run_dir, source, timings, extraction, summary, val_recalls(run_dir),
                          baseline_result, shown)
    return report.read_text()
