"""Cross-device hardest negatives: 2 and 4 gloo ranks give the loss and gradients of 1 process on
the concatenated global batch within 1e-6 (fp32; the row partition and the earlier rows-and-columns
scheme; SCAN under ZeRO 0 and 2, hardest or all negatives, same-image pairs masked across ranks or
not, two micro-batches accumulated; VSE++ with mean and GPO pooling; DVSA; saliency-guided SCAN); and a
paper recipe's data.global_batch_size of 128 gives the one-process gradients on 1, 2 and 8 ranks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_dist import GRAD_VARIANTS, cpu_env, free_port

HELPER = Path(__file__).with_name("helpers_dist.py")
VARIANTS = tuple(GRAD_VARIANTS)
WORLDS = (1, 2, 4)


def _launch(out: Path, world: int, *command: str) -> list[subprocess.Popen]:
    command = command or ("grads", str(out), ",".join(VARIANTS))
    port = free_port()
    procs = []
    for rank in range(world):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HELPER), *command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _run_worlds(out: Path, dtype: str) -> dict[str, dict]:
    procs = [p for w in WORLDS for p in _launch(out, w, "grads", str(out), ",".join(VARIANTS), dtype)]
    for p in procs:  # the seven processes of W = 1, 2 and 4 at once
        log, _ = p.communicate(timeout=400)
        assert p.returncode == 0, log[-4000:]
    return {f"world{w}_rank{r}": torch.load(out / f"{dtype}_world{w}_rank{r}.pt")
            for w in WORLDS for r in range(w)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """fp32 through the DeepSpeed engine (the training path)."""
    return _run_worlds(tmp_path_factory.mktemp("grads32"), "float32")


@pytest.fixture(scope="module")
def results64(tmp_path_factory) -> dict[str, dict]:
    """float64 in plain torch, gradients averaged over the ranks as the engine does: no rounding
    left to hide a difference of the algorithm."""
    return _run_worlds(tmp_path_factory.mktemp("grads64"), "float64")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def _global_rel(got: dict, want: dict) -> float:
    diff = sum(float((got[n] - w).norm()) ** 2 for n, w in want.items()) ** 0.5
    return diff / sum(float(w.norm()) ** 2 for w in want.values()) ** 0.5


def _check_worlds(results: dict, variant: str, loss_rel: float, check_grads) -> None:
    one = results["world1_rank0"][variant]
    if "accum" not in variant:  # one process: the plain reference loss over the whole batch
        assert one["loss"] == pytest.approx(one["reference"], rel=loss_rel)
    for world in WORLDS[1:]:
        for rank in range(world):
            r = results[f"world{world}_rank{rank}"][variant]
            assert r["loss"] == pytest.approx(one["loss"], rel=loss_rel), (world, rank)
            assert one["grads"].keys() == r["grads"].keys()
            assert all(float(g.norm()) > 0 for g in one["grads"].values())
            check_grads(r["grads"], one["grads"], (world, rank))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.integration
def test_ranks_equal_one_process_exactly(results64, variant):
    """W = 2 and 4 (unequal rows per rank, a rank with one row, same-image pairs across ranks) give
    one process's loss and every parameter's gradient in float64 to 1e-12 relative, per variant."""
    def check(got, want, where):
        for name, g in want.items():
            assert _rel(got[name], g) <= 1e-12, (where, name, _rel(got[name], g))

    _check_worlds(results64, variant, 1e-12, check)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.integration
def test_ranks_equal_one_process_through_the_engine_in_fp32(results, variant):
    """The same through DeepSpeed in fp32: the loss within 1e-6; the gradients differ only by fp32
    rounding (summation orders, and hinges within rounding of zero switching; float64 above shows
    none of it is the algorithm): measured 1e-7 to 3e-5 of their norm, the earlier
    rows-and-columns scheme alike; bounded at 1e-4."""
    def check(got, want, where):
        assert _global_rel(got, want) <= 1e-4, (where, _global_rel(got, want))

    _check_worlds(results, variant, 1e-6, check)


@pytest.mark.integration
def test_local_mining_differs_from_global(results):
    """The equality above is not vacuous: mining on each rank's own rows gives another loss."""
    one, r0 = results["world1_rank0"]["0"], results["world2_rank0"]["0"]
    assert one["local_only"] == pytest.approx(one["loss"], rel=1e-6)  # one process: same thing
    assert abs(r0["local_only"] - one["loss"]) > 1e-3 * one["loss"]


@pytest.mark.integration
def test_same_image_pairs_are_not_negatives(results):
    """The fixed batch has duplicate images; unmasked, they would be (hard) negatives."""
    one = results["world1_rank0"]["0"]
    assert one["reference_unmasked"] > one["reference"] + 1e-4
    assert results["world1_rank0"]["unmasked"]["loss"] == pytest.approx(one["reference_unmasked"], rel=1e-6)


PAPER_WORLDS = (1, 2, 8)


@pytest.mark.integration
def test_paper_global_batch_gives_one_process_gradients_on_any_world(tmp_path):
    """configs/f30k_t2i_avg.yaml states data.global_batch_size 128: every world size mines over the
    same 128 captions and takes the same step (issue 10: batch_size per rank made 8 GPUs mine over
    1,024 at the paper's lr)."""
    procs = [p for w in PAPER_WORLDS for p in _launch(tmp_path, w, "paper", str(tmp_path))]
    for p in procs:
        log, _ = p.communicate(timeout=400)
        assert p.returncode == 0, log[-4000:]
    one = torch.load(tmp_path / "paper_world1_rank0.pt")
    assert one["per_rank"] == 128 and one["stage"] == 1  # the recipe's ZeRO stage
    for world in PAPER_WORLDS[1:]:
        for rank in range(world):
            r = torch.load(tmp_path / f"paper_world{world}_rank{rank}.pt")
            assert r["per_rank"] == 128 // world
            assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
            for name, g in one["grads"].items():
                assert float(g.norm()) > 0, name
                assert _rel(r["grads"][name], g) <= 1e-5, (world, rank, name)


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused():
    from scan.config import load_experiment
    from scan.configfile import ConfigError
    from trainer.train import per_rank_batch

    cfg = load_experiment(Path(__file__).parents[1] / "configs" / "f30k_t2i_avg.yaml")
    assert per_rank_batch(cfg, 8) == 16
    with pytest.raises(ConfigError, match=r"'data.global_batch_size': 128 captions do not divide over 3 ranks"):
        per_rank_batch(cfg, 3)
