"""The SCAN training loop on DeepSpeed: cross-device hardest negatives, checkpoints, resume.

Run as ``scan train --config X.yaml [key=value ...] [--resume latest]`` in one process, or under
``deepspeed [--num_gpus N | --hostfile H ...] --module cluster.cli train ...`` or ``torchrun -m
cluster.cli train ...`` (the command adds the Prometheus exporter); the library entry is :func:`train`.

Negatives (``../shared/DESIGN.md`` §3): with ``loss.cross_device`` every rank gathers all ranks'
region and word embeddings, lengths and image ids, scores its local images × all captions and all
images × its local captions, and mines the hardest negatives over the global micro-batch. Under
gradient accumulation mining stays within each global micro-batch (never across accumulated
micro-batches). The per-rank loss is multiplied by the world size because DeepSpeed averages
gradients over ranks: the update then equals one process's on the concatenated global batch.

Batch size: ``data.global_batch_size`` (the paper's 128) fixes the captions mined together on any
number of ranks (each rank takes global / world); without it ``data.batch_size`` is per rank.

Where training stands (:class:`Position`) is saved in every checkpoint: the epoch, the optimizer
step and the epoch's segments (world size, captions consumed per rank), from which
``dataio.pipeline`` re-plans exactly the captions not yet seen, on any world size.
"""
from __future__ import annotations

import hashlib
import json
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
import torch.distributed as dist

from dataio import storage
from dataio.errors import SKIPS
from dataio.pipeline import CaptionBatch, CaptionLoader, caption_batches, iter_tokens, resolve_shards
from dataio.text import TextEncoder, Vocab, build_vocab, load_glove, load_hf_tokenizer
from trainer import checkpoint
from trainer.config import ExperimentConfig, LossConfig
from trainer.configfile import ConfigError, to_dict
from trainer.distributed import (DistEnv, all_gather_ints, all_reduce_sum, gather_padded,
                                 init_process_group, is_distributed, read_env)
from trainer.engine import Engine, build_engine, fp32_trainable_state
from trainer.loss import directional_hinge
from trainer.model import build_model, build_trained
from trainer.telemetry import JsonlRunLog, Telemetry
from trainer.xattn import XAttnConfig, xattn_scores

log = logging.getLogger(__name__)


