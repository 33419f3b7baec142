"""Worker script for the multi-process trainer tests (run by tests/test_distributed_*.py).

``python tests/helpers_dist.py grads OUT VARIANTS`` with RANK/WORLD_SIZE/MASTER_* set: every rank takes
its rows of one fixed global batch (unequal row counts and lengths on purpose), runs the real model,
``scan.loss.batch_loss`` and ``engine.backward`` for each variant of VARIANTS (e.g. "0,2,dvsa":
``GRAD_VARIANTS``, a model kind and a ZeRO stage),
and writes the summed loss and the full gradients to ``OUT/world<W>_rank<R>.pt``. With one process
it also writes the reference loss: ``hardest_negative_loss`` over the whole batch's scores.

``accum OUT PRECISIONS`` (one process): the accumulation matrix of tests/test_accumulation.py.
``paper OUT`` (any world size): one step of a paper recipe with its global batch of 128 split
over the ranks (tests/test_distributed_grads.py).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import torch
from deepspeed.utils import safe_get_full_grad

from scan.builders import loss_for, scorer_for
from scan.config import ExperimentConfig
from trainer.distributed import free_loopback_port, init_process_group, read_env
from trainer.engine import build_engine
from scan.loss import hardest_negative_loss
from scan.model import build_model
from scan.loss import batch_loss
from trainer.train import seed_everything

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the product's helper, the one tests use."""
    return free_loopback_port()


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (all sockets held open while choosing)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a CPU training subprocess: no launcher variables inherited, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def train_args(shards: str, out: Path, *overrides: str) -> list[str]:
    """``--config`` and overrides of the tiny test run (after ``-m app.cli train`` or a launcher)."""
    return ["--config", str(TINY_CONFIG), f"data.train_shards={shards}", f"train.output_dir={out}",
            *overrides]


