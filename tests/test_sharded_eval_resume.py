"""A killed evaluation, rerun with the same output directory, computes only the missing tiles."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharded_eval_fixtures import tied_embeddings
from scan.eval.encode import save_embeddings
from scan.metrics import recall_metrics
from scan.eval.sharded import evaluate_embeddings
from scan.eval.store import load_sims
from scan.eval.tiles import Member
from scan.xattn import XAttnConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _cli(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli", "evaluate-embeddings", "--config", str(tmp_path / "cfg.yaml"),
            "--embeddings", str(tmp_path / "emb.pt"), "--out", str(tmp_path / "out")]


def test_kill_mid_way_then_rerun_computes_only_the_rest(tmp_path: Path) -> None:
    emb = tied_embeddings(blocks=8, block=4, k=36, n=20, d=256)
    save_embeddings(emb, str(tmp_path / "emb.pt"))
    (tmp_path / "cfg.yaml").write_text("eval:\n  image_block: 4\n  save_sims: true\n")
    records = tmp_path / "out/tiles/records"
    total = 8 * 8

    proc = subprocess.Popen(_cli(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if records.is_dir() and len(list(records.glob("*.npz"))) >= 10:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"
    done = len(list(records.glob("*.npz")))
    assert 10 <= done < total
    assert not (tmp_path / "out/metrics.json").exists()

    rerun = subprocess.run(_cli(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "out/metrics.json").read_text())
    assert summary["tiles_loaded"] == done
    assert summary["tiles_computed"] == total - done
    # The tiles of both runs form one matrix, and the resumed figures are exactly its figures.
    assert summary["metrics"] == recall_metrics(load_sims(tmp_path / "out/sims"), 5)
    assert summary["metrics"] == evaluate_embeddings([Member(emb, XAttnConfig())], image_block=8).metrics

    # A third run finds every tile recorded and computes nothing.
    again = subprocess.run(_cli(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    last = json.loads(again.stdout.strip().splitlines()[-1])
    assert (last["tiles_computed"], last["tiles_loaded"]) == (0, total)


@pytest.mark.parametrize("damage", ["empty", "cut_short", "garbage"])
def test_a_damaged_resume_record_is_recomputed_not_fatal(tmp_path: Path, caplog, damage: str) -> None:
    """Records are renamed into place without fsync (store.py), so after a machine crash one can be
    empty or cut short; the rerun names it and recomputes that tile, with the same figures."""
    emb = tied_embeddings(blocks=3, block=4, k=8, n=6, d=32)
    members = [Member(emb, XAttnConfig())]
    work = tmp_path / "work"
    first = evaluate_embeddings(members, image_block=4, work_dir=work)
    assert (first.tiles_computed, first.tiles_loaded) == (9, 0)
    record = sorted((work / "records").glob("*.npz"))[4]
    data = record.read_bytes()
    record.write_bytes({"empty": b"", "cut_short": data[: len(data) // 2],
                        "garbage": b"\0" * len(data)}[damage])
    with caplog.at_level("WARNING", logger="scan.eval.store"):
        again = evaluate_embeddings(members, image_block=4, work_dir=work)
    assert (again.tiles_computed, again.tiles_loaded) == (1, 8)
    assert again.metrics == first.metrics
    assert f"resume record {record} is unreadable" in caplog.text
