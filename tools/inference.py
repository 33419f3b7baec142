"""Trained runs at inference: load one, evaluate one or an ensemble, build a retrieval gallery.

A run folder holds ``checkpoints/<tag>/mp_rank_00_model_states.pt`` (DeepSpeed's model states, with
the experiment config and vocabulary in its client state) and ``model_fp32.pt`` (the trained
weights in fp32: the optimizer's master weights, which bf16 training keeps apart from the rounded
bf16 module). Nothing is unpickled: files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dataio import storage
from dataio.pipeline import image_records, resolve_shards
from dataio.shards import ImageSample, manifest_url
from dataio.text import TextEncoder, Vocab, load_hf_tokenizer
from scan import configfile
from trainer import checkpoint, checkpoint_s3
from scan.builders import scorer_for
from scan.config import EvalConfig, ExperimentConfig
from scan.configfile import ConfigError
from trainer.distributed import init_process_group, read_env
from scan.eval.encode import encode_split
from scan.features.backbone_top import check_split_cut
from scan.model import SCANModel, build_model, build_trained
from tools.retrieve import Gallery, build_gallery
from scan.eval.sharded import evaluate_and_write
from scan.eval.tiles import EvalResult, Member, protocol_folds
from trainer import preflight

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class TrainedRun:
    cfg: ExperimentConfig
    model: SCANModel  # float32, eval mode
    text: TextEncoder
    checkpoint: Path


def checkpoint_path(run_dir: str | Path, tag: str = "latest") -> Path:
    """The model-states file of checkpoint ``tag`` (``latest`` or ``stepNNNNNNNN``) of a run; a run in
    object storage (``s3://...``) is first downloaded (those two files) into a temporary folder."""
    if storage.is_s3(str(run_dir)):
        return _fetched(str(run_dir), tag)
    ckpt_dir = Path(run_dir) / "checkpoints"
    name = checkpoint.latest_tag(ckpt_dir) if tag == checkpoint.LATEST else tag
    if name is None:
        raise FileNotFoundError(f"run {run_dir}: no complete checkpoint under {ckpt_dir}")
    path = ckpt_dir / name / MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(f"run {run_dir}: checkpoint {name} has no {MODEL_STATES} "
                                f"(available: {checkpoint.complete_tags(ckpt_dir) or 'none'})")
    return path


def _fetched(run_url: str, tag: str) -> Path:
    ckpt_url = storage.join(run_url, "checkpoints")
    name = checkpoint_s3.latest_tag(ckpt_url) if tag == checkpoint.LATEST else tag
    if name is None:
        raise FileNotFoundError(f"run {run_url}: no complete checkpoint under {ckpt_url}")
    local = checkpoint_s3.fetch(ckpt_url, name, Path(tempfile.mkdtemp(prefix="scan-run-")),
                                only=lambda rel: rel in (MODEL_STATES, checkpoint.FP32_WEIGHTS))
    return local / MODEL_STATES


def load_run(run_dir: str | Path, tag: str = "latest", device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuilds the model of a training run from its checkpoint, ready to encode."""
    path = checkpoint_path(run_dir, tag)
    states = checkpoint.safe_load(path)
    for key in ("module", "scan_config", "scan_vocab"):
        if key not in states:
            raise ValueError(f"{path}: not a SCAN training checkpoint (no '{key}')")
    cfg = configfile.from_dict(ExperimentConfig, states["scan_config"])
    if cfg.model.text_encoder == "hf":
        text: TextEncoder = load_hf_tokenizer(cfg.model.hf_path)
        vocab_size = len(text.tok)
    else:
        text = Vocab(states["scan_vocab"]["itos"][4:])  # itos starts with the 4 specials
        vocab_size = len(text)
    fp32 = path.with_name(checkpoint.FP32_WEIGHTS)
    if fp32.is_file():
        model = build_trained(cfg.model, vocab_size, checkpoint.safe_load(fp32))
    else:  # a checkpoint of an earlier version: the module's own (possibly bf16-rounded) weights
        log.warning("%s has no %s: using the module states, upcast to fp32", path.parent, fp32.name)
        model = build_model(cfg.model, vocab_size)
        model.load_state_dict({k: v.float() for k, v in states["module"].items()})
    model.to(device).eval()
    log.info("loaded %s (%s, %d-word text encoder)", path.parent, scorer_for(cfg).describe(), vocab_size)
    return TrainedRun(cfg, model, text, path)


def check_shards_for(run: TrainedRun, spec: str, key: str = "--shards") -> None:
    """Refuse, naming both, a split whose shards hold another cut (or backbone) than the one
    ``run``'s model was trained on (``model.image.finetune_blocks``; 0: final features)."""
    check_split_cut(spec, run.cfg.model.image, key)


def find_record(spec: str, key: str | None = None, run: TrainedRun | None = None) -> ImageSample:
    """The image ``key`` of a split (the first image when ``key`` is None), checked against
    ``run``'s model when given (`check_shards_for`)."""
    if run is not None:
        check_shards_for(run, spec)
    for record in image_records(spec):
        if key is None or record.key == key:
            return record
    raise KeyError(f"image key {key!r} is not in {spec}")


def evaluate_runs(run_dirs: Sequence[str], spec: str, *, tag: str = "latest",
                  overrides: Sequence[str] = (), out_dir: str | None = None,
                  local_rank: int | None = None) -> EvalResult:
    """Sharded evaluation of one run, or of the ensemble of several (their score matrices averaged),
    on the split ``spec``, under whatever launcher started this process. Every rank returns the result.

    ``overrides`` (``eval.protocol=coco1k`` ...) apply to every run's config; the first run's
    eval section decides the protocol and tiling.
    """
    env = read_env(local_rank)
    if env.world > 1:
        init_process_group(env)
    members = []
    eval_cfg = None
    for run_dir in run_dirs:
        run = load_run(run_dir, tag, env.device)
        check_shards_for(run, spec)
        cfg = configfile.from_dict(ExperimentConfig, _overridden(run.cfg, overrides))
        if eval_cfg is None:  # the first run's eval settings decide: checked before any encoding
            check_evaluation(cfg.eval, spec, out_dir)
        eval_cfg = eval_cfg or cfg.eval
        emb = encode_split(run.model, spec, encode_text=run.text.encode,
                           caps_per_image=cfg.eval.caps_per_image, precision=cfg.eval.precision,
                           batch_size=cfg.data.batch_size, device=env.device, rank=env.rank,
                           world=env.world, on_error=cfg.data.on_error)
        members.append(Member(emb.to(env.device), scorer_for(cfg)))
    return evaluate_and_write(members, eval_cfg, rank=env.rank, world=env.world, out_dir=out_dir)


def check_evaluation(ev: EvalConfig, spec: str, out_dir: str | None) -> None:
    """What an evaluation needs that encoding would only find out later: an output folder (``--out``)
    for ``eval.save_sims`` / ``eval.topk``, writable, and a split of the size ``eval.protocol``
    expects (f30k1k: 1,000 images, coco1k / coco5k: 5,000), counted in its manifest."""
    for key, value in (("eval.save_sims", ev.save_sims), ("eval.topk", ev.topk)):
        if value and not out_dir:
            raise ConfigError(f"config key '{key}': {value!r} writes files: give an output folder with "
                              f"--out DIR (or set {key}={'false' if key == 'eval.save_sims' else 0})")
    if out_dir:
        preflight.check_writable("--out", Path(out_dir))
    images = sum(s.samples for s in resolve_shards(spec))
    try:
        protocol_folds(ev.protocol, images)
    except ValueError as err:
        raise ConfigError(f"config key 'eval.protocol': {ev.protocol!r} does not fit --shards {spec} "
                          f"({images} images in {manifest_url(spec) if not spec.endswith('.tar') else spec}): "
                          f"{err}") from None


def gallery_for_runs(run_dirs: Sequence[str], spec: str, *, tag: str = "latest") -> Gallery:
    """A retrieval gallery of the split ``spec`` scored by one run or an ensemble of runs."""
    runs = [load_run(run_dir, tag) for run_dir in run_dirs]
    for run in runs:
        check_shards_for(run, spec)
    first = runs[0]
    return build_gallery([(r.model, scorer_for(r.cfg)) for r in runs], image_records(spec),
                         encode_text=first.text.encode, caps_per_image=first.cfg.eval.caps_per_image,
                         precision=first.cfg.eval.precision,
                         memory_budget_mb=first.cfg.eval.memory_budget_mb)


def _overridden(cfg: ExperimentConfig, overrides: Sequence[str]) -> dict:
    data = configfile.to_dict(cfg)
    for override in overrides:
        configfile.apply_override(data, override)
    return data