def run_train(shards: str, out: Path, *overrides: str, resume: str | None = None,
              timeout: float = 240, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``scan train`` of the tiny config in a subprocess; ``extra``: more options (``--overwrite``)."""
    cmd = [sys.executable, "-m", "app.cli", "train", *train_args(shards, out, *overrides), *extra]
    if resume:
        cmd += ["--resume", resume]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


GLOBAL_BATCH = 10
VOCAB = 30
# Pairs 0 and 5, and 2 and 8, show the same image: with rank 0 holding rows 0-3 and rank 1 rows
# 4-9 these duplicates straddle the ranks, so same-image masking must work across devices.
IMAGE_IDS = [0, 1, 2, 3, 4, 0, 5, 6, 2, 7]
SPLIT = {1: [(0, 10)], 2: [(0, 4), (4, 10)], 4: [(0, 2), (2, 3), (3, 7), (7, 10)]}


# variant → overrides of the tiny config (ZeRO stage, model, loss, accumulation). Every variant but
# "rows_and_columns" mines with the row partition (loss.partition: rows, the default).
GRAD_VARIANTS: dict[str, dict[str, object]] = {
    "0": {}, "2": {"train.zero_stage": 2},
    "rows_and_columns": {"loss.partition": "rows_and_columns"},
    "ring": {"loss.partition": "ring"},
    "ring_all_negatives_accum": {"loss.partition": "ring", "loss.max_violation": False, "train.grad_accum": 2},
    "all_negatives": {"loss.max_violation": False},
    "unmasked": {"loss.mask_same_image": False},
    "all_negatives_unmasked": {"loss.max_violation": False, "loss.mask_same_image": False},
    "accum": {"train.grad_accum": 2},  # two micro-batches accumulated before the step
    "vse": {"model.kind": "vse"}, "vse_gpo": {"model.kind": "vse", "model.pooling": "gpo", "train.zero_stage": 2},
    "dvsa": {"model.kind": "dvsa"},
    "scan_sal": {"model.kind": "scan_sal"},  # SVA + STA: the GFU's parameters train too
}


def tiny_config(stage: int, batch: int) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = 16, 32, 16
    cfg.train.precision, cfg.train.zero_stage = "fp32", stage
    cfg.data.batch_size = batch
    return cfg


def global_batch(seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(GLOBAL_BATCH, 6, 16, generator=g)
    img_lens = torch.randint(3, 7, (GLOBAL_BATCH,), generator=g)
    tokens = torch.randint(4, VOCAB, (GLOBAL_BATCH, 9), generator=g)
    cap_lens = torch.randint(4, 10, (GLOBAL_BATCH,), generator=g)
    saliency = torch.rand(GLOBAL_BATCH, 6, generator=g)  # drawn last: the other tensors stay as they were
    for dup, orig in ((5, 0), (8, 2)):
        regions[dup], img_lens[dup], saliency[dup] = regions[orig], img_lens[orig], saliency[orig]
    return {"regions": regions, "img_lens": img_lens, "tokens": tokens, "cap_lens": cap_lens,
            "image_ids": torch.tensor(IMAGE_IDS), "saliency": saliency}


def local_rows(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi), trimmed to this slice's own longest image and caption (as a collate would)."""
    out = {k: v[lo:hi] for k, v in batch.items()}
    out["regions"] = out["regions"][:, : int(out["img_lens"].max())]
    if "saliency" in out:
        out["saliency"] = out["saliency"][:, : int(out["img_lens"].max())]
    out["tokens"] = out["tokens"][:, : int(out["cap_lens"].max())]
    return out


def grads(out: Path, variants: list[str], dtype: torch.dtype = torch.float32) -> None:
    """Each variant: this rank's rows of the fixed global batch (and of a second one when it accumulates),
    the loss through the engine's backward, then the full gradients (before the optimizer step).
    float64 (the engine's fp32 mode on float64 weights) takes rounding out of the comparison."""
    env = read_env()
    init_process_group(env)
    lo, hi = SPLIT[env.world][env.rank]
    result = {}
    for variant in variants:
        cfg = tiny_config(0, hi - lo)
        for key, value in GRAD_VARIANTS[variant].items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        scorer = scorer_for(cfg)
        seed_everything(0)
        # float64: plain torch (DeepSpeed reduces no float64 gradients); the gradients are then
        # averaged over the ranks here, as the engine does.
        engine = (build_engine(cfg, build_model(cfg.model, VOCAB), env) if dtype == torch.float32
                  else None)
        model = engine.ds.module if engine is not None else build_model(cfg.model, VOCAB).to(dtype)
        totals, local_only, reference, unmasked = [], None, None, None
        for micro in range(cfg.train.grad_accum):
            b = local_rows(global_batch(123 + micro), lo, hi)
            b["regions"] = b["regions"].to(dtype)
            img = model.encode_images(b["regions"], b["img_lens"], b["saliency"].to(dtype))  # scan_sal only
            cap = model.encode_captions(b["tokens"], b["cap_lens"])
            img_lens, cap_lens = model.output_lens(b["img_lens"]), model.output_lens(b["cap_lens"])
            loss, total = batch_loss(img, img_lens, cap, cap_lens, b["image_ids"], cfg.loss, scorer)
            totals.append(float(total))
            if micro == 0:
                local = dataclasses.replace(cfg.loss, cross_device=False)
                local_only = float(batch_loss(img, img_lens, cap, cap_lens, b["image_ids"], local, scorer)[0])
                if env.world == 1:
                    scores = scorer(img.detach(), cap.detach(), cap_lens, img_lens)
                    ids = b["image_ids"] if cfg.loss.mask_same_image else None
                    reference = float(hardest_negative_loss(scores, cfg.loss.margin, cfg.loss.max_violation, ids))
                    unmasked = float(hardest_negative_loss(scores, cfg.loss.margin, cfg.loss.max_violation))
            if engine is None:
                (loss / cfg.train.grad_accum).backward()
                continue
            engine.ds.backward(loss)
            if micro + 1 < cfg.train.grad_accum:
                engine.ds.step()  # not a boundary: only counts the micro-batch
        if engine is None:
            full = {}
            for n, p in model.named_parameters():
                g = p.grad.detach().clone()
                if env.world > 1:
                    torch.distributed.all_reduce(g)
                full[n] = g / env.world
        else:
            full = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()}
        result[variant] = {"loss": sum(totals), "local_only": local_only, "grads": full,
                           "reference": reference, "reference_unmasked": unmasked}
    torch.save(result, out / f"{dtype}_world{env.world}_rank{env.rank}.pt".replace("torch.", ""))


