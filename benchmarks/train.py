"""Training throughput of the SCAN step: samples/s, median step time and peak memory per rank.

Model and batch as the paper's recipe: batch 128 captions per rank, k = 36 regions of D = 2048,
embed 1024, word dim 300, BiGRU, captions of 8-20 words (+ <start>/<end>), t2i λ1 = 9 AVG.
Every case runs the real engine (``trainer.engine.build_engine``) and loss
(``scan.loss.batch_loss``) on fixed random tensors (no data loading), with W processes over
gloo (CPU) or nccl (GPU) for the multi-rank cases. ``reference`` is a straightforward
single-process re-implementation of the reference training step: its per-caption loop scorer
(``benchmarks/reference_loop.py``), fp32, torch Adam, no DeepSpeed.

    python benchmarks/train.py                 # the cases for this machine (CPU: a few minutes)
    python benchmarks/train.py --cases fp32-1 reference --steps 3
    python benchmarks/train.py --cases floor fp32-1-torchgru fp32-1 --threads 1   # nn.GRU vs scan.gru
    python benchmarks/train.py --cases global1024-2x512   # peak memory at a global batch of 1,024
    python benchmarks/train.py --mining        # cross-device mining at W = 2 and 4, side by side

Samples/s counts captions of the global batch per second (W × per-rank batch / median step time).
"pairs/rank" is the image–caption pairs one rank scores per step; "vs W x per-rank step" divides a
global-mining step by W per-rank-mining steps of the same ranks and batch, the inherent work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VOCAB = 10_000
BUILD_S: dict[str, float] = {}  # seconds to build the engine (optimizer ops included), this process


@dataclass(frozen=True)
class Case:
    world: int
    precision: str  # fp32 | bf16 | fp16 | reference
    cross_device: bool = True
    batch: int = 128  # captions per rank
    partition: str = "rows"  # loss.partition of global mining: rows | rows_and_columns
    fused: bool = False  # xattn.fused: the score tiles' passes compiled (torch.compile)
    gru_impl: str = "auto"  # model.gru_impl: auto (scan.gru on CPU, cuDNN nn.GRU on CUDA) | fused | torch

    @property
    def mining(self) -> str:
        if not self.cross_device or self.world == 1:
            return "per rank" if self.world > 1 else "one process"
        return {"rows": "global, row-partitioned", "ring": "global, row-partitioned, ring",
                "rows_and_columns": "global, rows and columns"}[self.partition]

    def pairs_per_rank(self) -> int:
        """Image–caption pairs one rank scores per step (B_l local, B_g = W · B_l global)."""
        b_l, b_g = self.batch, self.batch * self.world
        if not self.cross_device or self.world == 1:
            return b_l * b_l
        return 2 * b_l * b_g - b_l * b_l if self.partition == "rows_and_columns" else b_l * b_g


CASES = {
    "fp32-1": Case(1, "fp32"),
    "fp32-1-fused": Case(1, "fp32", fused=True),
    # The same step with PyTorch's nn.GRU (packed) instead of scan.gru: the GRU's before / after.
    "fp32-1-torchgru": Case(1, "fp32", gru_impl="torch"),
    # Not a training step: the step's matrix products alone, same shapes (floor_step).
    "floor": Case(1, "floor"),
    "bf16-1": Case(1, "bf16"),
    "fp16-1": Case(1, "fp16"),
    "fp32-2-cross": Case(2, "fp32"),
    "fp32-2-rowscols": Case(2, "fp32", partition="rows_and_columns"),
    "fp32-2-ring": Case(2, "fp32", partition="ring"),
    "fp32-2-local": Case(2, "fp32", cross_device=False),
    "fp32-4-cross": Case(4, "fp32"),
    "fp32-4-rowscols": Case(4, "fp32", partition="rows_and_columns"),
    "fp32-4-ring": Case(4, "fp32", partition="ring"),
    "fp32-4-local": Case(4, "fp32", cross_device=False),
    "bf16-2-cross": Case(2, "bf16"),
    "reference": Case(1, "reference"),
    # A global batch of 1,024 with hardest negatives over all of it (peak memory is the point).
    "global1024-2x512": Case(2, "fp32", batch=512),  # CPU-friendly: fp32 is the fast CPU path
    "global1024-1x1024": Case(1, "bf16", batch=1024),
}
CPU_DEFAULT = ["fp32-1", "bf16-1", "fp32-2-local", "fp32-2-cross", "fp32-2-rowscols"]
# Cross-device mining at W = 2 and 4, side by side (issue 15): per-rank mining (the inherent work
# is W times it), the row partition, and the earlier rows-and-columns scheme.
MINING = ["fp32-2-local", "fp32-2-cross", "fp32-2-ring", "fp32-2-rowscols",
          "fp32-4-local", "fp32-4-cross", "fp32-4-ring", "fp32-4-rowscols"]
GPU_DEFAULT = ["reference", "fp32-1", "bf16-1", "fp16-1", "global1024-1x1024"]
# The fp32 step against the reference-style step and its matrix-product floor (issue 14).
STEP = ["reference", "fp32-1-torchgru", "fp32-1", "fp32-1-fused", "floor"]


def make_batch(batch: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cap_lens = torch.randint(8, 21, (batch,), generator=g) + 2  # words + <start>/<end>
    tokens = torch.randint(4, VOCAB, (batch, int(cap_lens.max())), generator=g)
    return {"regions": torch.randn(batch, 36, 2048, generator=g).to(device),
            "img_lens": torch.full((batch,), 36).to(device),
            "tokens": tokens.to(device), "cap_lens": cap_lens.to(device),
            "image_ids": torch.arange(batch).to(device) + seed * batch}


def experiment(case: Case):
    from scan.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = 2048, 1024, 300
    cfg.data.batch_size = case.batch
    cfg.loss.cross_device = case.cross_device
    cfg.loss.partition = case.partition
    cfg.train.precision = case.precision if case.precision in ("fp32", "bf16", "fp16") else "fp32"
    cfg.xattn.fused = case.fused
    cfg.model.gru_impl = case.gru_impl
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(name: str, steps: int, warmup: int) -> None:
    """One rank of one case (rank/world from the environment); rank 0 prints a RESULT line."""
    from trainer.distributed import init_process_group, read_env
    from scan.model import build_model
    from trainer.train import peak_memory_bytes, seed_everything

    case = CASES[name]
    env = read_env()
    cfg = experiment(case)
    seed_everything(0)
    model = build_model(cfg.model, VOCAB)
    batch = make_batch(case.batch, env.rank, env.device)
    if case.precision == "reference":
        step, label = _reference_step(cfg, model, env.device)
    elif case.precision == "floor":
        step, label = _floor_step(cfg, batch, env.device), "-"
    else:
        init_process_group(env)
        step, label = _engine_step(cfg, model, env)
    times = []
    for _ in range(warmup + steps):
        _sync(env.device)
        t0 = time.perf_counter()
        step(batch)
        _sync(env.device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[warmup:])
    if os.environ.get("BENCH_PROFILE") and env.rank == 0:
        print_profile(step, batch)
    peak = torch.tensor(float(peak_memory_bytes(env.device)))
    if case.precision not in ("reference", "floor") and env.world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if env.rank == 0:
        print("RESULT " + json.dumps({
            "case": name, "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
            "precision": case.precision, "ranks": env.world, "global_batch": case.batch * env.world,
            "mining": case.mining, "pairs_per_rank": case.pairs_per_rank(), "optimizer": label,
            "engine_build_s": BUILD_S.get("engine"),
            "median_step_s": median, "samples_per_s": case.batch * env.world / median,
            "peak_mem_gb": float(peak) / 2**30, "threads": torch.get_num_threads()}), flush=True)


def print_profile(step, batch: dict[str, torch.Tensor], rows: int = 18) -> None:
    """Where one step's time goes (torch.profiler): operators by self CPU time, one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print("PROFILE\n" + table, file=sys.stderr, flush=True)


