"""Why DVSA with eq. 7's rectifier inside its score dies, and eq. 8 as published does not.

On shards of any extraction (e.g. 48 generated scenes:
``scan extract source.synthetic=48 'source.splits=[train,val]' backbone=efficientnet-lite0
dest=/tmp/dv/shards``), trains the DVSA encoders of configs/train_tiny.yaml's widths with the
hinge over hardest negatives (margin 0.2, batch 8, Adam at 2e-3) for a few steps, once scoring
S = Σ_t max_r max(0, v_r·s_t) (the rectified score this project once had) and once S = Σ_t max_r
v_r·s_t (eq. 8, ``scan.scorers.DVSAScorer``), and prints per step: the loss, the share of pairs
scoring above 0, and the mean pairwise cosine of the region embeddings (their shared direction).

    .venv/bin/python benchmarks/dvsa_alive.py --shards /tmp/dv/shards/train/manifest.json --seeds 0 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataio.pipeline import image_records  # noqa: E402
from dataio.text import build_vocab  # noqa: E402
from scan.config import ModelConfig  # noqa: E402
from scan.loss import hardest_negative_loss  # noqa: E402
from scan.model import build_model  # noqa: E402
from scan.scorers import DVSAScorer  # noqa: E402


def rectified(img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Σ_t max_r max(0, v_r·s_t) (no padding here: every image has its full grid)."""
    return torch.einsum("ikd,jnd->ijkn", img, cap).amax(2).clamp(min=0).sum(-1)


def run(feats: torch.Tensor, pairs: list, vocab, score: str, seed: int, steps: int) -> list[str]:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind="dvsa", img_dim=feats.shape[-1], embed_size=32, word_dim=16),
                        len(vocab) + 4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for s in range(steps):
        idx = [order[(s * 8 + i) % len(order)] for i in range(8)]
        toks = [vocab.encode(pairs[j][1]) for j in idx]
        lens = torch.tensor([len(t) for t in toks])
        tokens = torch.zeros(8, int(lens.max()), dtype=torch.long)
        for k, t in enumerate(toks):
            tokens[k, :len(t)] = torch.tensor(t)
        ids = torch.tensor([pairs[j][0] for j in idx])
        img, cap = model(feats[ids], None, tokens, lens)
        scores = rectified(img, cap) if score == "rectified" else DVSAScorer()(img, cap, lens)
        loss = hardest_negative_loss(scores, 0.2, True, ids)
        if s in (0, 1, 3, 7, steps - 1):
            with torch.no_grad():
                v = torch.nn.functional.normalize(img.reshape(-1, img.shape[-1]), dim=-1)
                cos = float((v @ v.t()).mean())
            out.append(f"step {s}: loss {loss.item():.3f}, scores > 0 {float((scores > 0).float().mean()):.2f}, "
                       f"region cosine {cos:.2f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="a train split's manifest.json")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    records = list(image_records(args.shards))
    vocab = build_vocab([t for r in records for t in r.tokens], threshold=4)
    feats = torch.tensor(np.stack([r.regions for r in records]).astype(np.float32))
    print(f"{len(records)} images, features {tuple(feats.shape[1:])}: {float((feats > 0).float().mean()):.2f} "
          f"of the values above 0, min {float(feats.min()):.3f}")
    pairs = [(i, c) for i, r in enumerate(records) for c in r.tokens[:5]]
    for seed in args.seeds:
        for score in ("rectified", "eq8"):
            print(f"seed {seed}, {score}: " + " | ".join(run(feats, pairs, vocab, score, seed, args.steps)))


if __name__ == "__main__":
    main()
