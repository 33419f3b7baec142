"""Checkpoint directory rules (names, pruning, what `latest` may name) and loading without
unpickling: a planted pickle payload in any checkpoint file is refused, naming the file."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers_dist import run_train
from trainer import checkpoint


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dirs(root: Path, *names: str) -> Path:
    for n in names:
        (root / n).mkdir(parents=True)
    return root


def test_names_order_and_pruning(tmp_path):
    d = _dirs(tmp_path, "step00000005", "step00000010", "step00000010-1", "step00000030",
              "step00000012.partial")
    assert checkpoint.complete_tags(d) == ["step00000005", "step00000010", "step00000010-1",
                                           "step00000030"]
    assert checkpoint._new_name(d, 10) == "step00000010-2" and checkpoint._new_name(d, 11) == "step00000011"
    # latest = step00000010-1 (e.g. step00000030 is left by a run resumed from an older checkpoint)
    checkpoint._prune(d, "step00000010-1", keep=2)
    assert checkpoint.complete_tags(d) == ["step00000005", "step00000010-1"]
    checkpoint._prune(d, "step00000010-1", keep=1)
    assert checkpoint.complete_tags(d) == ["step00000010-1"]


def test_latest_must_name_a_complete_checkpoint(tmp_path):
    d = _dirs(tmp_path, "step00000003", "step00000004.partial")
    (d / "latest").write_text("step00000004.partial\n")
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint; available: \['step00000003'\]"):
        checkpoint.latest_tag(d)


@pytest.fixture(scope="module")
def trained(generated_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    done = run_train(generated_shards, out, "train.max_steps=2", "train.precision=bf16", "train.zero_stage=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# file -> (read by `scan train --resume`, read by inference: evaluate / explain / retrieve)
VICTIMS = {"rng_rank0.pt": (True, False), "mp_rank_00_model_states.pt": (True, True),
           "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": (True, False),
           "model_fp32.pt": (False, True)}


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.integration
def test_a_planted_pickle_payload_is_refused(generated_shards, trained, tmp_path, victim):
    import torch

    from tools.inference import load_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "checkpoints" / checkpoint.latest_tag(run / "checkpoints") / victim
    assert path.is_file()
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, path)
    by_resume, by_inference = VICTIMS[victim]
    if by_resume:
        done = run_train(generated_shards, run, "train.max_steps=3", "train.precision=bf16",
                         "train.zero_stage=1", resume="latest")
        assert done.returncode == 2, done.stderr[-3000:]
        assert "refusing to load it" in done.stderr and victim in done.stderr
        assert "Traceback" not in done.stderr
    if by_inference:
        with pytest.raises(checkpoint.UnsafeCheckpointError, match=victim):
            load_run(run)
    assert not marker.exists()  # the payload never ran
