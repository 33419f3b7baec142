"""``scan``: the command line of the SCAN system. Each subcommand parses, then calls one library function.

    scan demo                       photos (or generated scenes) → shards → training → evaluation → report
    scan extract ...                Ray feature-extraction job → WebDataset shards
    scan import-precomp ...         SCAN precomp .npy/.txt features → shards
    scan build-vocab ...            word vocabulary (threshold 4) from a TRAIN split's shards
    scan train --config X.yaml      DeepSpeed training (one process, deepspeed, torchrun)
    scan evaluate --run-dir R ...   sharded evaluation of one run or an ensemble of runs
    scan evaluate-embeddings ...    the same from saved embeddings (torchrun / deepspeed)
    scan evaluate-ray ...           the same as a Ray job, one actor per GPU
    scan explain --run-dir R ...    per-word attention picture of an image–caption pair
    scan retrieve --run-dir R ...   text → images and image → captions, printed and as HTML

Distributed launch: ``deepspeed --num_gpus N --module app.cli train --config X.yaml`` (or
``torchrun --nproc_per_node N -m app.cli train ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Sequence

log = logging.getLogger("scan")

OVERRIDES_HELP = "key=value config overrides applied after the YAML, e.g. optim.lr=5e-4 xattn.agg=lse"


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


# Set by Ray's job supervisor for the entrypoint of `ray job submit`, whose working directory is
# Ray's temporary copy of --working-dir (or the supervisor's own folder), not the submitter's.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_path(key: str, value: str) -> str:
    """An output path every process of a job agrees on: ``s3://`` and absolute paths as given, a
    relative local path made absolute here; refused (ConfigError naming ``key``) inside a submitted
    Ray job, where it would land in Ray's temporary working-directory copy, deleted with the job."""
    from dataio import storage
    from scan.configfile import ConfigError

    if not value or storage.is_s3(value) or os.path.isabs(value):
        return value
    if os.environ.get(RAY_JOB_ENV):
        named = key if key.startswith("--") else f"config key '{key}'"
        raise ConfigError(f"{named}: {value!r} is a relative path, and this command runs as a Ray job "
                          f"in {os.getcwd()}, Ray's temporary copy of the job's working directory "
                          f"(deleted with the job): give an absolute path or s3:// URL instead")
    return os.path.abspath(value)


# --------------------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--resume", default=None,
                   help="'latest' or a checkpoint tag (stepNNNNNNNN) under <train.output_dir>/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in train.output_dir (its checkpoints, metrics logs, "
                        "validations and built vocabulary are deleted); without it, or --resume, a "
                        "folder holding another run is refused")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; do not pass by hand")
    _overrides(p)


def _run_train(args: argparse.Namespace) -> int:
    from cluster.metrics import build_telemetry
    from scan.config import load_experiment
    from trainer.distributed import read_env
    from trainer.train import train

    cfg = load_experiment(args.config, args.overrides)
    job_path("train.output_dir", cfg.train.output_dir)  # refused inside a Ray job when relative
    if cfg.model.kind == "scan_sal":  # before any process group or worker: name the data set
        from dataio.pipeline import require_saliency
        for key in ("data.train_shards", "data.val_shards"):
            spec = getattr(cfg.data, key.split(".")[1])
            if spec:
                require_saliency(spec, key)
    env = read_env(args.local_rank)
    if args.resume and env.rank == 0:
        from trainer.outputs import fetch_log
        fetch_log(cfg)  # a run in object storage resumed on a host without its run log
    telemetry = build_telemetry(cfg, rank=env.rank, local_rank=env.local_rank)
    summary = train(cfg, resume=args.resume, telemetry=telemetry, local_rank=args.local_rank,
                    overwrite=args.overwrite)
    if env.rank == 0:
        print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------ evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", required=True,
                   help="training run folder; repeat for an ensemble (similarity matrices averaged)")
    p.add_argument("--shards", required=True, help="the split to evaluate: manifest.json, shard pattern or s3:// URL")
    p.add_argument("--tag", default="latest", help="checkpoint tag of every run")
    p.add_argument("--out", default=None,
                   help="folder for metrics.json, resumable tile records, topk.jsonl and (eval.save_sims) sims/")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    _overrides(p)
    p.epilog = ("Overrides apply to the eval section of every run's config, e.g. eval.protocol=coco1k "
                "(split | f30k1k | coco1k | coco5k), eval.topk=10, eval.save_sims=true.")


def _run_evaluate(args: argparse.Namespace) -> int:
    from tools.inference import evaluate_runs

    result = evaluate_runs(args.run_dir, args.shards, tag=args.tag, overrides=args.overrides,
                           out_dir=job_path("--out", args.out), local_rank=args.local_rank)
    from dataio.ranks import rank_world

    if rank_world()[0] == 0:  # every rank has the result; one prints it
        _print_result(result, indent=1)
    return 0


