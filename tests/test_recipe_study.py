"""The recipe study's learning-curve subsets: the first N training images as whole shards."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dataio.pipeline import resolve_shards

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("recipe_study", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_images_reads_the_leading_shards(study, generated_shards):
    # generated_shards: 120 images in 4 shards of 30
    for count, shards in ((30, 1), (60, 2), (120, 4)):
        spec = study.first_images(generated_shards, count)
        got = resolve_shards(spec)
        assert len(got) == shards and sum(s.samples for s in got) == count
        assert [s.url for s in got] == [s.url for s in resolve_shards(generated_shards)[:shards]]


def test_first_images_off_a_shard_boundary_names_the_nearest(study, generated_shards):
    with pytest.raises(ValueError, match=r"--train-images 45: .* nearest are 30 and 60"):
        study.first_images(generated_shards, 45)
    with pytest.raises(ValueError, match=r"nearest are 120 and None"):
        study.first_images(generated_shards, 150)


def test_subset_runs_get_their_own_folders(study, tmp_path):
    assert study.run_dir(tmp_path, "t2i", 1) == tmp_path / "t2i" / "seed1"
    assert study.run_dir(tmp_path, "t2i", 1, 2000) == tmp_path / "t2i@2000" / "seed1"
