"""fp16 dynamic loss scaling on grid features like EfficientNet-Lite2's: does the scale settle?

SCAN t2i through the real engine (``trainer.engine.build_engine``) and loss, the paper's batch of
128 captions, on 9 × 9 = 81 cells × 1280 per image drawn like Lite2's pooled activations: non-
negative, heavy-tailed, and a third of them exactly zero (ReLU6 outputs; exact-zero cells and
words are where an fp16 norm or a 1/|x| overflows first). Each case trains ``--steps`` steps from
the same weights on the same batches and reports the loss scale at the start and the end, the
steps DeepSpeed skipped for overflow in all and after the warm-up (``--warmup`` steps, while the
scale falls from 2^16 to where gradients fit), and how far the first step's gradients are from
fp32's (relative l2 over all parameters). Pass: no skipped step after the warm-up, finite losses.

    python benchmarks/gpu_loss_scale.py               # CUDA: fp16 ZeRO 0/1/2 and bf16 ZeRO 1
    python benchmarks/gpu_loss_scale.py --cases fp32-0 --steps 3   # the plumbing, on a CPU

Prints one ``RESULT {json}`` line per case (benchmarks/gpu_check.py reads them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB, CELLS, FEAT, BATCH = 10_000, 81, 1280, 128
CASES = ["fp16-0", "fp16-1", "fp16-2", "bf16-1"]


def lite2_like_batches(n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(BATCH, CELLS, FEAT, generator=g).exp()  # log-normal: heavy tail
        x = (x * (torch.rand(BATCH, CELLS, FEAT, generator=g) > 1 / 3)).clamp_max(6.0)
        x[:, :4] = 0  # whole cells of exact zeros (a blank border)
        cap_lens = torch.randint(8, 21, (BATCH,), generator=g) + 2
        out.append({"regions": x.to(device), "img_lens": torch.full((BATCH,), CELLS, device=device),
                    "tokens": torch.randint(4, VOCAB, (BATCH, int(cap_lens.max())), generator=g).to(device),
                    "cap_lens": cap_lens.to(device),
                    "image_ids": torch.arange(BATCH, device=device) + i * BATCH})
    return out


def first_step_grads(ds, batch, cfg) -> dict[str, torch.Tensor]:
    """fp32 copies of every gradient after one forward + backward (before the step), unscaled."""
    from deepspeed.utils import safe_get_full_grad

    from scan.loss import batch_loss

    dtype = next(ds.module.parameters()).dtype
    img, cap = ds(batch["regions"].to(dtype), batch["img_lens"], batch["tokens"], batch["cap_lens"])
    loss, _ = batch_loss(img, batch["img_lens"], cap, batch["cap_lens"], batch["image_ids"], cfg.loss, cfg.xattn)
    ds.backward(loss)
    grads = {}
    for name, p in ds.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is not None:
            grads[name] = g.float().clone()
    return grads


def run_case(name: str, steps: int, warmup: int) -> dict:
    from scan.config import ExperimentConfig
    from scan.loss import batch_loss
    from scan.model import build_model
    from trainer.distributed import init_process_group, read_env
    from trainer.engine import build_engine
    from trainer.step import loss_scale
    from trainer.train import seed_everything

    precision, stage = name.split("-")
    env = read_env()
    cfg = ExperimentConfig()
    cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = FEAT, 1024, 300
    cfg.data.batch_size = BATCH
    cfg.train.precision, cfg.train.zero_stage = precision, int(stage)
    init_process_group(env)
    batches = lite2_like_batches(min(steps, 8), env.device)

    def fresh():
        seed_everything(0)
        return build_engine(cfg, build_model(cfg.model, VOCAB), env)

    # The first step's gradients against fp32's, same weights, same batch.
    fp32_cfg = ExperimentConfig()
    fp32_cfg.model, fp32_cfg.data, fp32_cfg.loss, fp32_cfg.xattn = cfg.model, cfg.data, cfg.loss, cfg.xattn
    fp32_cfg.train.precision = "fp32"
    seed_everything(0)
    ref = build_engine(fp32_cfg, build_model(cfg.model, VOCAB), env).ds
    want = first_step_grads(ref, batches[0], cfg)
    del ref
    t0 = time.perf_counter()
    engine = fresh()
    build_s = time.perf_counter() - t0
    ds = engine.ds
    got = first_step_grads(ds, batches[0], cfg)
    scale = loss_scale(ds) or 1.0
    num = sum(float((got[k] / scale - want[k]).square().sum()) for k in want)
    den = sum(float(want[k].square().sum()) for k in want)
    ds.step()
    dtype = next(ds.module.parameters()).dtype
    scales, losses, skipped_at = [loss_scale(ds)], [], []
    for step in range(1, steps):
        b = batches[step % len(batches)]
        before = ds.skipped_steps
        img, cap = ds(b["regions"].to(dtype), b["img_lens"], b["tokens"], b["cap_lens"])
        loss, _ = batch_loss(img, b["img_lens"], cap, b["cap_lens"], b["image_ids"], cfg.loss, cfg.xattn)
        ds.backward(loss)
        ds.step()
        losses.append(float(loss))
        scales.append(loss_scale(ds))
        if ds.skipped_steps > before:
            skipped_at.append(step)
    late = [s for s in skipped_at if s >= warmup]
    return {"case": name, "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
            "optimizer": engine.optimizer_name, "engine_build_s": build_s, "steps": steps,
            "scale_first": scales[0], "scale_last": scales[-1], "skipped": len(skipped_at),
            "skipped_after_warmup": len(late), "first_grad_rel_err_vs_fp32": (num / den) ** 0.5,
            "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "ok": not late and all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=CASES, help="precision-ZeRO stage, e.g. fp16-1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps allowed to skip while the scale settles")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        from trainer.distributed import free_loopback_port
        os.environ["MASTER_PORT"] = str(free_loopback_port())
    for name in args.cases:
        if name.startswith("fp16") and not torch.cuda.is_available():
            print(f"case {name}: fp16 needs a CUDA GPU; skipped", file=sys.stderr)
            continue
        print("RESULT " + json.dumps(run_case(name, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