def pair_scores(images: torch.Tensor, img_lens: torch.Tensor, captions: torch.Tensor,
                cap_lens: torch.Tensor, cfg: XAttnConfig, caption_chunk: int) -> torch.Tensor:
    """(N, M) SCAN scores, each tile recomputed in backward; ``caption_chunk`` > 0 bounds the
    captions per ``xattn_scores`` call (0: the scorer tiles by its memory budget alone)."""
    step = caption_chunk if caption_chunk > 0 else captions.shape[0]
    parts = [xattn_scores(images, captions[c:c + step], cap_lens[c:c + step], cfg, img_lens,
                          checkpoint=True) for c in range(0, captions.shape[0], step)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def batch_loss(img_emb: torch.Tensor, img_lens: torch.Tensor, cap_emb: torch.Tensor,
               cap_lens: torch.Tensor, image_ids: torch.Tensor, loss_cfg: LossConfig,
               xattn_cfg: XAttnConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss to back-propagate, and the loss summed over all ranks (detached, for logs).

    img_emb (B, k, d), cap_emb (B, n, d): pair i is (image of caption i, caption i); image_ids (B,).
    Ranks may hold different B, k and n.
    """
    B = img_emb.shape[0]
    ids = image_ids if loss_cfg.mask_same_image else None
    if loss_cfg.cross_device and is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = all_gather_ints([B, img_emb.shape[1], cap_emb.shape[1]], img_emb.device)  # (W, 3)
        counts = sizes[:, 0].tolist()
        k_max, n_max = int(sizes[:, 1].max()), int(sizes[:, 2].max())
        all_img = gather_padded(img_emb, counts, k_max)  # (G, k_max, d), G = Σ B_r
        all_cap = gather_padded(cap_emb, counts, n_max)  # (G, n_max, d)
        all_img_lens, all_cap_lens = gather_padded(img_lens, counts), gather_padded(cap_lens, counts)
        all_ids = gather_padded(image_ids, counts) if ids is not None else None
        positive = sum(counts[:rank]) + torch.arange(B, device=img_emb.device)  # our pairs in G
        rows = pair_scores(img_emb, img_lens, all_cap, all_cap_lens, xattn_cfg,
                           loss_cfg.caption_chunk)  # (B, G): local images × all captions
        cols = pair_scores(all_img, all_img_lens, cap_emb, cap_lens, xattn_cfg,
                           loss_cfg.caption_chunk)  # (G, B): all images × local captions
        loss = (directional_hinge(rows, positive, loss_cfg.margin, loss_cfg.max_violation, ids, all_ids)
                + directional_hinge(cols.t(), positive, loss_cfg.margin, loss_cfg.max_violation,
                                    ids, all_ids))
        # Gradients of every rank's loss reach this rank's embeddings through the gather's
        # backward; DeepSpeed then averages over ranks, which the factor `world` undoes.
        return loss * world, all_reduce_sum(loss)
    scores = pair_scores(img_emb, img_lens, cap_emb, cap_lens, xattn_cfg, loss_cfg.caption_chunk)
    diagonal = torch.arange(B, device=img_emb.device)
    loss = (directional_hinge(scores, diagonal, loss_cfg.margin, loss_cfg.max_violation, ids, ids)
            + directional_hinge(scores.t(), diagonal, loss_cfg.margin, loss_cfg.max_violation, ids, ids))
    return loss, all_reduce_sum(loss)


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
    path = Path(cfg.data.vocab) if cfg.data.vocab else run_dir / "vocab.json"
    if not cfg.data.vocab and env.is_main and not path.is_file():
        build_vocab(iter_tokens(cfg.data.train_shards)).save(str(path))
    if is_distributed():
        dist.barrier()
    if not path.is_file():
        raise FileNotFoundError(f"config key 'data.vocab': vocabulary file {str(path)!r} does not exist")
    vocab = Vocab.load(str(path))
    return vocab, len(vocab)


def per_rank_batch(cfg: ExperimentConfig, world: int) -> int:
    """Captions per rank per micro-batch: ``data.global_batch_size / world`` when that is set."""
    g = cfg.data.global_batch_size
    if not g:
        return cfg.data.batch_size
    if g % world:
        raise ConfigError(f"config key 'data.global_batch_size': {g} captions do not divide over "
                          f"{world} ranks; choose a multiple of {world} or another number of ranks")
    return g // world


def epoch_batches(cfg: ExperimentConfig, enc: TextEncoder, env: DistEnv, epoch: int,
                  segments: list[tuple[int, int]] = ()) -> CaptionLoader:
    """This rank's caption batches of what remains of ``epoch`` (the same count on every rank)."""
    d = cfg.data
    return caption_batches(d.train_shards, batch_size=d.batch_size, encode=enc, seed=cfg.train.seed,
                           epoch=epoch, rank=env.rank, world=env.world, num_workers=d.num_workers,
                           resampled=d.resampled, segments=segments, on_error=d.on_error,
                           caps_per_image=d.caps_per_image, max_words=d.max_words,
                           retry=storage.RetryPolicy(d.read_retries, d.read_backoff_s),
                           cache_dir=d.cache_dir)


def data_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides an epoch's caption order: a checkpoint taken mid-epoch can continue it only
    while these are unchanged (world size, batch size and workers may change)."""
    shards = resolve_shards(cfg.data.train_shards)
    digest = hashlib.blake2b(json.dumps([[storage.basename(s.url), list(s.caption_counts)]
                                          for s in shards]).encode(), digest_size=12).hexdigest()
    return {"data.train_shards": digest, "data.caps_per_image": cfg.data.caps_per_image,
            "data.resampled": cfg.data.resampled, "train.seed": cfg.train.seed}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _grad_norm(engine: Engine) -> float | None:
    """Global gradient norm before clipping: DeepSpeed's where its optimizer records it; with a plain
    optimizer (fp32, ZeRO 0) every rank holds the averaged gradients, so compute it here."""
    if engine.ds.zero_optimization_stage() > 0 or engine.ds.bfloat16_enabled() or engine.ds.fp16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.ds.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    samples: int = 0  # captions this rank consumed in `epoch` since `segments`, at world `world`
    step: int = 0  # optimizer steps done
    world: int = 1
    segments: list[list[int]] = field(default_factory=list)  # earlier runs of `epoch`: [world, captions per rank]

    def epoch_segments(self) -> list[tuple[int, int]]:
        """Every run of the current epoch so far, this one included (for the data plan)."""
        done = [(int(w), int(n)) for w, n in self.segments]
        return done + [(self.world, self.samples)] if self.samples else done

    def continued(self, world: int) -> "Position":
        """The position a run on ``world`` ranks continues from (its own segment starts empty)."""
        return Position(self.epoch, 0, self.step, world, [list(s) for s in self.epoch_segments()])


def _client_state(cfg: ExperimentConfig, pos: Position, vocab_path: str, enc: TextEncoder,
                  data: dict[str, Any]) -> dict[str, Any]:
    itos = enc.itos if isinstance(enc, Vocab) else None
    return {"scan_position": {**vars(pos), "segments": [list(s) for s in pos.segments]},
            "scan_config": to_dict(cfg), "scan_data": data,
            "scan_vocab": {"path": vocab_path, "itos": itos}}


def resumed_position(state: dict[str, Any], data: dict[str, Any], env: DistEnv) -> Position:
    """The checkpoint's position, continued on this run's world size; refuses a mid-epoch
    checkpoint whose epoch order this run's config would change (naming the keys)."""
    pos = Position(**state["scan_position"])
    if pos.epoch_segments():  # inside an epoch
        saved = state.get("scan_data", {})
        changed = {k: (saved.get(k), v) for k, v in data.items() if saved.get(k) != v}
        if changed:
            listed = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"--resume: the checkpoint is inside epoch {pos.epoch}, and this run would order "
                f"that epoch differently ({listed}). Set those keys back to the checkpoint's values, "
                f"or resume from a checkpoint taken at an epoch end (one is saved after every epoch)")
        if pos.world != env.world:
            log.info("resuming inside epoch %d on %d ranks (the checkpoint ran %d): the rest of the "
                     "epoch is re-planned over %d ranks, every caption still seen once", pos.epoch,
                     env.world, pos.world, env.world)
    return pos.continued(env.world)


def train(cfg: ExperimentConfig, *, resume: str | None = None, telemetry: Telemetry | None = None,
          local_rank: int | None = None) -> dict[str, Any]:
    """Trains ``cfg`` (optionally resuming ``latest`` or a tag); returns a summary of the run.

    ``telemetry`` receives every optimizer step and evaluation and is closed at the end; default:
    the JSON-lines run log ``<output_dir>/metrics.jsonl`` (written by rank 0).
    """
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: name the training manifest or shards")
    env = read_env(local_rank)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=per_rank_batch(cfg, env.world)))
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    telemetry = telemetry or JsonlRunLog(run_dir, rank=env.rank)
    try:
        init_process_group(env)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _log_batch(cfg, env.world)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        enc, vocab_size = text_encoder(cfg, env, run_dir)
        vocab_path = cfg.data.vocab or str(run_dir / "vocab.json")
        embeddings = (torch.from_numpy(load_glove(enc, cfg.model.glove, cfg.train.seed))
                      if cfg.model.glove and isinstance(enc, Vocab) else None)
        model = build_model(cfg.model, vocab_size, embeddings)
        engine = build_engine(cfg, model, env)
        seed_everything(cfg.train.seed + env.rank)  # per-rank streams from here on
        data = data_identity(cfg)
        pos = Position(world=env.world)
        if resume:
            state = checkpoint.load(engine.ds, ckpt_dir, resume, env)
            pos = resumed_position(state, data, env)
            saved_itos = state["scan_vocab"]["itos"]
            if isinstance(enc, Vocab) and saved_itos is not None and saved_itos != enc.itos:
                raise ValueError(f"--resume: vocabulary {vocab_path} differs from the checkpoint's")
        run = _Run(cfg, env, engine, enc, vocab_size, telemetry, ckpt_dir, vocab_path, data)
        pos = run.loop(pos)
    finally:
        telemetry.close()
    return {"steps": pos.step, "epoch": pos.epoch, "optimizer": engine.optimizer_name,
            "checkpoint": checkpoint.latest_tag(ckpt_dir), "world": env.world}


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


