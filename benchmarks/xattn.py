"""Time xattn_scores against the reference-style caption loop and the unavoidable matrix product.

Run: ``.venv/bin/python benchmarks/xattn.py`` (``--quick`` for a tiny CI smoke run).

Same inputs, same process, float32 CPU, k = 36 regions, d = 1024, caption lengths 8–20 padded to
n = 20, the default config (t2i, clipped_l2norm, λ1 = 9, mean). Times are medians of interleaved
runs (the methods alternate, so load from other processes hits all of them alike). Peak memory:
each method runs once in a fresh subprocess; the figure is the growth of the peak resident set
(VmHWM in /proc/self/status, reset with ``clear_refs`` 5 after the inputs exist) during one
call, so it counts every byte torch's CPU allocator touched, not only tensors still alive.
With CUDA it also times bf16 at 1,000 × 5,000 and reports TFLOP/s against the matmul floor.
``--lengths`` times inference on captions of a real val split's lengths (the demo's: MiniLM word
pieces, mean 14.4, at most 36; 49 regions, d = 256), every tile padded to the longest caption
against length-sorted tiles (``xattn_scores(length_sorted=...)``), in both directions.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run standalone from a checkout

from benchmarks.reference_loop import reference_loop_scores  # noqa: E402
from scan.xattn import XAttnConfig, xattn_scores  # noqa: E402

K_REGIONS, N_WORDS, DIM = 36, 20, 1024


def make_inputs(n_img: int, n_cap: int, k: int, n: int, d: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, n, d, generator=g), dim=-1)
    cap_lens = torch.randint(min(8, n), n + 1, (n_cap,), generator=g)
    return images.to(device, dtype), captions.to(device, dtype), cap_lens.to(device)


def methods(images, captions, cap_lens, cfg) -> dict[str, Callable[[], torch.Tensor]]:
    a = images.reshape(-1, images.shape[-1])
    b = captions.reshape(-1, captions.shape[-1])
    fused = replace(cfg, fused=True)
    return {
        "xattn_scores": lambda: xattn_scores(images, captions, cap_lens, cfg),
        "xattn_fused": lambda: xattn_scores(images, captions, cap_lens, fused),
        "reference_loop": lambda: reference_loop_scores(images, captions, cap_lens, cfg),
        "floor_matmul": lambda: a @ b.t(),
    }


def training_methods(images, captions, cap_lens, cfg) -> dict[str, Callable[[], None]]:
    """Forward and backward of the scores (what the loss runs per step), per method. The floor is
    the one product's forward and its two backward products (gradients of both sides)."""
    im, cap = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
    a = im.reshape(-1, im.shape[-1])
    b = cap.reshape(-1, cap.shape[-1])
    fused = replace(cfg, fused=True)

    def backward(fn):
        def run():
            im.grad = cap.grad = None
            fn().sum().backward()
        return run

    return {
        "xattn_scores": backward(lambda: xattn_scores(im, cap, cap_lens, cfg)),
        "xattn_fused": backward(lambda: xattn_scores(im, cap, cap_lens, fused)),
        "reference_loop": backward(lambda: reference_loop_scores(im, cap, cap_lens, cfg)),
        "floor_matmul": backward(lambda: a @ b.t()),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_times(fns: dict[str, Callable[[], torch.Tensor]], repeats: int,
                 grad: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds per method over `repeats` interleaved
    rounds, after one warm-up each. CPU seconds (all threads) are less distorted than wall time
    when other processes share the cores."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.set_grad_enabled(grad):
        for fn in fns.values():
            fn()  # warm-up (the fused path compiles here)
        for _ in tqdm(range(repeats), desc="rounds", leave=False):
            for name, fn in fns.items():
                _sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                _sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return ({name: statistics.median(v) for name, v in wall.items()},
            {name: statistics.median(v) for name, v in cpu.items()})


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_child(method: str, n_img: int, n_cap: int) -> None:
    """Subprocess body: one call of `method`, print the peak RSS growth in MiB as JSON."""
    images, captions, cap_lens = make_inputs(n_img, n_cap, K_REGIONS, N_WORDS, DIM)
    fn = methods(images, captions, cap_lens, XAttnConfig())[method]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm_kib("VmRSS")
    with torch.no_grad():
        fn()
    print(json.dumps({"peak_mib": (_vm_kib("VmHWM") - before) / 1024}))


def peak_growth(method: str, n_img: int, n_cap: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--peak-child", method, str(n_img), str(n_cap)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


COLUMNS = (("reference_loop", "loop s"), ("xattn_scores", "unfused s"), ("xattn_fused", "fused s"),
           ("floor_matmul", "floor s"))


def _print_rows(label: str, shape: tuple[int, int], wall: dict[str, float], cpu: dict[str, float]) -> None:
    for clock, t in (("wall", wall), ("cpu", cpu)):
        cells = " ".join(f"{t[m]:9.3f}" for m, _ in COLUMNS)
        print(f"{f'{shape[0]} x {shape[1]}':>10} {label:>9} {clock:>5} {cells} "
              f"{t['reference_loop'] / t['xattn_fused']:9.2f} {t['xattn_scores'] / t['xattn_fused']:9.2f} "
              f"{t['xattn_fused'] / t['floor_matmul']:9.2f} {t['xattn_scores'] / t['floor_matmul']:9.2f}")


def cpu_table(shapes: list[tuple[int, int]], repeats: int, measure_memory: bool,
              train_shapes: list[tuple[int, int]] = ()) -> None:
    """Scores (inference) at each shape, then forward + backward at ``train_shapes``: the
    reference's loop, the unfused and the fused (xattn.fused) formulation, and the matrix-product
    floor, side by side in one process."""
    cfg = XAttnConfig()
    names = ("reference_loop", "xattn_scores", "floor_matmul")
    print(f"float32 CPU, {torch.get_num_threads()} threads, k={K_REGIONS}, n={N_WORDS} "
          f"(lengths 8-{N_WORDS}), d={DIM}, cfg={cfg}; median of {repeats} interleaved runs")
    print(f"{'N x M':>10} {'pass':>9} {'':>5} " + " ".join(f"{h:>9}" for _, h in COLUMNS)
          + f" {'loop/fus':>9} {'unf/fus':>9} {'fus/floor':>9} {'unf/floor':>9}")
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    floor_ratio: dict[str, float] = {}
    peaks = []
    for n_img, n_cap in shapes:
        images, captions, cap_lens = make_inputs(n_img, n_cap, K_REGIONS, N_WORDS, DIM)
        wall, cpu = median_times(methods(images, captions, cap_lens, cfg), repeats)
        _print_rows("scores", (n_img, n_cap), wall, cpu)
        for clock, t in (("wall", wall), ("cpu", cpu)):
            ratios[clock].append(t["reference_loop"] / t["xattn_scores"])
            floor_ratio[clock] = t["xattn_scores"] / t["floor_matmul"]
        if measure_memory:
            peaks.append((n_img, n_cap, {m: peak_growth(m, n_img, n_cap) for m in names}))
    for n_img, n_cap in train_shapes:
        images, captions, cap_lens = make_inputs(n_img, n_cap, K_REGIONS, N_WORDS, DIM)
        wall, cpu = median_times(training_methods(images, captions, cap_lens, cfg), repeats, grad=True)
        _print_rows("fwd+bwd", (n_img, n_cap), wall, cpu)
    for clock in ("wall", "cpu"):
        geo = math.exp(sum(map(math.log, ratios[clock])) / len(ratios[clock]))
        print(f"[{clock}] geometric mean loop/xattn: {geo:.2f}x; xattn/floor at "
              f"{shapes[-1][0]} x {shapes[-1][1]}: {floor_ratio[clock]:.2f}x")
    if peaks:
        print("peak memory, MiB: growth of the peak resident set during one call in a fresh "
              "subprocess (VmHWM after clear_refs 5)")
        for n_img, n_cap, mem in peaks:
            print(f"{f'{n_img} x {n_cap}':>10} " + "  ".join(f"{m} {mem[m]:.1f}" for m in names))


def gpu_table(n_img: int, n_cap: int, repeats: int) -> None:
    cfg = XAttnConfig()
    images, captions, cap_lens = make_inputs(n_img, n_cap, K_REGIONS, N_WORDS, DIM, device="cuda",
                                             dtype=torch.bfloat16)
    fns = methods(images, captions, cap_lens, cfg)
    del fns["reference_loop"]
    t, _ = median_times(fns, repeats)
    flops = 2.0 * n_img * K_REGIONS * n_cap * N_WORDS * DIM
    for name in ("xattn_scores", "xattn_fused"):
        print(f"bf16 {torch.cuda.get_device_name()} {n_img} x {n_cap}: "
              f"{name} {t[name]:.3f} s ({flops / t[name] / 1e12:.1f} TFLOP/s of the floor's work), "
              f"floor {t['floor_matmul']:.4f} s ({flops / t['floor_matmul'] / 1e12:.1f} TFLOP/s), "
              f"{name}/floor {t[name] / t['floor_matmul']:.2f}x")


def val_length_inputs(n_img: int, n_cap: int, k: int = 49, n: int = 36, d: int = 256, seed: int = 0):
    """Normalised inputs whose caption lengths follow the demo's val split (MiniLM word pieces of
    Flickr8k's val captions: mean 14.4, 90th percentile 20, at most 36), one caption at the most."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, n, d, generator=g), dim=-1)
    cap_lens = (torch.randn(n_cap, generator=g) * 3.6 + 14.4).round().clamp(7, n).long()
    cap_lens[0] = n
    return images, captions, cap_lens


def length_table(n_img: int, n_cap: int, repeats: int) -> None:
    """Inference scores of val-like caption lengths: padded tiles vs length-sorted tiles."""
    images, captions, cap_lens = val_length_inputs(n_img, n_cap)
    print(f"float32 CPU, {torch.get_num_threads()} threads, {n_img} x {n_cap}, k=49, d=256, caption "
          f"lengths mean {cap_lens.float().mean():.1f} (max {int(cap_lens.max())}); median of {repeats}")
    print(f"{'direction':>9} {'padded s':>9} {'sorted s':>9} {'speed-up':>9} {'max |diff|':>11}")
    for direction, lam in (("t2i", 9.0), ("i2t", 4.0)):
        cfg = XAttnConfig(direction=direction, lambda_softmax=lam)
        fns = {flag: (lambda flag=flag: xattn_scores(images, captions, cap_lens, cfg, length_sorted=flag))
               for flag in (False, True)}
        wall, _ = median_times(fns, repeats)
        with torch.no_grad():
            diff = (fns[False]() - fns[True]()).abs().max().item()
        print(f"{direction:>9} {wall[False]:9.3f} {wall[True]:9.3f} {wall[False] / wall[True]:8.2f}x {diff:11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a CI smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-only", action="store_true", help="only the CUDA table (benchmarks/gpu_check.sh)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lengths", action="store_true",
                        help="only inference on val-like caption lengths: padded vs length-sorted tiles")
    parser.add_argument("--peak-child", nargs=3, metavar=("METHOD", "N", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        method, n_img, n_cap = args.peak_child
        peak_growth_child(method, int(n_img), int(n_cap))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_only:
        if not torch.cuda.is_available():
            parser.error("--gpu-only needs a CUDA device")
        gpu_table(1000, 5000, repeats=args.repeats)
        return
    if args.lengths:
        length_table(1000, 1250, repeats=args.repeats)  # one evaluator block of the demo's val
        return
    if args.quick:
        cpu_table([(4, 8), (8, 8)], repeats=2, measure_memory=False, train_shapes=[(4, 8)])
        length_table(8, 40, repeats=1)
        return
    cpu_table([(32, 160), (128, 128)], repeats=args.repeats, measure_memory=True,
              train_shapes=[(128, 128)])
    if torch.cuda.is_available():
        gpu_table(1000, 5000, repeats=args.repeats)


if __name__ == "__main__":
    main()
