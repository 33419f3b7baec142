"""One prepared check of every GPU path, for a bare H100/H200 reached for a few minutes at a time.

Run by ``benchmarks/gpu_check.sh`` (which installs .whl/ first); ``--dry-run`` checks the plan
on a CPU machine: every step's script and test selection exists and loads, the GPU tests are
collected, the wheels match benchmarks/gpu_wheels.txt for Python 3.12 on x86-64 Linux and fit
the device's 64 MiB, and the step budgets fit the time limit.

Each step runs in its own process with its own time limit, inside one overall deadline
(``--limit``, 8 minutes), so that a hang in one leaves the others their time. The table (step,
status, seconds, figures) is printed and, with ``$OUT`` set, written to ``$OUT/gpu_check.md``
with every step's full output in ``$OUT/gpu_check.log``.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "benchmarks" / "gpu_wheels.txt"
DEVICE_TREE_LIMIT = 64 * 2**20  # what travels to the device: working tree + carried wheels
PY = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    budget_s: int
    figures: str  # regex of the output lines that go into the table

    def command(self) -> list[str]:
        return [PY, *self.argv]


PLAN = [
    # The suite's GPU tests (skipped on CPU): CUDA half-precision scores, the fp16/bf16 autocast
    # step, the bf16 backbone, pinned-memory loading, fp16 training, and the precision x ZeRO x
    # accumulation grid against fp32 (fp16 rows only run here). First, so that DeepSpeed's FusedAdam
    # JIT-builds (a minute or two with nvcc) inside the step with the largest budget.
    Step("GPU tests of the suite (pytest -m gpu)",
         ("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra", "tests"),
         200, r"(passed|failed|error|skipped)"),
    Step("fp16 loss scale on Lite2-like features (ZeRO 0/1/2) and bf16",
         ("benchmarks/gpu_loss_scale.py", "--steps", "60", "--warmup", "20"), 70, r"^RESULT "),
    Step("xattn_scores bf16 1,000 x 5,000 (k 36, d 1,024, 8-20 words) vs the matmul floor",
         ("benchmarks/xattn.py", "--gpu-only", "--repeats", "3"), 35, r"^bf16 "),
    Step("sharded evaluator 1,000 x 5,000 and 5,000 x 25,000 (bf16)",
         ("benchmarks/evaluate.py", "--no-cpu"), 60, r"^(GPU |sharded|method)"),
    Step("training step at the paper's batch vs the reference-style step",
         ("benchmarks/train.py", "--cases", "reference", "fp32-1", "fp32-1-fused", "bf16-1", "fp16-1",
          "--steps", "3"), 55, r"^\|"),
]
LIMIT_S = 450  # of the 8 minutes: install and start-up take the rest


def run_plan(limit_s: int, out_dir: Path | None) -> int:
    import torch

    start = time.monotonic()
    rows, log = [], []
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    for step in PLAN:
        left = limit_s - (time.monotonic() - start)
        budget = int(min(step.budget_s, left - 5))
        if budget < 10:
            rows.append((step.name, "not run (time limit)", 0.0, ""))
            continue
        t0 = time.monotonic()
        # Its own process group, so that a timeout also ends what the step started (pytest's
        # helpers, benchmark ranks).
        proc = subprocess.Popen(step.command(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=budget)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = f"TIMEOUT after {budget} s"
        seconds = time.monotonic() - t0
        figures = [line.strip() for line in output.splitlines() if re.search(step.figures, line)]
        rows.append((step.name, status, seconds, "<br>".join(figures[-12:])))
        log.append(f"===== {step.name}: {status} in {seconds:.0f} s\n{output}")
        print(f"[{time.monotonic() - start:5.0f} s] {step.name}: {status}", file=sys.stderr, flush=True)
    table = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}", "",
             "| step | status | s | figures |", "|---|---|---|---|"]
    table += [f"| {name} | {status} | {sec:.0f} | {fig.replace('|', '/')} |" for name, status, sec, fig in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.md").write_text(text)
        (out_dir / "gpu_check.log").write_text("\n".join(log))
    return 0 if all(r[1] == "ok" for r in rows) else 1


def wanted_wheels() -> dict[str, str]:
    """name (normalised) → version, from benchmarks/gpu_wheels.txt."""
    out = {}
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise SystemExit(f"{WHEEL_LIST}: '{line}' must pin a version (name==version)")
            out[_norm(name)] = version
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def check_wheels(wheel_dir: Path) -> list[str]:
    """Problems with the wheels in ``wheel_dir`` (empty: they will install on the GPU machine)."""
    if not wheel_dir.is_dir():
        return [f"{wheel_dir}: missing; run `bash benchmarks/gpu_wheels.sh` first"]
    problems, found = [], {}
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version, *_, py_tag, abi, plat = whl.stem.split("-")
        key = _norm(name)
        if key in found:
            problems.append(f"{whl.name}: a second version of {name} (pip would refuse both)")
        found[key] = version
        pys, plats = py_tag.split("."), plat.split(".")
        if not any(t in ("py3", "py2", "cp312") for t in pys):
            problems.append(f"{whl.name}: built for {py_tag}, not Python 3.12")
        if not any(p == "any" or (p.startswith("manylinux") and p.endswith("x86_64")) for p in plats):
            problems.append(f"{whl.name}: platform {plat} is not manylinux x86-64")
    for key, version in wanted_wheels().items():
        if found.get(key) != version:
            problems.append(f"{wheel_dir}: {key}=={version} missing (found {found.get(key, 'none')}); "
                            "run `bash benchmarks/gpu_wheels.sh`")
    for key in sorted(set(found) - set(wanted_wheels())):
        problems.append(f"{wheel_dir}: {key} is not in {WHEEL_LIST.name}")
    tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, check=True).stdout.split(b"\0")
    tree_bytes = sum((REPO / p.decode()).stat().st_size for p in tree if p and (REPO / p.decode()).is_file())
    wheel_bytes = sum(f.stat().st_size for f in wheel_dir.glob("*.whl"))
    if tree_bytes + wheel_bytes > DEVICE_TREE_LIMIT:
        problems.append(f"working tree {tree_bytes / 2**20:.1f} MiB + wheels {wheel_bytes / 2**20:.1f} MiB "
                        f"exceed the device's {DEVICE_TREE_LIMIT / 2**20:.0f} MiB")
    print(f"wheels: {len(found)} in {wheel_dir} ({wheel_bytes / 2**20:.1f} MiB; working tree "
          f"{tree_bytes / 2**20:.1f} MiB)")
    return problems


def dry_run(wheel_dir: Path, limit_s: int) -> int:
    problems = check_wheels(wheel_dir)
    total = sum(s.budget_s for s in PLAN)
    if total + 30 > limit_s:  # the install and start-up take the rest
        problems.append(f"step budgets sum to {total} s, over the {limit_s} s limit less 30 s of install")
    for step in PLAN:
        script = step.argv[0]
        if script.endswith(".py"):
            if not (REPO / script).is_file():
                problems.append(f"{step.name}: {script} does not exist")
                continue
            # The script loads, and every option of the plan is one of its own.
            done = subprocess.run([PY, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                problems.append(f"{step.name}: `{script} --help` failed:\n{done.stderr[-800:]}")
            for flag in (a for a in step.argv[1:] if a.startswith("--")):
                if not re.search(rf"{re.escape(flag)}\b", done.stdout):
                    problems.append(f"{step.name}: {script} has no option {flag}")
    collect = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                              "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    gpu_tests = [line for line in collect.stdout.splitlines() if "::" in line]
    if collect.returncode != 0 or len(gpu_tests) < 6:
        problems.append(f"pytest -m gpu collected {len(gpu_tests)} tests (exit {collect.returncode}):\n"
                        f"{collect.stdout[-800:]}{collect.stderr[-800:]}")
    print(f"plan: {len(PLAN)} steps, {total} s of budgets within {limit_s} s; {len(gpu_tests)} GPU tests")
    for step in PLAN:
        print(f"  {step.budget_s:4d} s  {step.name}: {' '.join(step.argv)}")
    for problem in problems:
        print(f"dry run: {problem}", file=sys.stderr)
    print("dry run: ok" if not problems else f"dry run: {len(problems)} problem(s)")
    return 0 if not problems else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check the plan and the wheels here; run nothing")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--limit", type=int, default=LIMIT_S, help="seconds for all steps together")
    args = p.parse_args()
    if args.dry_run:
        return dry_run(args.wheels, args.limit)
    out = os.environ.get("OUT")
    return run_plan(args.limit, Path(out) if out else None)


if __name__ == "__main__":
    sys.exit(main())