class NonFiniteLoss(FloatingPointError):
    def __init__(self, loss: float, keys: list[str]):
        self.loss, self.keys = loss, keys
        super().__init__(f"non-finite training loss {loss}")


@dataclass
class StepResult:
    loss: float  # summed over ranks: the loss of the global micro-batch
    stepped: bool  # an optimizer step was taken (the end of an accumulation window)
    grad_norm: float | None
    lr: float  # the lr this micro-batch's step applies


def forward_backward_step(engine: Engine, batch: CaptionBatch, cfg: ExperimentConfig,
                          device: torch.device, dtype: torch.dtype) -> float:
    """Forward through the engine, the cross-device hardest-negative loss, backward (gradients
    accumulate in the engine); returns the loss summed over ranks."""
    ds = engine.ds
    b = batch.to(device)
    img_emb, cap_emb = ds(b.regions.to(dtype), b.img_lens, b.tokens, b.cap_lens)
    loss, total = batch_loss(img_emb, b.img_lens, cap_emb, b.cap_lens, b.image_ids, cfg.loss, cfg.xattn)
    total_f = float(total)
    if not math.isfinite(total_f):  # the all-reduced value: every rank stops together
        raise NonFiniteLoss(total_f, batch.keys)
    ds.backward(loss)
    return total_f