def _print_result(result, indent: int | None = None, **extra: object) -> None:
    """An evaluation's figures as JSON on stdout, with the tied queries' warning in words if any."""
    from scan.metrics import tie_warning

    out = {"protocol": result.protocol, "precision": result.precision, **result.metrics, **extra}
    if (warning := tie_warning(result.metrics)):
        out["warning"] = warning
    print(json.dumps(out, indent=indent))


# ------------------------------------------------------------------------------------------- explain
def _add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="training run folder")
    p.add_argument("--shards", required=True, help="shards holding the image (manifest.json or pattern)")
    p.add_argument("--key", default=None, help="image key (default: the first image of the shards)")
    p.add_argument("--caption", default=None, help="caption text (default: the image's first caption)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--tag", default="latest", help="checkpoint tag")
    p.add_argument("--columns", type=int, default=5, help="tiles per row of the picture")


def _run_explain(args: argparse.Namespace) -> int:
    from scan.builders import scorer_for
    from tools.explain import explain_pair
    from tools.inference import find_record, load_run

    run = load_run(args.run_dir, args.tag)
    record = find_record(args.shards, args.key, run)  # shards of the run's cut
    caption = args.caption if args.caption is not None else record.captions[0]
    out = explain_pair(run.model, record.regions, caption, run.text, scorer_for(run.cfg), args.out,
                       boxes=record.boxes, image=record.meta.get("file"), columns=args.columns,
                       saliency=record.saliency)
    print(f"{out['png']}: image {record.key}, score {out['score']:.4f}, words {' '.join(out['words'])}")
    return 0


# ------------------------------------------------------------------------------------------ retrieve
def _add_retrieve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", required=True, help="training run folder; repeat for an ensemble")
    p.add_argument("--shards", required=True, help="the gallery split (manifest.json or pattern)")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image key of the gallery (repeatable)")
    p.add_argument("-k", type=int, default=5, help="results per query")
    p.add_argument("--html", default=None, help="also write a static HTML page with the images here")
    p.add_argument("--tag", default="latest", help="checkpoint tag of every run")


def _run_retrieve(args: argparse.Namespace) -> int:
    from tools.inference import gallery_for_runs
    from tools.retrieve import ImageQuery, TextQuery, format_results, retrieve, write_html

    if not args.text and not args.image:
        raise SystemExit("scan retrieve: give at least one --text or --image query")
    gallery = gallery_for_runs(args.run_dir, args.shards, tag=args.tag)
    queries = [TextQuery(t) for t in args.text] + [ImageQuery(k) for k in args.image]
    results = [retrieve(gallery, q, args.k) for q in queries]
    print(format_results(results))
    if args.html:
        print(f"page: {write_html(results, args.html, gallery.image_files)}")
    return 0


# --------------------------------------------------------------------------------------- build-vocab
def _add_build_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="the TRAIN split's shards (manifest.json or pattern)")
    p.add_argument("--out", required=True, help="vocabulary JSON to write (local path or s3://)")
    p.add_argument("--threshold", type=int, default=4, help="keep words seen at least this often (SCAN: 4)")


def _run_build_vocab(args: argparse.Namespace) -> int:
    from dataio.pipeline import iter_tokens
    from dataio.text import build_vocab

    vocab = build_vocab(iter_tokens(args.shards), threshold=args.threshold)
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} entries (4 special tokens + words seen >= {args.threshold} times)")
    return 0


# ------------------------------------------------------------------------------------ import-precomp
def _add_import_precomp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="folder with {split}_ims.npy and {split}_caps.txt")
    p.add_argument("--split", required=True, help="train, dev, test, testall ...")
    p.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix of the shards")
    p.add_argument("--images-per-shard", type=int, default=1000, help="images per shard")
    p.add_argument("--karpathy", default=None,
                   help="Karpathy split file (dataset_coco.json): take each image's captions from it "
                        "(all 5-7 of a COCO image), matched by {split}_ids.txt")


def _run_import_precomp(args: argparse.Namespace) -> int:
    from dataio.sources.precomp import import_precomp

    print(import_precomp(args.data_dir, args.split, args.out, max_samples=args.images_per_shard,
                         karpathy_json=args.karpathy))
    return 0