def _engine_step(cfg, model, env):
    from trainer.engine import build_engine
    from scan.loss import batch_loss

    t0 = time.perf_counter()
    engine = build_engine(cfg, model, env)  # builds (JIT-compiles) DeepSpeed's fused optimizer ops
    BUILD_S["engine"] = time.perf_counter() - t0
    ds = engine.ds
    dtype = next(ds.module.parameters()).dtype

    def step(b: dict[str, torch.Tensor]) -> None:
        # through the engine's forward, as trainer.step.train_step does
        img, cap = ds(b["regions"].to(dtype), b["img_lens"], b["tokens"], b["cap_lens"])
        loss, _ = batch_loss(img, b["img_lens"], cap, b["cap_lens"], b["image_ids"], cfg.loss, cfg.xattn)
        ds.backward(loss)
        ds.step()

    return step, engine.optimizer_name


def _reference_step(cfg, model, device):
    """The reference's step: loop scorer, VSE++ max-violation loss (no masking), Adam, clip 2."""
    from reference_loop import reference_loop_scores

    from scan.loss import hardest_negative_loss

    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)

    def step(b: dict[str, torch.Tensor]) -> None:
        img = model.encode_images(b["regions"], b["img_lens"])
        cap = model.encode_captions(b["tokens"], b["cap_lens"])
        loss = hardest_negative_loss(reference_loop_scores(img, cap, b["cap_lens"], cfg.xattn),
                                     cfg.loss.margin, cfg.loss.max_violation)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    return step, "torch.optim.Adam"


