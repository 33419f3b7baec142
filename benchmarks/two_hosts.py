"""What the link costs: a paper recipe (F30K t2i LSE, bf16, ZeRO 1, global batch 128) at tiny
widths, one rank on each of two hosts (network namespaces joined by a veth, scripts/two_hosts.sh)
against two ranks on one host, and the bytes each rank sends over the link per step, measured from
the veth's counter (``/sys/class/net/link0/statistics/tx_bytes`` inside each host), beside what the
loss's gathers and the gradient reduction predict.

Shards are local on each host (the same generated set written on both), so that the link carries
the collectives only; checkpoints go to moto's S3 on host 1 at the end, outside the measured window.
Root only (network namespaces). One run of each; CPU machines shared with other work are noisy.

    .venv/bin/python benchmarks/two_hosts.py [--images 240] [--steps 9] [--embed 8]
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the rehearsal's harness: one implementation

from two_hosts import TwoHosts  # noqa: E402

BIN = Path(sys.executable).parent
RECIPE = "configs/f30k_t2i_lse.yaml"


def overrides(h: TwoHosts, run: str, args: argparse.Namespace) -> list[str]:
    return [f"data.train_shards={h.disk}/train/manifest.json", "data.val_shards=",
            f"train.output_dir=s3://bench/{run}", f"train.staging_dir={h.disk}/{run}", "model.img_dim=64",
            f"model.embed_size={args.embed}", f"model.word_dim={args.embed}", "data.num_workers=1",
            f"train.max_steps={args.steps}", "train.ckpt_every_steps=0", "train.log_every=1",
            "metrics.enabled=false"]


def watch(h: TwoHosts, log: Path, procs: list, hosts: tuple[int, ...]) -> dict[int, dict[int, int]]:
    """tx bytes of each host's link at the moment rank 0 logs each step."""
    at: dict[int, dict[int, int]] = {host: {} for host in hosts}
    while any(p.poll() is None for p in procs):
        text = log.read_text(errors="replace") if log.is_file() else ""
        for step in map(int, re.findall(r"step (\d+) loss", text)):
            if step not in at[hosts[0]]:
                for host in hosts:
                    at[host][step] = h.tx_bytes(host)
        time.sleep(0.02)
    for p in procs:
        assert p.wait() == 0, log.read_text(errors="replace")[-3000:]
    return at


def step_times(h: TwoHosts, run: str, first: int) -> list[float]:
    import json

    rows = [json.loads(line) for line in (h.private(1) / run / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if r.get("kind") == "step" and r["step"] > first]


def predicted(args: argparse.Namespace, h: TwoHosts) -> tuple[float, float]:
    """Bytes per step per rank (W = 2): the caption-embedding gather (forward) and its gradient
    (backward), at the longest caption of the set; and ZeRO 1's gradient reduce-scatter plus
    parameter all-gather (bf16)."""
    from dataio.pipeline import iter_tokens
    from dataio.text import build_vocab
    from scan.config import load_experiment
    from scan.model import build_model

    manifest = str(h.private(1) / "train" / "manifest.json")
    longest = max(len(t) for t in iter_tokens(manifest)) + 2  # <start> <end>
    vocab = build_vocab(iter_tokens(manifest))  # as the run built it
    per_rank = 128 // 2
    gather = 2 * per_rank * longest * args.embed * 2  # forward + backward, bf16
    cfg = load_experiment(REPO / RECIPE, [f"model.embed_size={args.embed}", f"model.word_dim={args.embed}",
                                          "model.img_dim=64"])
    params = sum(p.numel() for p in build_model(cfg.model, len(vocab)).parameters())
    return gather, 2 * params * 2 * (2 - 1) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--embed", type=int, default=8)
    args = p.parse_args()
    h = TwoHosts.up()
    try:
        h.logs = Path(h.root) / "logs"
        h.logs.mkdir()
        h.start_s3(h.logs / "moto.log")
        h.make_bucket("bench")
        code = ("import sys\nfrom dataio.sources.synthetic import write_synthetic\n"
                "write_synthetic(sys.argv[1], int(sys.argv[2]), seed=0, dim=64, shard_size=60)\n")
        for host in (1, 2):
            assert h.run(host, [sys.executable, "-c", code, f"{h.disk}/train", str(args.images)]).returncode == 0
            (h.private(host) / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
        first = 2  # steps 1-2 warm up
        # two hosts, one rank each
        procs = [h.start(host, [BIN / "deepspeed", "--hostfile", h.disk / "hostfile", "--no_ssh",
                                "--node_rank", host - 1, "--master_addr", h.addr[1], "--master_port", 29500,
                                "--module", "app.cli", "train", "--config", RECIPE, *overrides(h, "two", args)],
                         h.logs / f"two-host{host}.log") for host in (1, 2)]
        tx = watch(h, h.logs / "two-host1.log", procs, (1, 2))
        two = step_times(h, "two", first)
        # one host, two ranks (they talk over its loopback)
        procs = [h.start(1, [BIN / "deepspeed", "--num_gpus", 2, "--master_port", 29510, "--module", "app.cli",
                             "train", "--config", RECIPE, *overrides(h, "one", args)], h.logs / "one.log")]
        watch(h, h.logs / "one.log", procs, (1,))
        one = step_times(h, "one", first)
        gather, grads = predicted(args, h)
        last = args.steps
        print(f"step time (median of steps {first + 1}-{last}): two hosts {statistics.median(two):.3f} s, "
              f"one host x 2 ranks {statistics.median(one):.3f} s, ratio {statistics.median(two) / statistics.median(one):.2f}")
        for host in (1, 2):
            sent = (tx[host][last] - tx[host][first]) / (last - first)
            print(f"rank {host - 1} (host {host}) sent {sent / 1e3:.1f} kB/step over the link; predicted: "
                  f"loss gathers {gather / 1e3:.1f} kB + ZeRO-1 gradient/parameter exchange {grads / 1e3:.1f} kB "
                  f"= {(gather + grads) / 1e3:.1f} kB (measured / predicted {sent / (gather + grads):.2f})")
    finally:
        h.down()


if __name__ == "__main__":
    main()