# -------------------------------------------------------------------------------------------- extract
def _add_extract(p: argparse.ArgumentParser) -> None:
    from cluster.extract_config import keys_help

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Defaults of the options, and the key list as written."""

    p.formatter_class = Formatter
    p.add_argument("--config", default=None,
                   help="extraction YAML (configs/extract.yaml lists every key at its default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config keys applied after the YAML, e.g. source.synthetic=100 dest=shards/syn")
    p.epilog = keys_help()


def _run_extract(args: argparse.Namespace) -> int:
    """Exit 0, or 1 when some unit failed every attempt."""
    from cluster.extract import run_job, source_items
    from cluster.extract_config import load_extraction
    from dataio import storage

    cfg = load_extraction(args.config, args.overrides)  # validated by the loader
    cfg = dataclasses.replace(cfg, dest=job_path("dest", cfg.dest),
                              summary_json=job_path("summary_json", cfg.summary_json))
    summary = run_job(source_items(cfg.source), cfg)  # checks the backbone before starting Ray
    _print_extract_summary(summary)
    if cfg.summary_json:
        storage.write_bytes_atomic(cfg.summary_json, json.dumps(summary.to_dict(), indent=1).encode())
    return 1 if summary.units_failed else 0


def _print_extract_summary(s) -> None:
    print(f"run {s.run_id}: {s.units_total} units ({len(s.units_reused)} reused, "
          f"{len(s.units_computed)} extracted, {len(s.units_failed)} failed), {s.workers} workers")
    print(f"images: {s.images_computed} extracted in {s.extract_seconds:.1f} s = "
          f"{s.images_per_second:.2f} images/s (+{s.startup_seconds:.1f} s start-up); "
          f"{s.images_written} in the output")
    print(f"skipped: {len(s.skipped)} images ({s.captions_dropped} captions dropped); "
          f"converted: {len(s.converted)}")
    for skipped in s.skipped:
        print(f"  skipped {skipped['file']}: {skipped['reason']}")
    for failed in s.units_failed:
        print(f"  FAILED unit {failed['unit']} after {failed['attempts']} attempts: {failed['error']}")
    for m in s.manifests:
        print(f"manifest: {m}")


# ------------------------------------------------------------------------------- evaluate-embeddings
def _add_members(p: argparse.ArgumentParser) -> None:
    """--config/--embeddings pairs (one per ensemble member) and key=value overrides."""
    p.add_argument("--config", action="append", required=True,
                   help="experiment YAML of a model (its xattn section; eval settings from the first)")
    p.add_argument("--embeddings", action="append", required=True,
                   help="embeddings file of that model (scan.eval.encode.save_embeddings), same order")
    _overrides(p)


def _members(args: argparse.Namespace, device: object = "cpu") -> tuple[list, list]:
    from scan.config import load_experiment
    from scan.eval.encode import load_embeddings
    from scan.eval.tiles import Member
    from scan.builders import scorer_for

    if len(args.config) != len(args.embeddings):
        raise ValueError(f"{len(args.config)} --config but {len(args.embeddings)} --embeddings: give "
                         f"one pair per ensemble member")
    cfgs = [load_experiment(path, args.overrides) for path in args.config]
    return cfgs, [Member(load_embeddings(path).to(device), scorer_for(cfg))
                  for cfg, path in zip(cfgs, args.embeddings)]


def _add_evaluate_embeddings(p: argparse.ArgumentParser) -> None:
    _add_members(p)
    p.add_argument("--out", help="output directory: metrics.json, resume records, sims, topk.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher")


def _run_evaluate_embeddings(args: argparse.Namespace) -> int:
    from scan.eval.sharded import evaluate_and_write
    from trainer.distributed import init_process_group, read_env

    env = read_env(args.local_rank)
    if env.world > 1:
        init_process_group(env)
    cfgs, members = _members(args, env.device)
    result = evaluate_and_write(members, cfgs[0].eval, rank=env.rank, world=env.world, out_dir=args.out)
    if env.rank == 0:
        _print_result(result, tiles_computed=result.tiles_computed, tiles_loaded=result.tiles_loaded)
    return 0


# --------------------------------------------------------------------------------------- evaluate-ray
def _add_evaluate_ray(p: argparse.ArgumentParser) -> None:
    _add_members(p)
    p.add_argument("--out", required=True, help="output directory shared by the nodes")
    p.add_argument("--actors", type=int, default=0,
                   help="tile actors (0: one per GPU of the cluster, else one per --num-cpus CPUs)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor when there is no GPU")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")


def _run_evaluate_ray(args: argparse.Namespace) -> int:
    from cluster.eval_job import evaluate_on_ray

    out = job_path("--out", args.out)  # before loading anything: the actors write there too
    cfgs, members = _members(args)
    result, actors = evaluate_on_ray(members, cfgs[0].eval, out_dir=out, actors=args.actors,
                                     num_cpus=args.num_cpus, address=args.address)
    _print_result(result, actors=actors, tiles_computed=result.tiles_computed,
                  tiles_loaded=result.tiles_loaded)
    return 0


# ----------------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    from app.demo import DIRECTIONS, QUICK, DemoOptions

    default = DemoOptions()

    p.description = ("The whole system end to end: Flickr8k's photos (or generated scenes) → Ray "
                     "extraction → frozen text features once → DeepSpeed training of SCAN t2i and "
                     "i2t side by side → val evaluation and their ensemble → the VSE++ baseline → "
                     "a report (report.md in the demo folder). About 20 minutes on 2 CPU cores; "
                     "--quick about 4. A rerun reuses the shards and resumes the trainings.")
    p.add_argument("--out", default=None,
                   help="demo folder: shards/, t2i/, i2t/ and report.md go here "
                        "(default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--data", default=str(default.data),
                   help="folder with dataset_flickr8k.json and images/; when missing, generated scenes")
    p.add_argument("--quick", action="store_true",
                   help=f"a first look: the first {QUICK['train']} train and {QUICK['val']} val images")
    p.add_argument("--directions", nargs="+", choices=list(DIRECTIONS), default=list(DIRECTIONS),
                   help="SCAN models to train (both: also their ensemble)")
    p.add_argument("--generated", type=int, default=default.generated,
                   help="generated train scenes when no photos")
    p.add_argument("--config", default=str(default.config), help="experiment YAML of the demo")
    p.add_argument("--workers", type=int, default=default.workers,
                   help="Ray extraction actors (0: one per CPU core with one thread each, or one per GPU)")
    p.add_argument("--pictures", type=int, default=default.pictures,
                   help="attention pictures / retrieval queries")
    p.add_argument("--no-baseline", action="store_true", help="skip the VSE++ baseline comparison")
    p.add_argument("--jobs", type=int, default=None,
                   help="SCAN trainings at once, each its own process with cores / jobs threads "
                        "(default: one per direction, up to the number of cores; 1: one after the other)")
    _overrides(p)


def _run_demo(args: argparse.Namespace) -> int:
    from app.demo import DemoOptions, run_demo

    print(run_demo(DemoOptions.from_args(args)))
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    # name: (one-line help, add_arguments, run)
    "demo": ("the whole system end to end on real photos (or generated scenes), with a report",
             _add_demo, _run_demo),
    "extract": ("extract region/grid features with a Ray job into WebDataset shards", _add_extract,
                _run_extract),
    "import-precomp": ("import SCAN precomp features (.npy + .txt) into shards", _add_import_precomp,
                       _run_import_precomp),
    "build-vocab": ("build the word vocabulary from a TRAIN split", _add_build_vocab, _run_build_vocab),
    "train": ("train SCAN with DeepSpeed (one process, deepspeed or torchrun)", _add_train, _run_train),
    "evaluate": ("sharded evaluation of a run or an ensemble", _add_evaluate, _run_evaluate),
    "evaluate-embeddings": ("sharded evaluation of saved embeddings (one process, torchrun or deepspeed)",
                            _add_evaluate_embeddings, _run_evaluate_embeddings),
    "evaluate-ray": ("sharded evaluation of saved embeddings as a Ray job (one actor per GPU)",
                     _add_evaluate_ray, _run_evaluate_ray),
    "explain": ("per-word attention picture of an image and a caption", _add_explain, _run_explain),
    "retrieve": ("text → images and image → captions over an evaluated gallery", _add_retrieve,
                 _run_retrieve),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N right after the module, before the command.
    launcher = [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]
    argv = [a for a in argv if a not in launcher]
    top = argparse.ArgumentParser(prog="scan", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Run `scan <command> --help` for the options of each command.")
    sub = top.add_subparsers(dest="command", metavar="command")
    for name, (help_text, _, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])  # prints help, or the error naming the allowed commands
        return 2
    name, rest = argv[0], argv[1:] + launcher
    help_text, add_arguments, run = COMMANDS[name]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dataio.storage import StorageError
    from scan.configfile import ConfigError

    p = argparse.ArgumentParser(prog=f"scan {name}", description=help_text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_intermixed_args(rest)
    from trainer.distributed import close_process_group

    ok = False
    try:
        code = run(args)
        ok = True
        return code
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:  # bad input: the message says it all
        print(f"scan {name}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a non-finite training loss, a collapsed model
        print(f"scan {name}: training stopped: {err}", file=sys.stderr)
        return 3
    except StorageError as err:  # the storage failed after every retry: not the data's fault
        print(f"scan {name}: {err}", file=sys.stderr)
        return 4
    finally:
        close_process_group(synchronise=ok)


if __name__ == "__main__":
    sys.exit(main())
