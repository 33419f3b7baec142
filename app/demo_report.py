"""The ``scan demo`` report: plots, per-word attention pictures, a retrieval page, and
``report.md`` / ``report.json`` with the recalls beside the published Flickr8K rows.

The demo's stages (``app.demo``) hand their results over in one `DemoResults`; nothing here trains
or extracts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dataio import storage
from scan.metrics import tie_warning
from scan.builders import scorer_for
from scan.config import ExperimentConfig

# Published Flickr8K rows (official TEST split, the features each paper used), from
# ../shared/data/flickr8k/README.md: i2t R@1/5/10, t2i R@1/5/10, rsum.
PUBLISHED = [
    ("DVSA (Karpathy & Fei-Fei 2015)", "RCNN", (16.5, 40.6, 54.2, 11.8, 32.1, 44.7), 199.9),
    ("m-CNN (ensemble)", "VggNet", (24.8, 53.7, 67.1, 20.3, 47.6, 61.7), 275.2),
    ("FV (Klein et al. 2015)", "GMM+HGLMM", (31.0, 59.3, 73.7, 21.2, 50.0, 64.8), 300.0),
    ("SCAN (ensemble, t2i + i2t)", "bottom-up regions (BUTD)", (52.2, 81.0, 89.2, 38.3, 67.8, 78.9), 407.4),
]


@dataclass
class DemoResults:
    """What the demo's stages produced, as the report shows it."""
    source: str  # where the photos came from, in words
    backbone: str  # the extraction's backbone
    precision: str  # training and evaluation precision
    timings: dict  # stage name → seconds
    extraction: dict  # the extraction job's summary
    runs: dict  # SCAN direction → {"run_dir", "summary", "val"}
    ensemble: dict | None = None  # recalls of the directions' mean similarity matrix
    baseline: dict | None = None  # the VSE++ run, as a `runs` entry
    shown: dict = dataclasses.field(default_factory=dict)  # `make_pictures`' result
    scan_and_baseline: dict | None = None  # recalls of the SCAN runs' and VSE++'s mean matrix
    configs: dict = dataclasses.field(default_factory=dict)  # run name → its ExperimentConfig
    quick: bool = False  # scan demo --quick: small sets, a first look


# Seed spread of the full demo's val rsum (3 seeds each, docs/RESULTS.md "Recipe study").
SEED_SD = {"SCAN t2i": 1.6, "SCAN ensemble": 2.4, "VSE++": 3.0}


def make_pictures(cfg: ExperimentConfig, run_dir: Path, out_dir: Path, val_spec: str, count: int,
                  gallery_runs: Sequence[Path], sims) -> dict:
    """Per-word attention pictures (``run_dir``'s model) of the first val images with their first
    caption, and a retrieval page over the val split scored by ``gallery_runs`` (``sims``)."""
    from dataio.pipeline import image_records
    from tools.explain import explain_pair
    from tools.inference import load_run
    from tools.retrieve import ImageQuery, TextQuery, build_gallery, format_results, retrieve, write_html

    run = load_run(run_dir)
    out = out_dir / "attention"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for record in image_records(val_spec):
        records.append(record)
        if len(records) == count:
            break
    explained = []
    for i, r in enumerate(records):
        png = out / f"{i:02d}_{r.key}.png"
        res = explain_pair(run.model, r.regions, r.captions[0], run.text, scorer_for(run.cfg), png,
                           boxes=r.boxes, image=r.meta.get("file"), saliency=r.saliency)
        explained.append({"png": str(png.relative_to(out_dir)), "key": r.key, "caption": r.captions[0],
                          "score": res["score"], "words": res["words"]})
    members = [load_run(d) for d in gallery_runs]
    gallery = build_gallery([(m.model, scorer_for(m.cfg)) for m in members], image_records(val_spec),
                            encode_text=run.text.encode, caps_per_image=cfg.eval.caps_per_image,
                            precision=cfg.eval.precision, sims=sims)
    queries = [TextQuery(r.captions[1]) for r in records] + [ImageQuery(r.key) for r in records]
    results = [retrieve(gallery, q, 5) for q in queries]
    print(format_results(results))
    page = write_html(results, out_dir / "retrieval.html", gallery.image_files)
    return {"attention": explained, "retrieval_page": str(page.relative_to(out_dir)),
            "text_queries_own_image_in_top5": sum(1 for r in results[:len(records)]
                                                  if r.first_relevant is not None and r.first_relevant <= 5)}


def machine() -> str:
    """The CPU (or GPU) the figures were computed on, in words. On a CPU it also names the kernels
    torch dispatches to and whether bf16 is native: fp32 sums differ in their last bits between
    kernel families (MKL picks its sgemm by vendor and ISA), and a 3-epoch training amplifies that
    to recalls that differ within a seed's spread (docs/RESULTS.md, "Recall across machines")."""
    import torch

    from scan.precision import native_bf16

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernels = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return f"{name}, {os.cpu_count()} CPU cores (torch {kernels} kernels, {bf16})"


