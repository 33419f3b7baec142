"""Time the sharded evaluator (1 and 2 gloo ranks on CPU; bf16 on a GPU) against the reference loop.

Run: ``.venv/bin/python benchmarks/evaluate.py`` (default 200 images × 1,000 captions on CPU);
``--full`` for 1,000 × 5,000 (k = 36, d = 1,024, captions of 8–20 words padded to 20: ~7.4 TFLOP
of matrix product alone; tens of minutes on 2 shared cores).

The reference-style loop (benchmarks/reference_loop.py: one caption at a time against all N
images) is timed on all N images × a few captions and scaled by the number of captions. The floor
is the one unavoidable matrix product, regions × words, for every pair: timed on the same slice on
CPU (scaled), and as a dense GEMM of the same FLOPs on a GPU. With CUDA it also evaluates
1,000 × 5,000 and 5,000 × 25,000 (COCO 5K and 1K in one pass) in bf16. Every sharded figure is
exact; the 1- and 2-rank results are checked equal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run standalone from a checkout

from benchmarks.reference_loop import reference_loop_scores  # noqa: E402
from benchmarks.xattn import DIM, K_REGIONS, N_WORDS, make_inputs  # noqa: E402
from scan.eval.encode import Embeddings  # noqa: E402
from scan.eval.sharded import evaluate_embeddings  # noqa: E402
from scan.eval.tiles import Member  # noqa: E402
from scan.xattn import XAttnConfig  # noqa: E402
from trainer.distributed import free_loopback_port  # noqa: E402

CFG = XAttnConfig()  # t2i, clipped_l2norm, λ1 = 9, mean: the reference default
CPI = 5


def floor_flops(n_img: int, n_cap: int) -> float:
    """FLOPs of the regions × words product of every pair (words padded to N_WORDS)."""
    return 2.0 * n_img * K_REGIONS * n_cap * N_WORDS * DIM


def split_embeddings(n_img: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Embeddings:
    images, captions, cap_lens = make_inputs(n_img, n_img * CPI, K_REGIONS, N_WORDS, DIM, device, dtype)
    return Embeddings(images, torch.full((n_img,), K_REGIONS, device=device), captions, cap_lens,
                      [f"img{i}" for i in range(n_img)], CPI)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_sharded(emb: Embeddings, *, rank: int = 0, world: int = 1, protocol: str = "split",
                 memory_budget_mb: int = 1024, fold_images: int = 1000) -> tuple[float, dict]:
    _sync()
    t0 = time.perf_counter()
    res = evaluate_embeddings([Member(emb, CFG)], protocol=protocol, rank=rank, world=world,
                              memory_budget_mb=memory_budget_mb, fold_images=fold_images)
    _sync()
    return time.perf_counter() - t0, res.metrics


def _rank_worker(rank: int, world: int, port: int, n_img: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    emb = split_embeddings(n_img)
    time_sharded(split_embeddings(8), rank=rank, world=world)  # warm-up
    dist.barrier()
    seconds, metrics = time_sharded(emb, rank=rank, world=world)
    if rank == 0:
        torch.save({"seconds": seconds, "metrics": metrics}, out)
    dist.destroy_process_group()


def time_ranks(n_img: int, world: int) -> tuple[float, dict]:
    """Wall time of the evaluation (after set-up) over ``world`` real gloo processes."""
    port = free_loopback_port()
    out = f"/tmp/bench_eval_{os.getpid()}_{world}.pt"
    mp.spawn(_rank_worker, args=(world, port, n_img, out), nprocs=world, join=True)
    result = torch.load(out)
    os.remove(out)
    return result["seconds"], result["metrics"]


def time_slice(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def row(name: str, n_img: int, ranks: str, precision: str, seconds: float, floor_s: float,
        loop_s: float | None) -> str:
    flops = floor_flops(n_img, n_img * CPI)
    speedup = f"{loop_s / seconds:9.1f}x" if loop_s else f"{'-':>10}"
    return (f"{name:<23} {f'{n_img} x {n_img * CPI}':>13} {ranks:>5} {precision:>5} {seconds:10.2f} "
            f"{flops / seconds / 1e12:8.3f} {seconds / floor_s:8.2f} {speedup}")


HEADER = (f"{'method':<23} {'N x M':>13} {'ranks':>5} {'prec':>5} {'time s':>10} {'TFLOP/s':>8} "
          f"{'x floor':>8} {'vs loop':>10}")


def loop_and_floor_seconds(n_img: int, slice_cap: int) -> tuple[float, float]:
    """The reference loop's and the one matrix product's seconds for n_img x n_img * CPI, timed on
    n_img x slice_cap and scaled by captions (its inputs are freed on return)."""
    scale = n_img * CPI / slice_cap
    images, captions, cap_lens = make_inputs(n_img, slice_cap, K_REGIONS, N_WORDS, DIM, seed=1)
    loop_s = scale * time_slice(lambda: reference_loop_scores(images, captions, cap_lens, CFG), 1)
    a, b = images.reshape(-1, DIM), captions.reshape(-1, DIM)
    return loop_s, scale * time_slice(lambda: a @ b.t())


def cpu_table(n_img: int, slice_cap: int) -> None:
    threads = torch.get_num_threads()
    print(f"CPU, {os.cpu_count()} cores ({threads} threads for 1 rank, split between ranks), "
          f"k={K_REGIONS}, words 8-{N_WORDS} padded to {N_WORDS}, d={DIM}, cfg={CFG}")
    print("load average at start (other processes share these cores): "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("TFLOP/s counts only the floor's regions x words product; 'x floor' = time / floor time")
    loop_s, floor_s = loop_and_floor_seconds(n_img, slice_cap)
    print(HEADER)
    print(row("reference loop*", n_img, "1", "fp32", loop_s, floor_s, None))
    time_sharded(split_embeddings(8))  # warm-up
    emb = split_embeddings(n_img)
    one_s, one_m = time_sharded(emb)
    print(row(f"sharded ({threads} threads)", n_img, "1", "fp32", one_s, floor_s, loop_s))
    if threads > 1:  # intra-op threads vs processes: the same cores, used differently
        torch.set_num_threads(1)
        single_s, _ = time_sharded(emb)
        torch.set_num_threads(threads)
        print(row("sharded (1 thread)", n_img, "1", "fp32", single_s, floor_s, loop_s))
    del emb
    two_s, two_m = time_ranks(n_img, 2)
    print(row("sharded (gloo, 1 th/rk)", n_img, "2", "fp32", two_s, floor_s, loop_s))
    print(f"{'matmul floor*':<23} {f'{n_img} x {n_img * CPI}':>13} {'1':>5} {'fp32':>5} "
          f"{floor_s:10.2f} {floor_flops(n_img, n_img * CPI) / floor_s / 1e12:8.3f}")
    print(f"* timed on {n_img} x {slice_cap} and scaled by captions; 1 rank == 2 ranks exactly: "
          f"{one_m == two_m}; rsum {one_m['rsum']:.2f} (random embeddings)")


def gpu_gemm_rate() -> float:
    """FLOP/s of the floor on this device: a dense bf16 GEMM with the FLOPs of 1,000 images x
    1,000 captions (its operands are freed on return)."""
    a = torch.randn(1000 * K_REGIONS, DIM, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1000 * N_WORDS, DIM, device="cuda", dtype=torch.bfloat16)
    a @ b.t()
    return floor_flops(1000, 1000) / time_slice(lambda: a @ b.t(), repeats=5)


def gpu_table(sizes: list[int]) -> None:
    name = torch.cuda.get_device_name()
    gemm_rate = gpu_gemm_rate()
    print(f"GPU {name}, bf16, GEMM floor rate {gemm_rate / 1e12:.0f} TFLOP/s")
    print(HEADER)
    for n_img in sizes:
        emb = split_embeddings(n_img, "cuda", torch.bfloat16)
        protocol = "coco5k" if n_img == 5000 else "split"
        time_sharded(split_embeddings(64, "cuda", torch.bfloat16), memory_budget_mb=8192)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        seconds, metrics = time_sharded(emb, protocol=protocol, memory_budget_mb=8192)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        floor_s = floor_flops(n_img, n_img * CPI) / gemm_rate
        print(row(f"sharded ({protocol})", n_img, "1", "bf16", seconds, floor_s, None)
              + f" peak GPU memory {peak_gib:.2f} GiB")
        del emb
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="CPU split size (captions: 5x)")
    p.add_argument("--full", action="store_true", help="CPU at 1,000 x 5,000 (minutes)")
    p.add_argument("--loop-captions", type=int, default=50,
                   help="captions the loop and the floor are timed on (against all images)")
    p.add_argument("--gpu-sizes", default="1000,5000", help="images per GPU run (with CUDA)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    args = p.parse_args()
    if not args.no_cpu:
        cpu_table(1000 if args.full else args.images, args.loop_captions)
    if torch.cuda.is_available():
        gpu_table([int(s) for s in args.gpu_sizes.split(",")])
    else:
        print("no CUDA device: GPU rows (1,000 x 5,000 and 5,000 x 25,000 in bf16) skipped")


if __name__ == "__main__":
    main()
