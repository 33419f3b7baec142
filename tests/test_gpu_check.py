"""benchmarks/gpu_check.sh --dry-run: the GPU check's plan and wheels, checked on this CPU machine.

The wheels are fetched as a user would (benchmarks/gpu_wheels.sh, from the package index) into a
temporary folder; the dry run then checks them against benchmarks/gpu_wheels.txt, every step's
script and options, the GPU tests' collection and the time budgets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("whl")
    done = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(dest)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    return dest


def dry_run(wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--wheels", str(wheels)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_passes(wheels):
    done = dry_run(wheels)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run: ok" in done.stdout
    assert "5 steps" in done.stdout and "GPU tests" in done.stdout
    assert "deepspeed" in " ".join(p.name for p in wheels.glob("*.whl"))


def test_wheel_check_names_a_missing_and_a_foreign_wheel(wheels, tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_check import check_wheels

    broken = tmp_path / "whl"
    shutil.copytree(wheels, broken)
    next(broken.glob("hjson-*.whl")).unlink()
    (broken / "numpy-2.0.0-cp311-cp311-win_amd64.whl").write_bytes(b"")
    problems = "\n".join(check_wheels(broken))
    assert "hjson==3.1.0 missing" in problems
    assert "numpy-2.0.0-cp311-cp311-win_amd64.whl: built for cp311, not Python 3.12" in problems
    assert "platform win_amd64 is not manylinux x86-64" in problems
    assert "numpy is not in gpu_wheels.txt" in problems
    assert check_wheels(tmp_path / "absent") == [f"{tmp_path / 'absent'}: missing; run "
                                                 "`bash benchmarks/gpu_wheels.sh` first"]


def test_runner_reports_failures_and_timeouts_and_ends_the_step_group(tmp_path, monkeypatch):
    """The plan's runner on stand-in steps: an ok one, a failing one, and one that hangs with a
    child of its own; the table goes to $OUT and the hung child does not outlive its step."""
    sys.path.insert(0, str(REPO))
    import benchmarks.gpu_check as gpu_check

    marker = tmp_path / "child.pid"
    hang = ("import os, subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    monkeypatch.setattr(gpu_check, "PLAN", [
        gpu_check.Step("fine", ("-c", "print('RESULT {\"x\": 1}')"), 30, r"^RESULT "),
        gpu_check.Step("broken", ("-c", "import sys; print('| a | b |'); sys.exit(3)"), 30, r"^\|"),
        gpu_check.Step("hangs", ("-c", hang), 10, r"never"),
    ])
    assert gpu_check.run_plan(60, tmp_path / "out") == 1
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| fine | ok |" in table and 'RESULT {"x": 1}' in table
    assert "| broken | FAILED (exit 3) |" in table and "/ a / b /" in table
    assert "| hangs | TIMEOUT after 10 s |" in table
    assert "===== broken: FAILED (exit 3)" in (tmp_path / "out" / "gpu_check.log").read_text()
    child = int(marker.read_text())
    for _ in range(50):  # the SIGKILL of the group reaches the child at once; reaping may lag
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hung step's child {child} is still running")
