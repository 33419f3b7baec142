"""Encode once from shards, split over 2 real gloo ranks, then encode_and_evaluate on every rank.

Run as a script (``torchrun ... tests/test_sharded_eval_encode.py OUT SPEC``) it is the worker:
each rank encodes its contiguous block of the split, counting what its encoders see.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24


def _setup(spec: str):
    from dataio.pipeline import iter_tokens
    from dataio.text import build_vocab
    from scan.config import ExperimentConfig, ModelConfig
    from scan.model import build_model

    vocab = build_vocab(iter_tokens(spec), threshold=1)
    cfg = ExperimentConfig(model=ModelConfig(img_dim=16, embed_size=32, word_dim=16))
    cfg.eval.precision, cfg.eval.image_block, cfg.eval.topk = "fp32", 5, 2
    cfg.data.batch_size = 6
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, len(vocab)), vocab


def _count_rows(model: torch.nn.Module) -> dict[str, int]:
    """Rows (images, captions) that pass through each encoder, via forward hooks."""
    seen = {"images": 0, "captions": 0}
    model.img_enc.register_forward_hook(lambda m, args, out: seen.__setitem__(
        "images", seen["images"] + out.shape[0]))
    model.txt_enc.register_forward_hook(lambda m, args, out: seen.__setitem__(
        "captions", seen["captions"] + out.shape[0]))
    return seen


def _worker(out: str, spec: str) -> None:
    import torch.distributed as dist

    from scan.eval.sharded import encode_and_evaluate

    dist.init_process_group("gloo")
    cfg, model, vocab = _setup(spec)
    seen = _count_rows(model)
    result = encode_and_evaluate(model, cfg, spec, encode_text=vocab.encode, out_dir=out)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, dict(seen))
    if dist.get_rank() == 0:
        Path(out, "encoded.json").write_text(json.dumps(
            {"per_rank": per_rank, "metrics": result.metrics,
             "i2t": result.i2t_ranks.tolist(), "t2i": result.t2i_ranks.tolist()}))
    dist.destroy_process_group()


@pytest.mark.integration
def test_encode_once_over_two_ranks_then_evaluate(tmp_path: Path) -> None:
    from dataio.pipeline import image_records
    from dataio.sources.synthetic import write_synthetic
    from helpers_dist import free_port  # here, not at the top: the torchrun worker does not need it
    from scan.eval.encode import encode_records
    from scan.metrics import recall_metrics, retrieval_ranks
    from scan.eval.tiles import Member, score_tile

    spec = write_synthetic(str(tmp_path / "test"), N_IMAGES, seed=3, split="test", dim=16,
                           shard_size=7)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(REPO / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), __file__, str(tmp_path / "out"), spec],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out/encoded.json").read_text())
    # Each image and each caption went through an encoder exactly once, split over the ranks.
    assert got["per_rank"] == [{"images": 12, "captions": 60}, {"images": 12, "captions": 60}]

    # One process, one block of 24 images: the same embeddings, so exactly the same ranks.
    cfg, model, vocab = _setup(spec)
    emb = encode_records(model, image_records(spec, rank=0, world=1), encode_text=vocab.encode,
                         caps_per_image=5, precision="fp32", batch_size=6)
    sims = score_tile([Member(emb, cfg.xattn)], slice(None), slice(None))
    i2t, t2i = retrieval_ranks(sims, 5)
    assert got["i2t"] == i2t.tolist() and got["t2i"] == t2i.tolist()
    assert got["metrics"] == recall_metrics(sims, 5)
    assert (tmp_path / "out/topk.jsonl").exists() and (tmp_path / "out/metrics.json").exists()


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    from dataio.errors import DataError
    from dataio.sources.synthetic import write_synthetic
    from scan.eval.sharded import encode_and_evaluate

    spec = write_synthetic(str(tmp_path / "test"), 10, seed=0, split="test", dim=16, shard_size=4)
    cfg, model, vocab = _setup(spec)
    (tmp_path / "test/shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"shard-000001.tar.*does not exist"):
        encode_and_evaluate(model, cfg, spec, encode_text=vocab.encode)
    with pytest.raises(FileNotFoundError, match=r"absent does not exist \(expected a manifest"):
        encode_and_evaluate(model, cfg, str(tmp_path / "absent"), encode_text=vocab.encode)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
