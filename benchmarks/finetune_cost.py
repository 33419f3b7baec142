"""What fine-tuning the top of the image backbone costs per training step, against frozen cells.

One training step of the demo's image side and loss (Lite0 at 224 px, 7 x 7 cells, embed 256,
SCAN t2i, hardest negatives over a batch of 32 pairs; the text side a cached-feature projection as
the demo's frozen MiniLM): forward, backward and Adam step, for ``model.image.finetune_blocks`` K
= 0 (today: the stored final cells), 1 and 2 (the stored activations before the last K blocks,
then those blocks and the head conv in the model). Real activations of random pictures; steps
timed side by side in one process after a warm-up, median of ``--steps``. The epoch time scales
by the same ratio (the cut shards are smaller than the final cells', so reading them is not
slower).

    .venv/bin/python benchmarks/finetune_cost.py --steps 5 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scan.config import ImageBackboneConfig, ModelConfig  # noqa: E402
from scan.features.backbones import load_backbone  # noqa: E402
from scan.loss import hardest_negative_loss  # noqa: E402
from scan.model import build_model, l2norm  # noqa: E402
from scan.xattn import XAttnConfig, xattn_scores  # noqa: E402

BACKBONE, SIZE, BATCH, WORDS, EMBED = "efficientnet-lite0", 224, 32, 12, 256


def _inputs(k: int, pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    bottom = load_backbone(BACKBONE, image_size=SIZE, device="cpu", cut=k)
    return bottom(pixels).features.clone(), bottom.describe()["cut_shape"]


def _step_seconds(k: int, regions: torch.Tensor, cut_shape: list[int], steps: int) -> float:
    image = ImageBackboneConfig(finetune_blocks=k, backbone=BACKBONE, image_size=SIZE, cut_shape=cut_shape)
    model = build_model(ModelConfig(img_dim=regions.shape[-1], embed_size=EMBED, image=image), vocab_size=10)
    text = torch.nn.Linear(384, EMBED)  # the projection of cached MiniLM token features
    params = [p for p in model.img_enc.parameters()] + list(text.parameters())
    if model.backbone_top is not None:
        params += list(model.backbone_top.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    words = torch.randn(BATCH, WORDS, 384, generator=g)
    cap_lens = torch.full((BATCH,), WORDS)
    lens = torch.full((BATCH,), regions.shape[1])
    xcfg = XAttnConfig(direction="t2i", agg="mean", lambda_softmax=9.0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        img = model.encode_images(regions, lens)
        cap = l2norm(text(words), dim=-1)
        scores = xattn_scores(img, cap, cap_lens, xcfg, model.image_output_lens(lens))
        loss = hardest_negative_loss(scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", default="0,1,2", help="values of finetune_blocks (0 first)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pixels = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    ks = [int(k) for k in args.blocks.split(",")]
    rows = []
    for k in ks:
        regions, shape = _inputs(k, pixels)
        rows.append((k, shape, _step_seconds(k, regions, shape, args.steps)))
    base = rows[0][2]
    print(f"Lite0 {SIZE} px, batch {BATCH}, embed {EMBED}, SCAN t2i, {args.threads} thread(s), "
          f"median of {args.steps} steps")
    print(f"{'finetune_blocks':>15} {'stored per picture':>22} {'step s':>8} {'x K=0':>7}")
    for k, shape, sec in rows:
        kb = shape[0] * shape[1] * shape[2] * 2 / 1024
        print(f"{k:>15} {f'{shape[0]}x{shape[1]}x{shape[2]} ({kb:.0f} KB)':>22} {sec:>8.3f} {sec / base:>7.2f}")


if __name__ == "__main__":
    main()
