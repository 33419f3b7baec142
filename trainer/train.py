"""The SCAN training loop on DeepSpeed: cross-device hardest negatives, checkpoints, resume.

Run as ``scan train --config X.yaml [key=value ...] [--resume latest]`` in one process, or under
``deepspeed [--num_gpus N | --hostfile H ...] --module app.cli train ...`` or ``torchrun -m
app.cli train ...`` (the command adds the Prometheus exporter); the library entry is :func:`train`.

Negatives: the loss is a ``scan.loss.TrainingLoss`` built once from the config
(``scan.builders.loss_for``); its ``batch_loss`` (docs/DESIGN.md §3) gathers the ranks'
embeddings itself and mines the hardest negatives over the global micro-batch. Under gradient
accumulation mining stays within each global micro-batch (never across accumulated micro-batches).

One optimizer step is ``trainer.step.train_step`` (``forward_backward_step`` per micro-batch, then
the engine's step at the end of an accumulation window); ``_Run.loop`` only walks the epochs and
batches, saving and validating at their ends.

Batch size: ``data.global_batch_size`` (the paper's 128) fixes the captions mined together on any
number of ranks (each rank takes global / world); without it ``data.batch_size`` is per rank.

Where training stands (``trainer.position.Position``) is saved in every checkpoint; a resumed run
re-plans exactly the captions of the epoch not yet seen, on any world size.
"""
from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from dataio import storage
from dataio.errors import SKIPS
from dataio.pipeline import (CaptionBatch, CaptionLoader, LoaderSpec, encode_caption, iter_captions,
                             iter_tokens)
from dataio.text import TextEncoder, Vocab, build_vocab, load_glove, load_hf_tokenizer, local_model_dir
from scan.collectives import barrier
from scan.builders import loss_for
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from scan.eval.sharded import encode_and_evaluate
from scan.eval.tiles import NonFiniteScores
from scan.features.backbone_top import image_config_for_training, pixel_augment
from scan.loss import TrainingLoss
from scan.model import build_model, build_trained
from scan.text_features import precompute
from trainer import outputs, preflight
from trainer.collapse import CollapseGuard
from trainer.distributed import DistEnv, init_process_group, read_env
from trainer.engine import Engine, build_engine, fp32_trainable_state
from trainer.position import Position, client_state, data_identity, resumed_position
from trainer.step import NonFiniteLoss, StepResult, loss_scale, train_step
from trainer.telemetry import JsonlRunLog, Telemetry

log = logging.getLogger(__name__)


def text_encoder(cfg: ExperimentConfig, env: DistEnv, run_dir: Path) -> tuple[TextEncoder, int]:
    """The caption encoder and the vocabulary size for the model.

    GRU models use a word vocabulary: ``data.vocab`` when given, else the run's own
    ``<output_dir>/vocab.json`` (so a resumed run keeps its vocabulary), else one built by rank 0
    from the training shards' tokens and saved there before the other ranks read it.
    Transformers encoders keep a copy of their tokenizer in ``<output_dir>/tokenizer/``.
    """
    if cfg.model.text_encoder == "hf":
        tok = load_hf_tokenizer(cfg.model.hf_path)
        if env.is_main:
            tok.tok.save_pretrained(str(run_dir / "tokenizer"))
        return tok, len(tok.tok)
    path = cfg.data.vocab or outputs.shared(cfg, "vocab.json")  # every rank reads it: in object storage too
    if not cfg.data.vocab and env.is_main and not storage.exists(path):
        build_vocab(iter_tokens(cfg.data.train_shards, cfg.data.on_error)).save(path)
    barrier()
    if not storage.exists(path):
        raise FileNotFoundError(f"config key 'data.vocab': vocabulary file {path!r} does not exist")
    vocab = Vocab.load(path)
    return vocab, len(vocab)


def precompute_text_features(cfg: ExperimentConfig, enc: TextEncoder, env: DistEnv, run_dir: Path) -> None:
    """A frozen transformers encoder's token features of every training caption and of the
    validated ones, computed once before the first step (``scan.text_features``): rank 0 computes
    what ``model.hf_feature_cache`` lacks and writes it, the other ranks then read the file."""
    if cfg.model.text_encoder != "hf" or not cfg.model.hf_freeze:
        return
    folder = cfg.model.hf_feature_cache or str(run_dir / "text_features")
    model_dir = local_model_dir(cfg.model.hf_path)

    def id_lists():
        splits = [(cfg.data.train_shards, 0)]
        if cfg.data.val_shards:
            splits.append((cfg.data.val_shards, cfg.eval.val_images))
        for spec, limit in splits:
            for tokens, raw in iter_captions(spec, limit, cfg.data.on_error):
                yield encode_caption(enc, tokens, raw, cfg.data.max_words)

    if env.is_main:
        t0 = time.perf_counter()
        feats = precompute(model_dir, id_lists(), folder, device=env.device,
                           trained_top_layers=cfg.model.hf_finetune_layers)
        log.info("frozen text features of %d captions ready in %.1f s", len(feats), time.perf_counter() - t0)
    barrier()
    if not env.is_main:
        precompute(model_dir, id_lists(), folder, progress=False, device=env.device,
                   trained_top_layers=cfg.model.hf_finetune_layers)


