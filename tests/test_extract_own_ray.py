"""An extraction job that starts its own local Ray stops it when done (`scan demo` trains after it)."""
from __future__ import annotations

import subprocess

import pytest

from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.local_ray import ray
from dataio.sources.synthetic import synthetic_items


def _raylets() -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,cmd="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "/raylet/raylet" in line]


@pytest.mark.integration  # starts a local Ray
def test_job_stops_the_local_ray_it_started(tiny_vit, tmp_path):
    assert not ray.is_initialized()  # nothing in this process joined a Ray before
    before = set(_raylets())
    items = list(synthetic_items(4, split="train"))
    summary = run_job(items, JobConfig(dest=str(tmp_path), backbone=f"hf:{tiny_vit}", images_per_shard=2,
                                       workers=1, batch_size=2, num_cpus=1, progress=False))
    assert summary.images_written == 4 and summary.units_failed == []
    assert not ray.is_initialized()
    assert set(_raylets()) <= before  # its raylet (and with it the node's processes) is gone
