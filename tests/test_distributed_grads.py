"""Cross-device hardest negatives: 2 gloo ranks give the loss and gradients of 1 process on the
concatenated global batch (fp32, ZeRO 0 and 2), with same-image pairs masked across ranks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_dist import cpu_env, free_port

HELPER = Path(__file__).with_name("helpers_dist.py")
STAGES = (0, 2)


def _launch(out: Path, world: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(HELPER), "grads", str(out), ",".join(map(str, STAGES))], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("grads")
    procs = _launch(out, 1) + _launch(out, 2)  # all three processes at once
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-4000:]
    return {name: torch.load(out / f"{name}.pt") for name in ("world1_rank0", "world2_rank0", "world2_rank1")}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).norm()) <= rel * max(float(b.norm()), 1e-12)


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_one_process(results, stage):
    one, r0, r1 = (results[n][stage] for n in ("world1_rank0", "world2_rank0", "world2_rank1"))
    # The single-process loss is the plain reference loss over the whole batch.
    assert one["loss"] == pytest.approx(one["reference"], rel=1e-6)
    for r in (r0, r1):
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["grads"].keys() == r0["grads"].keys()
    for name, g in one["grads"].items():
        assert float(g.norm()) > 0, name
        for r in (r0, r1):
            assert _close(r["grads"][name], g), (name, float((r["grads"][name] - g).norm()), float(g.norm()))


def test_local_mining_differs_from_global(results):
    """The equality above is not vacuous: mining on each rank's own rows gives another loss."""
    one, r0 = results["world1_rank0"][0], results["world2_rank0"][0]
    assert one["local_only"] == pytest.approx(one["loss"], rel=1e-6)  # one process: same thing
    assert abs(r0["local_only"] - one["loss"]) > 1e-3 * one["loss"]


def test_same_image_pairs_are_not_negatives(results):
    """The fixed batch has duplicate images; unmasked, they would be (hard) negatives."""
    one = results["world1_rank0"][0]
    assert one["reference_unmasked"] > one["reference"] + 1e-4