def prepare_text_features(cfg: ExperimentConfig) -> None:
    """``cfg``'s frozen text features computed now, in this one process, into
    ``model.hf_feature_cache``: trainings started afterwards (``scan demo`` runs several at once)
    then read one cache instead of each computing it. Nothing to do for other text encoders."""
    if cfg.model.text_encoder != "hf" or not cfg.model.hf_freeze:
        return
    env = read_env(None)
    run_dir = outputs.local_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    enc, _ = text_encoder(cfg, env, run_dir)
    precompute_text_features(cfg, enc, env, run_dir)


def per_rank_batch(cfg: ExperimentConfig, world: int) -> int:
    """Captions per rank per micro-batch: ``data.global_batch_size / world`` when that is set."""
    g = cfg.data.global_batch_size
    if not g:
        return cfg.data.batch_size
    if g % world:
        raise ConfigError(f"config key 'data.global_batch_size': {g} captions do not divide over "
                          f"{world} ranks; choose a multiple of {world} or another number of ranks")
    return g // world


def loader_spec(cfg: ExperimentConfig, enc: TextEncoder | None, rank: int, world: int) -> LoaderSpec:
    """The training loader of ``cfg`` (``data.*``, ``train.seed``) for ``rank`` of ``world``: the one
    place the config's data keys become a loader (``enc``: None when only planning)."""
    d = cfg.data
    return LoaderSpec(d.train_shards, batch_size=d.batch_size, encode=enc, seed=cfg.train.seed,
                      rank=rank, world=world, num_workers=d.num_workers, resampled=d.resampled,
                      on_error=d.on_error, caps_per_image=d.caps_per_image, max_words=d.max_words,
                      retry=storage.RetryPolicy(d.read_retries, d.read_backoff_s),
                      cache_dir=d.cache_dir, augment=pixel_augment(cfg))


