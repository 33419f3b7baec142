"""Worker script of tests/test_backbone_finetune_dist.py: ``python tests/helpers_backbone_dist.py OUT
STAGES`` with RANK / WORLD_SIZE / MASTER_* set. Every rank takes its rows of one fixed global batch
of cut activations (Lite0 at 64 px, cut 1: 2 x 2 x 192 per image), runs the model with the
backbone's last block and head (``model.image.finetune_blocks: 1``) through the DeepSpeed engine
in fp32 at each ZeRO stage of STAGES, the cross-device loss and backward, and writes the loss and
every parameter's full gradient to ``OUT/world<W>_rank<R>.pt``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from helpers_dist import IMAGE_IDS, SPLIT, local_rows, tiny_config
from scan.config import ImageBackboneConfig
from scan.features.backbones import load_backbone
from scan.loss import batch_loss
from scan.model import build_model
try:  # the family's builders are moving to scan.builders (issue 34)
    from scan.builders import scorer_for
except ImportError:
    from scan.scorers import scorer_for
from trainer.distributed import init_process_group, read_env
from trainer.engine import build_engine, fp32_trainable_state
from trainer.train import seed_everything

VOCAB = 30
CUT_SHAPE = (2, 2, 192)


def cut_batch(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, (h, w, _) = len(IMAGE_IDS), CUT_SHAPE
    # the real activations entering Lite0's last block, of random 64 px pictures
    pixels = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
    regions = load_backbone("efficientnet-lite0", image_size=64, device="cpu", cut=1)(pixels).features.clone()
    for dup, orig in ((5, 0), (8, 2)):
        regions[dup] = regions[orig]
    return {"regions": regions, "img_lens": torch.full((n,), h * w),
            "tokens": torch.randint(4, VOCAB, (n, 9), generator=g),
            "cap_lens": torch.randint(4, 10, (n,), generator=g), "image_ids": torch.tensor(IMAGE_IDS)}


def main(out: Path, stages: list[int]) -> None:
    env = read_env()
    init_process_group(env)
    lo, hi = SPLIT[env.world][env.rank]
    result = {}
    for stage in stages:
        cfg = tiny_config(stage, hi - lo)
        cfg.model.image = ImageBackboneConfig(finetune_blocks=1, backbone="efficientnet-lite0",
                                              image_size=64, cut_shape=list(CUT_SHAPE))
        seed_everything(0)
        engine = build_engine(cfg, build_model(cfg.model, VOCAB), env)
        model = engine.ds.module
        b = local_rows(cut_batch(), lo, hi)
        img = model.encode_images(b["regions"], b["img_lens"])
        cap = model.encode_captions(b["tokens"], b["cap_lens"])
        loss, total = batch_loss(img, model.image_output_lens(b["img_lens"]), cap,
                                 model.output_lens(b["cap_lens"]), b["image_ids"], cfg.loss, scorer_for(cfg))
        engine.ds.backward(loss)
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()}
        result[stage] = {"loss": float(total), "grads": grads}
    if env.world == 1:
        result["bf16_accum"] = bf16_accumulated_step(env)
    torch.save(result, out / f"world{env.world}_rank{env.rank}.pt")


def bf16_accumulated_step(env) -> dict:
    """One optimizer step in bf16 (DeepSpeed's BF16 optimizer, fp32 master weights) over two
    accumulated micro-batches, at ZeRO 1: how far each backbone master weight moved, and the loss."""
    cfg = tiny_config(1, 5)
    cfg.train.precision, cfg.train.grad_accum = "bf16", 2
    cfg.model.image = ImageBackboneConfig(finetune_blocks=1, backbone="efficientnet-lite0",
                                          image_size=64, cut_shape=list(CUT_SHAPE))
    seed_everything(0)
    engine = build_engine(cfg, build_model(cfg.model, VOCAB), env)
    model = engine.ds.module
    before = fp32_trainable_state(engine.ds)  # the optimizer's fp32 master weights
    losses = []
    for lo, hi in ((0, 5), (5, 10)):
        b = {k: v[lo:hi] for k, v in cut_batch().items()}
        img = model.encode_images(b["regions"].to(torch.bfloat16), b["img_lens"])
        cap = model.encode_captions(b["tokens"], b["cap_lens"])
        loss, total = batch_loss(img, model.image_output_lens(b["img_lens"]), cap,
                                 model.output_lens(b["cap_lens"]), b["image_ids"], cfg.loss, scorer_for(cfg))
        engine.ds.backward(loss)
        engine.ds.step()
        losses.append(float(total))
    after = fp32_trainable_state(engine.ds)
    moved = {n: float((after[n] - before[n]).abs().max()) for n in after if n.startswith("backbone_top.")}
    return {"dtype": str(next(model.backbone_top.parameters()).dtype), "losses": losses, "moved": moved,
            "steps": engine.ds.global_steps}


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")])