def commit() -> str:
    """The checkout's commit (``git rev-parse --short HEAD``), marked when files differ from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" with local changes" if dirty else "")


def _noise(res: DemoResults) -> str:
    seeds = sorted({c.train.seed for c in res.configs.values()})
    spread = ", ".join(f"{k} ±{v}" for k, v in SEED_SD.items())
    caveat = ("this --quick run trains on 1,000 images and validates on 500, so its spread is larger "
              "and its order of the models is not a result" if res.quick
              else "differences under about twice that are noise")
    return (f"- noise: one training per model (train.seed {', '.join(map(str, seeds))}); across 3 seeds "
            f"the full demo's val rsum spreads by (sd) {spread}; {caveat}")


def _ranks_row(name: str, m: dict) -> str:
    ties = m.get("ties")
    tied = f"{ties['i2t']} + {ties['t2i']} of {ties['queries']}" if ties else "not counted"
    return (f"| {name} | " + " | ".join(f"{m[d][k]:.0f}" if k == "medr" else f"{m[d][k]:.1f}"
                                        for d in ("i2t", "t2i") for k in ("medr", "meanr"))
            + f" | {tied} |")


def _row(name: str, m: dict) -> str:
    return (f"| {name} | " + " | ".join(f"{m[d][k]:.1f}" for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))
            + f" | {m['rsum']:.1f} |")


def write_report(out_dir: Path, res: DemoResults) -> Path:
    """``report.md`` and ``report.json`` in the demo folder."""
    head = "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    runs, extraction, timings, shown = res.runs, res.extraction, res.timings, res.shown
    any_run = next(iter(runs.values()))
    lines = ["# SCAN demo report", "", f"- source: {res.source}",
             f"- machine: {machine()}; training and evaluation precision: {res.precision}",
             f"- features: {res.backbone} grid, {extraction['images_written']} images, "
             + (f"{extraction['images_per_second']:.1f} images/s" if extraction["images_computed"]
                else "shards reused from an earlier run") + f", {len(extraction['skipped'])} skipped",
             "- training: " + "; ".join(f"{d} {r['summary']['steps']} steps" for d, r in runs.items())
             + f", optimizer {any_run['summary'].get('optimizer')}",
             "- stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
             + f"; total {sum(timings.values()):.0f}",
             f"- code: commit {commit()}; configs: "
             + ", ".join(f"`{name}/config.yaml`" for name in res.configs), _noise(res), "",
             f"## Val recalls ({any_run['val']['images']} images, {any_run['val']['captions']} captions)", "",
             head, rule]
    for d, r in runs.items():
        lines.append(_row(f"SCAN {d} (after {r['val']['epoch'] + 1} epochs)", r["val"]))
    if res.ensemble:
        lines.append(_row("SCAN ensemble t2i + i2t (mean of the two similarity matrices)", res.ensemble))
    named = [(f"SCAN {d}", r["val"]) for d, r in runs.items()]
    if res.ensemble:
        named.append(("SCAN ensemble t2i + i2t", res.ensemble))
    if res.baseline:
        lines.append(_row(f"VSE++ global baseline (model.kind vse), same features and training "
                          f"(after {res.baseline['val']['epoch'] + 1} epochs)", res.baseline["val"]))
        named.append(("VSE++", res.baseline["val"]))
    if res.scan_and_baseline:
        lines.append(_row("ensemble of SCAN and VSE++ (mean of all their similarity matrices)",
                          res.scan_and_baseline))
        named.append(("SCAN + VSE++ ensemble", res.scan_and_baseline))
    lines += ["", "Rank of the true match (1-based; medr: median, meanr: mean); a competitor scoring "
              "exactly the true match's score ranks above it (tied queries: image + caption queries "
              "with such a tie):", "",
              "| model | i2t medr | i2t meanr | t2i medr | t2i meanr | tied queries |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [_ranks_row(name, m) for name, m in named]
    lines += [f"- **{name}**: {w}" for name, m in named if (w := tie_warning(m))]
    lines += ["", "## Published Flickr8K rows, for orientation", "",
              "Another split (the official **test** 1,000 images, held out here) and other features: "
              "not comparable number for number with the val figures above.", "", head, rule]
    for name, features, r, rsum in PUBLISHED:
        lines.append(f"| {name}, {features} | " + " | ".join(f"{v:.1f}" for v in r) + f" | {rsum:.1f} |")
    plotted = [*runs, *(["vse"] if res.baseline else [])]
    lines += ["", "Plots: " + ", ".join(f"`{d}/loss.png`, `{d}/recall.png`" for d in plotted)
              + f". Retrieval page: `{shown['retrieval_page']}`. Per-word attention pictures:", ""]
    lines += [f"- `{a['png']}`: {a['caption']} (score {a['score']:.3f})" for a in shown["attention"]]
    report = out_dir / "report.md"
    storage.write_text_atomic(report, "\n".join(lines) + "\n")
    storage.write_text_atomic(out_dir / "report.json", json.dumps(
        {"source": res.source, "machine": machine(), "precision": res.precision, "timings_s": timings,
         "commit": commit(), "quick": res.quick,
         "seeds": {name: c.train.seed for name, c in res.configs.items()},
         "configs": {name: f"{name}/config.yaml" for name in res.configs},
         "extraction": extraction, "runs": runs, "ensemble": res.ensemble, "baseline": res.baseline,
         "scan_and_baseline": res.scan_and_baseline,
         "published_test_rows": [dict(zip(("method", "features", "recalls", "rsum"), p)) for p in PUBLISHED],
         **shown}, indent=1))
    return report