# --------------------------------------------------------------------------------------------- accum
ACCUM_STAGES, ACCUM_STEPS = (0, 1, 2), (1, 2, 4)
MICRO_BATCH = 6


def micro_batches(n: int, seed: int) -> list:
    """``n`` caption batches of random features, with exact-zero cells (as real grid features
    have) and pairs of the same image inside a batch."""
    from dataio.pipeline import CaptionBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        regions = torch.randn(MICRO_BATCH, 6, 16, generator=g)
        regions[:, 0] = 0  # a zero cell in every image
        img_lens = torch.randint(3, 7, (MICRO_BATCH,), generator=g)
        cap_lens = torch.randint(4, 10, (MICRO_BATCH,), generator=g)
        tokens = torch.randint(4, VOCAB, (MICRO_BATCH, int(cap_lens.max())), generator=g)
        ids = torch.arange(MICRO_BATCH) + 100 * i
        regions[1], img_lens[1], ids[1] = regions[0], img_lens[0], ids[0]  # two captions, one image
        out.append(CaptionBatch(regions, img_lens, tokens, cap_lens, ids, [f"k{int(j)}" for j in ids]))
    return out


def reference_grads(cfg: ExperimentConfig, trainable: dict, batches: list,
                    dtype: torch.dtype = torch.float32) -> dict:
    """Gradients of one step on ``batches`` (the mean of their losses' gradients, summed in fp32)
    in plain torch, from the fp32 weights ``trainable``, computing in ``dtype`` (fp32: the true
    step; bf16: what a bf16 engine computes, rounding and all, with exact bookkeeping)."""
    from scan.model import build_trained

    model = build_trained(cfg.model, VOCAB, trainable).train().to(dtype)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for b in batches:
        model.zero_grad()
        img, cap = model(b.regions.to(dtype), b.img_lens, b.tokens, b.cap_lens)
        loss, _ = batch_loss(img, b.img_lens, cap, b.cap_lens, b.image_ids, cfg.loss, cfg.xattn)
        loss.backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.float() / len(batches)
    return total


def max_rel_err(got: dict, want: dict) -> float:
    """The largest relative error over the parameters (each judged against its own norm)."""
    return max(float((got[n] - w).norm()) / max(float(w.norm()), 1e-12) for n, w in want.items())


def rel_err(got: dict, want: dict) -> float:
    """Relative error of all gradients together."""
    diff = sum(float((got[n] - w).norm()) ** 2 for n, w in want.items()) ** 0.5
    return diff / max(sum(float(w.norm()) ** 2 for w in want.values()) ** 0.5, 1e-12)


def _bypassing_forward_backward(engine, b, cfg, device, dtype) -> None:
    """The loop as it was before issue 10: encoders called on ``ds.module``, not through the
    engine's forward (a negative control: its bf16 accumulation must fail the check). ``cfg``:
    the experiment (the real step takes the loss built from it)."""
    ds = engine.ds
    img = ds.module.encode_images(b.regions.to(dtype), b.img_lens)
    cap = ds.module.encode_captions(b.tokens, b.cap_lens)
    loss, _ = batch_loss(img, b.img_lens, cap, b.cap_lens, b.image_ids, cfg.loss, cfg.xattn)
    ds.backward(loss)


