"""Epoch time of the demo's recipe on the full training set: frozen text features cached vs
the frozen MiniLM run at every step (how training ran before ``scan.text_features``).

Both cases run the real training step (``trainer.step.train_step`` through the DeepSpeed engine,
the demo's config, fp32) on the real batches of the full training shards (30,000 captions of
Flickr8k's 6,000 train images; 938 batches of 32), for ``--steps`` steps each, side by side in
one process; the epoch time is the mean step time × the epoch's batches (the "measured" column
says over how many steps). The cached case also reports the one-off cost of computing the
features of every caption, and the validation's encoding counts (each val image and caption
encoded once).

    .venv/bin/python benchmarks/epoch_time.py --shards runs/demo/shards --steps 150
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataio.pipeline import image_records  # noqa: E402
from scan.builders import loss_for  # noqa: E402
from scan.config import load_experiment  # noqa: E402
from scan.eval.encode import encode_records  # noqa: E402
from scan.model import HFTextEncoder, build_model  # noqa: E402
from trainer.distributed import init_process_group, read_env  # noqa: E402
from trainer.engine import build_engine  # noqa: E402
from trainer.step import train_step  # noqa: E402
from trainer.train import epoch_batches, precompute_text_features, text_encoder  # noqa: E402


class PerStepFrozen(HFTextEncoder):
    """The frozen transformer run at every call (no cache), as the encoder worked before."""

    def __init__(self, encoder: HFTextEncoder) -> None:
        torch.nn.Module.__init__(self)  # not HFTextEncoder's: the parts come from ``encoder``
        self.freeze, self.frozen = True, None
        self.backbone = encoder.transformer
        self.backbone.requires_grad_(False)
        self.fc = encoder.fc

    def train(self, mode: bool = True) -> "PerStepFrozen":
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout, as the encoder did
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from scan.model import l2norm

        with torch.no_grad():
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = l2norm(self.fc(hidden), dim=-1)
        return out * attention_mask[..., None].to(out.dtype)


def time_steps(cfg, model, enc, env, steps: int) -> tuple[float, int]:
    """Mean seconds per training step over ``steps`` steps after 5 warm-up steps; the epoch's batches."""
    engine = build_engine(cfg, model, env)
    dtype = next(engine.ds.module.parameters()).dtype
    batches = epoch_batches(cfg, enc, env, 0)
    loss_fn = loss_for(cfg)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(engine, batch, loss_fn, env.device, dtype, epoch=1)
        times.append(time.perf_counter() - t0)
        if i + 1 >= steps + 5:
            break
    return sum(times[5:]) / len(times[5:]), len(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="folder with train/ and val/ manifests")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--feature-cache", default="",
                   help="folder of cached text features to reuse (default: computed afresh, and timed)")
    args = p.parse_args(argv)
    shards = Path(args.shards)
    tmp = Path(tempfile.mkdtemp(prefix="epoch_time_"))
    cfg = load_experiment(args.config, [f"data.train_shards={shards / 'train' / 'manifest.json'}",
                                        f"data.val_shards={shards / 'val' / 'manifest.json'}",
                                        f"train.output_dir={tmp}", f"model.hf_feature_cache={args.feature_cache or tmp / 'tf'}",
                                        "train.precision=fp32", "metrics.enabled=false"])
    env = read_env(None)
    init_process_group(env)  # a one-process group, as `scan train` runs
    enc, vocab_size = text_encoder(cfg, env, tmp)

    t0 = time.perf_counter()
    precompute_text_features(cfg, enc, env, tmp)
    once = time.perf_counter() - t0

    torch.manual_seed(0)
    cached = build_model(cfg.model, vocab_size)
    per_step = build_model(cfg.model, vocab_size)
    per_step.load_state_dict(cached.state_dict())
    per_step.txt_enc = PerStepFrozen(per_step.txt_enc)

    rows = []
    for name, model in (("frozen MiniLM at every step (before)", per_step),
                        ("cached frozen features (now)", cached)):
        step, n = time_steps(cfg, model, enc, env, args.steps)
        rows.append((name, step, n))

    # Validation encodes each val image and each caption once (counted at the encoders).
    counts = {"images": 0, "captions": 0}
    enc_img, enc_cap = cached.encode_images, cached.encode_captions

    def count_images(regions, lens=None):
        counts["images"] += regions.shape[0]
        return enc_img(regions, lens)

    def count_captions(tokens, lens):
        counts["captions"] += tokens.shape[0]
        return enc_cap(tokens, lens)

    cached.encode_images, cached.encode_captions = count_images, count_captions
    records = list(image_records(cfg.data.val_shards, limit=cfg.eval.val_images))
    t0 = time.perf_counter()
    encode_records(cached.eval(), records, encode_text=enc.encode, caps_per_image=cfg.eval.caps_per_image)
    encode_s = time.perf_counter() - t0

    print(f"demo recipe ({cfg.model.embed_size}-d, batch {cfg.data.batch_size}, {cfg.xattn.direction}), "
          f"fp32, {torch.get_num_threads()} threads, full training set")
    print("| text features | s per step | epoch (batches) | epoch time | measured over |")
    print("|---|---|---|---|---|")
    for name, step, n in rows:
        print(f"| {name} | {step:.3f} | {n} | {step * n / 60:.1f} min | {args.steps} steps |")
    print(f"speed-up per epoch: {rows[0][1] / rows[1][1]:.2f}x; every train and val caption's features "
          + (f"read from {args.feature_cache}" if args.feature_cache else "computed") + f" in {once:.0f} s, "
          "once (later runs read the cache file)")
    print(f"validation encoding: {counts['images']} image encodings for {len(records)} images, "
          f"{counts['captions']} caption encodings for {len(records) * cfg.eval.caps_per_image} captions "
          f"({encode_s:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