def train_step(engine: Engine, batch: CaptionBatch, cfg: ExperimentConfig, device: torch.device,
               dtype: torch.dtype) -> StepResult:
    """One micro-batch: :func:`forward_backward_step`, then the optimizer step at the end of an
    accumulation window (DeepSpeed counts the micro-batches)."""
    ds = engine.ds
    total_f = forward_backward_step(engine, batch, cfg, device, dtype)
    grad_norm = _grad_norm(engine) if ds.is_gradient_accumulation_boundary() else None
    before, lr = ds.global_steps, float(ds.get_lr()[0])
    ds.step()
    stepped = ds.global_steps != before
    if stepped and grad_norm is None:
        grad_norm = _float(ds.get_global_grad_norm())
    return StepResult(total_f, stepped, grad_norm, lr)


@dataclass
class _Run:
    """A training run's fixed parts; :meth:`loop` runs the epochs."""

    cfg: ExperimentConfig
    env: DistEnv
    engine: Engine
    enc: TextEncoder
    vocab_size: int
    telemetry: Telemetry
    ckpt_dir: Path
    vocab_path: str
    data: dict[str, Any]

    def save(self, pos: Position) -> None:
        checkpoint.save(self.engine.ds, self.ckpt_dir, pos.step,
                        _client_state(self.cfg, pos, self.vocab_path, self.enc, self.data), self.env,
                        self.cfg.train.keep_checkpoints, lambda: fp32_trainable_state(self.engine.ds))

    def loop(self, pos: Position) -> Position:
        cfg, ds = self.cfg, self.engine.ds
        dtype = next(ds.module.parameters()).dtype
        window = _Window()
        save_at_boundary = False  # an epoch ended inside an accumulation window
        while pos.epoch < cfg.train.epochs:
            self.engine.scheduler.set_epoch(pos.epoch)
            # pos.samples is 0 here: a new epoch, or a resumed position (Position.continued)
            batches = epoch_batches(cfg, self.enc, self.env, pos.epoch, pos.epoch_segments())
            for batch in window.timed(batches):
                try:
                    result = train_step(self.engine, batch, cfg, self.env.device, dtype)
                except NonFiniteLoss as err:
                    raise FloatingPointError(
                        f"non-finite training loss {err.loss} at epoch {pos.epoch}, step {pos.step + 1} "
                        f"(batch keys {err.keys[:4]}...); check the features and lower optim.lr") from None
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
            if cfg.data.val_shards and pos.epoch % max(cfg.train.eval_every_epochs, 1) == 0:
                evaluate(cfg, self.engine, self.vocab_size, self.enc, pos.epoch - 1, self.telemetry,
                         self.ckpt_dir.parent)
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
            grad_norm=result.grad_norm, loss_scale=_loss_scale(self.engine.ds),
            skipped_samples=SKIPS.total(), memory_bytes=peak_memory_bytes(self.env.device))
        if self.env.is_main and pos.step % max(self.cfg.train.log_every, 1) == 0:
            log.info("epoch %d step %d loss %.4f lr %.3g %.1f samples/s", pos.epoch, pos.step, loss,
                     result.lr, window.samples / step_time)


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


def evaluate(cfg: ExperimentConfig, engine: Engine, vocab_size: int, enc: TextEncoder, epoch: int,
             telemetry: Telemetry, run_dir: Path) -> None:
    """Validation on every rank: the first ``eval.val_images`` images of ``data.val_shards``
    (the reference's 1,000 images / 5,000 captions), encoded by an fp32 model holding the
    trained (master) weights; recalls go to the telemetry."""
    from trainer.sharded_eval import evaluate_split

    model = build_trained(cfg.model, vocab_size, fp32_trainable_state(engine.ds)).to(engine.ds.device)
    result = evaluate_split(model, cfg, cfg.data.val_shards, encode_text=enc.encode,
                            out_dir=run_dir / "eval" / f"epoch{epoch:03d}",
                            max_images=cfg.eval.val_images, protocol="split")
    telemetry.observe_eval(epoch=epoch, metrics=result.metrics)
    log.info("epoch %d validation (%s, first %d images of %s): rsum %.2f", epoch, cfg.eval.precision,
             len(result.i2t_ranks), cfg.data.val_shards, result.metrics["rsum"])


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _loss_scale(ds: Any) -> float | None:
    """The dynamic fp16 loss scale (ZeRO optimizers keep it in ``loss_scale_config``)."""
    if not ds.fp16_enabled():
        return None
    holder = getattr(ds.optimizer, "loss_scale_config", ds.optimizer)
    return _float(getattr(holder, "cur_scale", None))