def _floor_step(cfg, batch: dict[str, torch.Tensor], device: torch.device):
    """The step's matrix products alone, at its shapes, fp32: what no implementation of this step
    can avoid. Forward and the backward products that training needs: the region encoder's
    (B·k × D) @ (D × E) and its weight gradient (the regions need none); the BiGRU's input
    projection (B·L × w → 3E per direction) with its two gradients and, per time step, the
    recurrent (B × E → 3E) per direction with its two; the scores' one product
    (B·k × E) @ (E × B·n) with both gradients; the Gram matrices and G·e (B × k × k times
    k × B·n) with both gradients. Elementwise work, the GRU's gates, the loss and Adam are not in it."""
    B, k, D = batch["regions"].shape
    E, w = cfg.model.embed_size, cfg.model.word_dim
    L = int(batch["cap_lens"].max())
    h = E  # hidden size per direction (the reference's GRU; the two directions are averaged)
    dirs = 2 if cfg.model.bidirectional else 1
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    # Operands and output-gradients of the step's products (each product is timed once).
    regions, w_img, g_img = r(B * k, D), r(D, E), r(B * k, E)
    words, w_in, g_in = r(B * L, w), r(w, 3 * h), r(B * L, 3 * h)
    state, w_hh, g_h = r(B, h), r(h, 3 * h), r(B, 3 * h)
    img, cap, g_s = r(B * k, E), r(B * L, E), r(B * k, B * L)
    gram, e = r(B, k, k), r(B, k, B * L)
    products = [
        lambda: regions @ w_img, lambda: regions.t() @ g_img,  # region encoder: forward, weight grad
        *[f for _ in range(dirs)  # GRU input projection: forward, weight grad, input grad
          for f in (lambda: words @ w_in, lambda: words.t() @ g_in, lambda: g_in @ w_in.t())],
        lambda: img @ cap.t(), lambda: g_s @ cap, lambda: g_s.t() @ img,  # scores and both grads
        lambda: torch.bmm(img.view(B, k, E), img.view(B, k, E).transpose(1, 2)),  # Gram
        lambda: torch.bmm(gram, e), lambda: torch.bmm(gram, e), lambda: torch.bmm(e, e.transpose(1, 2)),
    ]

    def step(_: dict[str, torch.Tensor]) -> None:
        for f in products:
            f()
        for _ in range(dirs * L):  # recurrent products per time step: forward, input grad, weight grad
            state @ w_hh, g_h @ w_hh.t(), state.t() @ g_h

    return step


