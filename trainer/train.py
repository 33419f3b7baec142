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
"""
from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dataio.errors import SKIPS
from dataio.pipeline import CaptionLoader, caption_batches, iter_tokens
from dataio.text import TextEncoder, Vocab, build_vocab, load_glove, load_hf_tokenizer
from trainer import checkpoint
from trainer.config import ExperimentConfig, LossConfig
from trainer.configfile import ConfigError, to_dict
from trainer.distributed import (DistEnv, all_gather_ints, all_reduce_sum, gather_padded,
                                 init_process_group, is_distributed, read_env)
from trainer.engine import Engine, build_engine
from trainer.loss import directional_hinge
from trainer.model import build_model
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


def epoch_batches(cfg: ExperimentConfig, enc: TextEncoder, env: DistEnv, epoch: int,
                  start_sample: int = 0) -> CaptionLoader:
    """This rank's caption batches of ``epoch`` (the same count on every rank)."""
    d = cfg.data
    return caption_batches(d.train_shards, batch_size=d.batch_size, encode=enc, seed=cfg.train.seed,
                           epoch=epoch, rank=env.rank, world=env.world, num_workers=d.num_workers,
                           shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                           start_sample=start_sample, on_error=d.on_error,
                           caps_per_image=d.caps_per_image, max_words=d.max_words)


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
    samples: int = 0  # captions this rank consumed in `epoch`
    step: int = 0  # optimizer steps done


def _client_state(cfg: ExperimentConfig, pos: Position, vocab_path: str, enc: TextEncoder) -> dict[str, Any]:
    itos = enc.itos if isinstance(enc, Vocab) else None
    return {"scan_position": vars(pos).copy(), "scan_config": to_dict(cfg),
            "scan_vocab": {"path": vocab_path, "itos": itos}}