def epoch_batches(cfg: ExperimentConfig, enc: TextEncoder, env: DistEnv, epoch: int,
                  segments: list[tuple[int, int]] = ()) -> CaptionLoader:
    """This rank's caption batches of what remains of ``epoch`` (the same count on every rank)."""
    return loader_spec(cfg, enc, env.rank, env.world).batches(epoch, segments)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(cfg: ExperimentConfig, *, resume: str | None = None, telemetry: Telemetry | None = None,
          local_rank: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Trains ``cfg`` (optionally resuming ``latest`` or a tag); returns a summary of the run.

    The inputs are checked first (``trainer.preflight``: shards, ``model.img_dim``, set from the
    manifest when 0, the output folder); a folder holding another run is refused unless resumed
    or replaced (``overwrite``: its checkpoints and logs are deleted). ``telemetry`` receives every
    optimizer step and evaluation and is closed at the end; default: the JSON-lines run log
    ``<output_dir>/metrics.jsonl`` (written by rank 0).
    """
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: name the training manifest or shards")
    env = read_env(local_rank)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=per_rank_batch(cfg, env.world)))
    run_dir = outputs.local_dir(cfg)  # this host's folder (train.output_dir unless in object storage)
    if resume and env.is_main:
        outputs.fetch_log(cfg)
    telemetry = telemetry or JsonlRunLog(run_dir, rank=env.rank)
    try:
        cfg = preflight.check_inputs(cfg)  # before any process group, model or data worker
        cfg = image_config_for_training(cfg)  # the shards' cut and backbone (model.image)
        if outputs.remote(cfg):
            outputs.claim_remote(cfg, resume=resume, overwrite=overwrite, main=env.is_main)
        else:
            preflight.claim_output_dir(run_dir, resume=resume, overwrite=overwrite)
        init_process_group(env)
        if env.is_main:
            if overwrite:
                preflight.clear_previous_run(run_dir, keep=cfg.data.vocab)
            run_dir.mkdir(parents=True, exist_ok=True)
            _log_batch(cfg, env.world)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        enc, vocab_size = text_encoder(cfg, env, run_dir)
        precompute_text_features(cfg, enc, env, run_dir)
        vocab_path = cfg.data.vocab or outputs.shared(cfg, "vocab.json")
        embeddings = (torch.from_numpy(load_glove(enc, cfg.model.glove, cfg.train.seed))
                      if cfg.model.glove and isinstance(enc, Vocab) else None)
        model = build_model(cfg.model, vocab_size, embeddings)
        engine = build_engine(cfg, model, env)
        seed_everything(cfg.train.seed + env.rank)  # per-rank streams from here on
        data = data_identity(cfg)
        pos = Position(world=env.world)
        if resume:
            state = outputs.load(cfg, engine.ds, resume, env)
            pos = resumed_position(state, data, env)
            if env.is_main:  # each step logged once: the replayed ones are dropped before
                preflight.trim_run_logs(run_dir, pos.step, pos.epoch)
            saved_itos = state["scan_vocab"]["itos"]
            if isinstance(enc, Vocab) and saved_itos is not None and saved_itos != enc.itos:
                raise ValueError(f"--resume: vocabulary {vocab_path} differs from the checkpoint's")
        loss_fn = loss_for(cfg)  # the run's loss, built once: scorer, margin, negatives, dropout
        run = _Run(cfg, env, engine, enc, vocab_size, telemetry, run_dir, vocab_path, data, loss_fn)
        pos = run.loop(pos)
    finally:
        telemetry.close()
    if env.is_main:
        outputs.publish_log(cfg)
    return {"steps": pos.step, "epoch": pos.epoch, "optimizer": engine.optimizer_name,
            "checkpoint": outputs.latest_tag(cfg), "world": env.world}


def _log_batch(cfg: ExperimentConfig, world: int) -> None:
    d, gas = cfg.data, cfg.train.grad_accum
    total = d.batch_size * world
    mined = total if cfg.loss.cross_device else d.batch_size
    if d.global_batch_size:
        log.info("batch: global %d captions = %d rank(s) x %d (data.global_batch_size); hardest "
                 "negatives mined among %d", total, world, d.batch_size, mined)
    else:
        log.info("batch: %d captions per rank (data.batch_size) x %d rank(s) = global %d; hardest "
                 "negatives mined among %d (data.global_batch_size fixes the global batch on any "
                 "number of ranks)", d.batch_size, world, total, mined)
    if gas > 1:
        log.info("accumulation: %d micro-batches per optimizer step (negatives mined within each)", gas)


@dataclass
class _Run:
    """A training run's fixed parts; :meth:`loop` runs the epochs."""

    cfg: ExperimentConfig
    env: DistEnv
    engine: Engine
    enc: TextEncoder
    vocab_size: int
    telemetry: Telemetry
    run_dir: Path  # this host's folder of the run
    vocab_path: str
    data: dict[str, Any]
    loss_fn: TrainingLoss  # what every micro-batch's step calls
    guard: CollapseGuard = field(init=False)

    def __post_init__(self) -> None:
        self.guard = CollapseGuard(self.loss_fn, steps=self.cfg.train.collapse_steps,
                                   on_collapse=self.cfg.train.on_collapse, telemetry=self.telemetry)

    def save(self, pos: Position) -> None:
        outputs.save(self.cfg, self.engine.ds, pos.step,
                     client_state(self.cfg, pos, self.vocab_path, self.enc, self.data), self.env,
                     lambda: fp32_trainable_state(self.engine.ds))

    def loop(self, pos: Position) -> Position:
        cfg, ds = self.cfg, self.engine.ds
        dtype = next(ds.module.parameters()).dtype
        window = _Window()
        save_at_boundary = False  # an epoch ended inside an accumulation window
        while pos.epoch < cfg.train.epochs:
            self.engine.scheduler.set_epoch(pos.epoch)
            # pos.samples is 0 here: a new epoch, or a resumed position (Position.continued)
            batches = epoch_batches(cfg, self.enc, self.env, pos.epoch, pos.epoch_segments())
            for batch in _progress(window.timed(batches), len(batches), pos.epoch, self.env.is_main):
                try:
                    result = train_step(self.engine, batch, self.loss_fn, self.env.device, dtype, pos.epoch)
                except NonFiniteLoss as err:
                    raise FloatingPointError(
                        f"non-finite training loss {err.loss} at epoch {pos.epoch}, step {pos.step + 1} "
                        f"(batch keys {err.keys[:4]}...); check the features and lower optim.lr") from None
                self.guard.observe_loss(result.loss, batch.image_ids, step=ds.global_steps, epoch=pos.epoch)
                window.add(result.loss, len(batch))
                pos.samples += len(batch)
                if not result.stepped:
                    continue  # accumulating: no optimizer step yet
                pos.step = ds.global_steps
                self._observe(pos, window, result)
                saved = bool(cfg.train.ckpt_every_steps) and pos.step % cfg.train.ckpt_every_steps == 0
                if saved or save_at_boundary:
                    self.save(pos)
                    saved, save_at_boundary = True, False
                if cfg.train.max_steps and pos.step >= cfg.train.max_steps:
                    if not saved:
                        self.save(pos)
                    return pos
                window.reset()
            pos.epoch, pos.samples, pos.segments = pos.epoch + 1, 0, []
            if window.samples:  # the window's gradients carry over into the next epoch's first step
                log.info("epoch %d ended inside an accumulation window: its checkpoint follows the "
                         "next optimizer step", pos.epoch - 1)
                save_at_boundary = True
            else:
                self.save(pos)
            if cfg.data.val_shards and _validates_after(cfg, pos.epoch):
                validate(cfg, self.engine, self.vocab_size, self.enc, pos.epoch - 1, self.telemetry,
                         self.run_dir, self.guard, pos.step)
        if save_at_boundary:  # the last epoch ended inside a window: no step will complete it
            log.warning("the last %d captions of the final epoch did not reach an optimizer step "
                        "(train.grad_accum=%d); saving the final weights without them",
                        window.samples, cfg.train.grad_accum)
            self.save(pos)
        return pos

    def _observe(self, pos: Position, window: "_Window", result: StepResult) -> None:
        step_time = window.elapsed()
        loss = window.loss_sum / self.cfg.train.grad_accum
        self.telemetry.observe_step(
            step=pos.step, epoch=pos.epoch, loss=loss, samples_per_s=window.samples / step_time,
            step_time_s=step_time, data_wait_s=window.data_wait, lr=result.lr,
            grad_norm=result.grad_norm, loss_scale=loss_scale(self.engine.ds),
            skipped_samples=SKIPS.total(), memory_bytes=peak_memory_bytes(self.env.device))
        if self.env.is_main and pos.step % max(self.cfg.train.log_every, 1) == 0:
            log.info("epoch %d step %d loss %.4f lr %.3g %.1f samples/s", pos.epoch, pos.step, loss,
                     result.lr, window.samples / step_time)


def _validates_after(cfg: ExperimentConfig, epochs_done: int) -> bool:
    """Validation after every ``train.eval_every_epochs``-th epoch and always after the last one
    (0: only after the last)."""
    every = cfg.train.eval_every_epochs
    return epochs_done == cfg.train.epochs or (every > 0 and epochs_done % every == 0)


def _progress(batches: Iterator[CaptionBatch], total: int, epoch: int, show: bool) -> Iterator[CaptionBatch]:
    """The batches, with a progress bar and its ETA on the main rank."""
    bar = tqdm(total=total, desc=f"epoch {epoch}", unit="batch", disable=not show, mininterval=2.0,
               leave=False, dynamic_ncols=True)
    try:
        for batch in batches:
            yield batch
            bar.update(1)
    finally:
        bar.close()


class _Window:
    """Time, data wait, loss and captions of the current optimizer step's micro-batches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.data_wait, self.loss_sum, self.samples = time.perf_counter(), 0.0, 0.0, 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.samples += samples

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def timed(self, batches: CaptionLoader) -> Iterator[CaptionBatch]:
        """The batches, with the time spent waiting for each added to ``data_wait``."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.data_wait += time.perf_counter() - t0
            if batch is None:
                return
            yield batch


def validate(cfg: ExperimentConfig, engine: Engine, vocab_size: int, enc: TextEncoder, epoch: int,
             telemetry: Telemetry, run_dir: Path, guard: CollapseGuard, step: int) -> None:
    """Validation on every rank: the first ``eval.val_images`` images of ``data.val_shards``
    (the reference's 1,000 images / 5,000 captions), encoded by an fp32 model holding the
    trained (master) weights; recalls go to the telemetry. Constant or non-finite scores are a
    collapse (``guard``): marked in the metrics (``collapsed``: 1), then reported."""
    model = build_trained(cfg.model, vocab_size, fp32_trainable_state(engine.ds)).to(engine.ds.device)
    try:
        result = encode_and_evaluate(model, cfg, cfg.data.val_shards, encode_text=enc.encode,
                                     out_dir=run_dir / "eval" / f"epoch{epoch:03d}",
                                     max_images=cfg.eval.val_images, protocol="split")
    except NonFiniteScores as err:
        if (what := guard.scores_collapsed(math.nan, math.nan)) is None:  # checks off
            raise
        log.error("epoch %d validation: %s", epoch, err)
        guard.report(what, step=step, epoch=epoch)
        return
    collapsed = guard.scores_collapsed(*result.score_range)
    metrics = {**result.metrics, "collapsed": 1} if collapsed else result.metrics
    telemetry.observe_eval(epoch=epoch, metrics=metrics)
    ties = result.metrics["ties"]
    log.info("epoch %d validation (%s, first %d images of %s): rsum %.2f (queries with a tied "
             "competitor: %d i2t, %d t2i)", epoch, cfg.eval.precision, len(result.i2t_ranks),
             cfg.data.val_shards, result.metrics["rsum"], ties["i2t"], ties["t2i"])
    if collapsed:
        guard.report(collapsed, step=step, epoch=epoch)