def launch(name: str, steps: int, warmup: int, threads: int = 0) -> dict | None:
    """Runs one case in CASES[name].world fresh processes (``threads`` each; 0: the cores shared
    out); returns rank 0's result."""
    from trainer.distributed import free_loopback_port

    world = CASES[name].world
    cores = threads * world or os.cpu_count() or 1
    port = str(free_loopback_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS=str(max(1, cores // world)))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--warmup", str(warmup)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    result, failed = None, False
    for rank, p in enumerate(procs):
        out, err = p.communicate()
        if "PROFILE\n" in err:
            print(f"case {name}, rank {rank}: " + err[err.index("PROFILE\n"):], file=sys.stderr)
        if p.returncode != 0:
            print(f"case {name}: rank {rank} failed (exit {p.returncode}):\n{err[-2000:]}", file=sys.stderr)
            failed = True
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
    return None if failed else result


def print_memory_table(global_batches=(1024, 8192, 65536), per_rank: int = 128, regions: int = 36,
                       words: int = 32, dim: int = 1024, bytes_per: int = 2) -> None:
    """Per-rank memory of the embeddings a step holds for cross-device mining (bf16, counted, not
    measured): each gathered tensor is held once in the forward and once as its gradient; captions
    padded to ``words``; W = global batch / ``per_rank``."""
    def gib(n: float) -> str:
        return f"{n / 2**30:.3f}"

    print(f"| global batch | regions of all images | words of all captions | rows and columns: both, "
          f"+ gradients | rows: words, + gradients | ring: 2 caption blocks, + gradients "
          f"({per_rank} captions per rank) |")
    print("|---|---|---|---|---|---|")
    for g in global_batches:
        img, cap = g * regions * dim * bytes_per, g * words * dim * bytes_per
        block = per_rank * words * dim * bytes_per
        print(f"| {g:,} (W = {g // per_rank}) | {gib(img)} GiB | {gib(cap)} GiB | {gib(2 * (img + cap))} GiB | {gib(2 * cap)} GiB "
              f"| {gib(4 * block)} GiB |")


def print_table(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["precision"] == "reference"), None)
    head = ["case", "device", "precision", "ranks", "global batch", "negatives mined", "pairs/rank",
            "median step s", "samples/s", "peak mem/rank GiB", "vs reference", "vs floor",
            "vs W x per-rank step", "optimizer (build s)"]
    rounds = any(len(r.get("rounds_s", ())) > 1 for r in rows)
    if rounds:
        head.append("each round's step s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        speedup = f"{ref['median_step_s'] / r['median_step_s']:.2f}x" if ref and r["global_batch"] == ref["global_batch"] else ""
        # Global mining's inherent work is W times per-rank mining's (B_l x B_g against B_l x B_l).
        local = next((x for x in rows if x["mining"] == "per rank" and x["ranks"] == r["ranks"]
                      and x["global_batch"] == r["global_batch"] and x["precision"] == r["precision"]), None)
        inherent = (f"{r['median_step_s'] / (r['ranks'] * local['median_step_s']):.2f}x"
                    if local and r["mining"].startswith("global") else "")
        floor = next((x for x in rows if x["precision"] == "floor"), None)
        vs_floor = f"{r['median_step_s'] / floor['median_step_s']:.2f}x" if floor and r["ranks"] == 1 else ""
        build = r.get("engine_build_s")
        optimizer = r["optimizer"] + (f" ({build:.1f})" if build is not None else "")
        print(f"| {r['case']} | {r['device']} | {r['precision']} | {r['ranks']} | {r['global_batch']} | "
              f"{r['mining']} | {r['pairs_per_rank']} | {r['median_step_s']:.3f} | {r['samples_per_s']:.1f} | "
              f"{r['peak_mem_gb']:.2f} | {speedup} | {vs_floor} | {inherent} | {optimizer} |"
              + (f" {', '.join(f'{t:.3f}' for t in r.get('rounds_s', ()))} |" if rounds else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", choices=sorted(CASES), help="default: the machine's set")
    p.add_argument("--mining", action="store_true", help="the cross-device mining cases at W = 2 and 4")
    p.add_argument("--step", action="store_true",
                   help="the fp32 step: reference-style, nn.GRU, scan.gru, fused scores (xattn.fused), floor")
    p.add_argument("--memory-table", action="store_true",
                   help="print the per-rank memory of the mined embeddings at large global batches")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the case list this often, interleaved; each case reports its median round")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per process (OMP_NUM_THREADS); default: the cores over the ranks")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's operator table of one step per case")
    p.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        os.environ["BENCH_PROFILE"] = "1"  # the workers inherit it
    if args.worker:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        run_worker(args.worker, args.steps, args.warmup)
        return
    if args.memory_table:
        print_memory_table()
        return
    gpus = torch.cuda.device_count()
    names = args.cases or (MINING if args.mining else STEP if args.step
                           else GPU_DEFAULT if gpus else CPU_DEFAULT)
    runnable = []
    for name in names:
        if gpus and CASES[name].world > gpus:
            print(f"case {name}: needs {CASES[name].world} GPUs, this machine has {gpus}; skipped",
                  file=sys.stderr)
            continue
        if not gpus and CASES[name].precision == "fp16":
            print(f"case {name}: fp16 needs a GPU; skipped", file=sys.stderr)
            continue
        runnable.append(name)
    # Rounds interleave the cases (a shared machine's load drifts over minutes); each case's row
    # is its round with the median step time.
    results: dict[str, list[dict]] = {name: [] for name in runnable}
    for r in range(args.rounds):
        for name in runnable:
            print(f"running {name}" + (f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else "")
                  + " ...", file=sys.stderr, flush=True)
            result = launch(name, args.steps, args.warmup, args.threads)
            if result:
                results[name].append(result)
    rows = []
    for name in runnable:
        done = sorted(results[name], key=lambda x: x["median_step_s"])
        if done:
            row = dict(done[(len(done) - 1) // 2])
            row["rounds_s"] = [x["median_step_s"] for x in results[name]]
            rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