def train(cfg: ExperimentConfig, *, resume: str | None = None, telemetry: Telemetry | None = None,
          local_rank: int | None = None) -> dict[str, Any]:
    """Trains ``cfg`` (optionally resuming ``latest`` or a tag); returns a summary of the run.

    ``telemetry`` receives every optimizer step and evaluation and is closed at the end; default:
    the JSON-lines run log ``<output_dir>/metrics.jsonl`` (written by rank 0).
    """
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: name the training manifest or shards")
    env = read_env(local_rank)
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    telemetry = telemetry or JsonlRunLog(run_dir, rank=env.rank)
    try:
        init_process_group(env)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        enc, vocab_size = text_encoder(cfg, env, run_dir)
        vocab_path = cfg.data.vocab or str(run_dir / "vocab.json")
        embeddings = (torch.from_numpy(load_glove(enc, cfg.model.glove, cfg.train.seed))
                      if cfg.model.glove and isinstance(enc, Vocab) else None)
        model = build_model(cfg.model, vocab_size, embeddings)
        steps = max(1, len(epoch_batches(cfg, enc, env, 0)) // cfg.train.grad_accum)
        engine = build_engine(cfg, model, env, steps)
        seed_everything(cfg.train.seed + env.rank)  # per-rank streams from here on
        pos = Position()
        if resume:
            state = checkpoint.load(engine.ds, ckpt_dir, resume, env)
            pos = Position(**state["scan_position"])
            saved_itos = state["scan_vocab"]["itos"]
            if isinstance(enc, Vocab) and saved_itos is not None and saved_itos != enc.itos:
                raise ValueError(f"--resume: vocabulary {vocab_path} differs from the checkpoint's")
        pos = _loop(cfg, env, engine, enc, pos, telemetry, ckpt_dir, vocab_path)
    finally:
        telemetry.close()
    return {"steps": pos.step, "epoch": pos.epoch, "optimizer": engine.optimizer_name,
            "checkpoint": checkpoint.latest_tag(ckpt_dir), "world": env.world}


def _loop(cfg: ExperimentConfig, env: DistEnv, engine: Engine, enc: TextEncoder, pos: Position,
          telemetry: Telemetry, ckpt_dir: Path, vocab_path: str) -> Position:
    ds = engine.ds
    dtype = next(ds.module.parameters()).dtype
    gas = cfg.train.grad_accum

    def save() -> None:
        checkpoint.save(ds, ckpt_dir, pos.step, _client_state(cfg, pos, vocab_path, enc), env,
                        cfg.train.keep_checkpoints)

    while pos.epoch < cfg.train.epochs:
        batches = epoch_batches(cfg, enc, env, pos.epoch, pos.samples)
        step_start, data_wait, loss_sum, samples = time.perf_counter(), 0.0, 0.0, 0
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            data_wait += time.perf_counter() - t0
            if batch is None:
                break
            regions = batch.regions.to(env.device, dtype)
            img_lens, cap_lens = batch.img_lens.to(env.device), batch.cap_lens.to(env.device)
            img_emb = ds.module.encode_images(regions, img_lens)
            cap_emb = ds.module.encode_captions(batch.tokens.to(env.device), cap_lens)
            loss, total = batch_loss(img_emb, img_lens, cap_emb, cap_lens,
                                     batch.image_ids.to(env.device), cfg.loss, cfg.xattn)
            if not math.isfinite(float(total)):  # the all-reduced value: every rank stops together
                raise FloatingPointError(
                    f"non-finite training loss {float(total)} at epoch {pos.epoch}, step {pos.step + 1} "
                    f"(batch keys {batch.keys[:4]}...); check the features and lower optim.lr")
            ds.backward(loss)
            grad_norm = _grad_norm(engine) if ds.is_gradient_accumulation_boundary() else None
            before, lr = ds.global_steps, float(ds.get_lr()[0])  # the lr this step applies
            ds.step()
            loss_sum += float(total)
            samples += len(batch.keys)
            pos.samples += len(batch.keys)
            if ds.global_steps == before:
                continue  # accumulating: no optimizer step yet
            pos.step = ds.global_steps
            step_time = time.perf_counter() - step_start
            telemetry.observe_step(
                step=pos.step, epoch=pos.epoch, loss=loss_sum / gas, samples_per_s=samples / step_time,
                step_time_s=step_time, data_wait_s=data_wait, lr=lr,
                grad_norm=grad_norm if grad_norm is not None else _float(ds.get_global_grad_norm()),
                loss_scale=_loss_scale(ds),
                skipped_samples=SKIPS.total(), memory_bytes=peak_memory_bytes(env.device))
            if env.is_main and pos.step % max(cfg.train.log_every, 1) == 0:
                log.info("epoch %d step %d loss %.4f lr %.3g %.1f samples/s", pos.epoch, pos.step,
                         loss_sum / gas, lr, samples / step_time)
            saved = bool(cfg.train.ckpt_every_steps) and pos.step % cfg.train.ckpt_every_steps == 0
            if saved:
                save()
            if cfg.train.max_steps and pos.step >= cfg.train.max_steps:
                if not saved:
                    save()
                return pos
            step_start, data_wait, loss_sum, samples = time.perf_counter(), 0.0, 0.0, 0
        pos.epoch, pos.samples = pos.epoch + 1, 0
        if samples:  # the epoch ended inside an accumulation window; its gradients carry over
            log.warning("epoch %d ended between optimizer steps; no epoch-end checkpoint", pos.epoch - 1)
        else:  # (replaces a periodic checkpoint of the same step: this one has the new epoch)
            save()
        if cfg.data.val_shards and pos.epoch % max(cfg.train.eval_every_epochs, 1) == 0:
            evaluate(cfg, ds.module, enc, pos.epoch - 1, telemetry, ckpt_dir.parent)
    return pos


def evaluate(cfg: ExperimentConfig, model: torch.nn.Module, enc: TextEncoder, epoch: int,
             telemetry: Telemetry, run_dir: Path) -> None:
    """Sharded evaluation of ``data.val_shards`` on every rank; recalls go to the telemetry."""
    from trainer.sharded_eval import evaluate_split

    weights = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype)
    if weights is not None:  # low-precision weights cannot run an fp32 evaluation
        cfg = replace(cfg, eval=replace(cfg.eval, precision=weights))
    result = evaluate_split(model, cfg, cfg.data.val_shards, encode_text=enc.encode,
                            out_dir=run_dir / "eval" / f"epoch{epoch:03d}")
    telemetry.observe_eval(epoch=epoch, metrics=result.metrics)
    log.info("epoch %d evaluation: rsum %.2f", epoch, result.metrics["rsum"])


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _loss_scale(ds: Any) -> float | None:
    """The dynamic fp16 loss scale (ZeRO optimizers keep it in ``loss_scale_config``)."""
    if not ds.fp16_enabled():
        return None
    holder = getattr(ds.optimizer, "loss_scale_config", ds.optimizer)
    return _float(getattr(holder, "cur_scale", None))