def accum(out: Path, precisions: list[str]) -> None:
    """Every precision x ZeRO stage x accumulation: the engine's accumulated gradients of two
    consecutive windows against :func:`reference_grads` in fp32 and in the engine's own dtype;
    plus the negative control (bf16, ZeRO 1, accumulation 2, the bypassing loop)."""
    from trainer.engine import fp32_trainable_state
    from trainer.step import forward_backward_step

    env = read_env()
    init_process_group(env)
    rows = []
    cases = [(p, st, g, False) for p in precisions for st in ACCUM_STAGES for g in ACCUM_STEPS]
    for precision, stage, gas, bypass in cases + [("bf16", 1, 2, True)]:
        step_fn = _bypassing_forward_backward if bypass else forward_backward_step
        cfg = tiny_config(stage, MICRO_BATCH)
        cfg.train.precision, cfg.train.grad_accum = precision, gas
        seed_everything(0)
        engine = build_engine(cfg, build_model(cfg.model, VOCAB), env)
        ds = engine.ds
        dtype = next(ds.module.parameters()).dtype
        for window in range(2):
            batches = micro_batches(gas, seed=10 * window + gas)
            weights = fp32_trainable_state(ds)
            steps = ds.global_steps
            for i, b in enumerate(batches):  # as the training loop: backward, then step
                step_fn(engine, b, cfg if bypass else loss_for(cfg), env.device, dtype)
                if i < gas - 1:
                    ds.step()  # inside the window: DeepSpeed only counts the micro-batch
            got = {n: safe_get_full_grad(p).detach().float().cpu().clone()
                   for n, p in ds.module.named_parameters() if p.requires_grad}
            ds.step()  # the window's end: the optimizer step
            fp32 = reference_grads(cfg, weights, batches)
            same = reference_grads(cfg, weights, batches, dtype)
            rows.append({"precision": precision, "stage": stage, "gas": gas, "window": window,
                         "bypass": bypass,
                         "effective_stage": engine.ds_config["zero_optimization"]["stage"],
                         "vs_fp32": rel_err(got, fp32), "vs_same": max_rel_err(got, same),
                         "stepped": ds.global_steps - steps})
    torch.save(rows, out / "accum.pt")


# --------------------------------------------------------------------------------------------- paper
PAPER_CONFIG = REPO / "configs" / "f30k_t2i_avg.yaml"
PAPER_OVERRIDES = ("model.embed_size=32", "model.word_dim=16", "train.precision=fp32",
                   "train.deepspeed_config=")  # its JSON enables bf16: exact sums need fp32


def paper_batch() -> dict[str, torch.Tensor]:
    """The paper's global batch of 128 captions with BUTD-shaped regions (36 x 2048)."""
    g = torch.Generator().manual_seed(7)
    n = 128
    # Post-ReLU like BUTD's pooled features (none of which is an exact-zero vector: at one, the
    # zero-bias projection's l2norm gradient is ~1/eps and its float sums differ across ranks).
    regions = torch.randn(n, 36, 2048, generator=g).clamp(min=0)
    cap_lens = torch.randint(8, 21, (n,), generator=g)
    tokens = torch.randint(4, VOCAB, (n, 20), generator=g)
    ids = torch.arange(n) // 2  # pairs of captions of one image, as a caption-level batch has
    regions[1::2] = regions[::2]
    return {"regions": regions, "img_lens": torch.full((n,), 36), "tokens": tokens,
            "cap_lens": cap_lens, "image_ids": ids}


def paper(out: Path) -> None:
    """One step of the F30K t2i AVG recipe (tiny embedding, fp32) with data.global_batch_size 128
    split over however many ranks run this: loss and full gradients to OUT/paper_world<W>_rank<R>.pt."""
    from dataio.pipeline import CaptionBatch
    from scan.config import load_experiment
    from trainer.step import forward_backward_step
    from trainer.train import per_rank_batch

    env = read_env()
    init_process_group(env)
    cfg = load_experiment(PAPER_CONFIG, PAPER_OVERRIDES)
    per_rank = per_rank_batch(cfg, env.world)
    cfg.data.batch_size = per_rank
    rows = local_rows(paper_batch(), env.rank * per_rank, (env.rank + 1) * per_rank)
    b = CaptionBatch(rows["regions"], rows["img_lens"], rows["tokens"], rows["cap_lens"],
                     rows["image_ids"], [str(int(i)) for i in rows["image_ids"]])
    seed_everything(0)
    engine = build_engine(cfg, build_model(cfg.model, VOCAB), env)
    loss = forward_backward_step(engine, b, loss_for(cfg), env.device, torch.float32)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.ds.module.named_parameters()}
    torch.save({"loss": loss, "per_rank": per_rank, "stage": engine.ds_config["zero_optimization"]["stage"],
                "grads": grads}, out / f"paper_world{env.world}_rank{env.rank}.pt")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "grads":
        grads(Path(args[0]), args[1].split(","), getattr(torch, args[2]) if len(args) > 2 else torch.float32)
    elif command == "accum":
        accum(Path(args[0]), args[1].split(","))
    elif command == "paper":
        paper(Path(args[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")
