"""Object-like regions (`regions: proposals | grid+proposals`): selective-search boxes, their crops
encoded by the backbone, the extraction config's checks, and the job on a local Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.extract_config import JobConfig
from dataio.sources.synthetic import synthetic_items
from scan.configfile import ConfigError
from scan.features.backbones import load_backbone
from scan.features.proposal_boxes import BoxSearch, ProposalConfig, _libc, crop_pixels, selective_search_boxes
from scan.features.proposals import ProposalRegions, identify_regions, load_regions

SIZE, CROP = 64, 32  # a small Lite0: 2 × 2 grid cells at 64 px, 1 × 1 at 32 px


def _pixels(n: int, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3) uint8 generated scenes (coloured shapes on a background)."""
    return np.stack([np.asarray(item.load().convert("RGB").resize((size, size), Image.BICUBIC))
                     for item in synthetic_items(n, split="train", size=96)])


def _searched(pixels: np.ndarray, cfg: ProposalConfig) -> list[np.ndarray]:
    """Reference boxes from a helper process of their own: an in-process search could be disturbed
    by threads that an earlier test left in this process drawing from the same rand() (Ray's)."""
    search = BoxSearch(cfg)
    try:
        return search(pixels)
    finally:
        search.close()


def test_boxes_are_valid_and_do_not_depend_on_earlier_images():
    """OpenCV's ranking draws from rand(), reset per image. Searched in a helper process, so that
    threads an earlier test left in this process cannot draw from the same rand() meanwhile."""
    pixels = _pixels(3, 96)
    cfg = ProposalConfig(count=12)
    search = BoxSearch(cfg)
    try:
        first = search(pixels[:1])[0]
        assert first.shape == (12, 4) and first.dtype == np.float32
        assert (first >= 0).all() and (first <= 1).all()
        assert (first[:, 2] > first[:, 0]).all() and (first[:, 3] > first[:, 1]).all()
        search(pixels[1:])
        np.testing.assert_array_equal(search(pixels[:1])[0], first)
    finally:
        search.close()


def test_box_search_is_immune_to_other_threads_drawing_from_rand():
    """Ray's core worker calls the C library's rand() on its own threads; a thread doing the same
    here stands in for it. The helper process's boxes equal those of a search made before the
    drawing starts."""
    import threading

    pixels = _pixels(8, 96)
    cfg = ProposalConfig(count=12)
    quiet = _searched(pixels, cfg)
    stop = threading.Event()

    def draw():  # ctypes releases the GIL, so these calls run beside the searches
        rand = _libc().rand
        while not stop.is_set():
            rand()

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    search = BoxSearch(cfg)
    try:
        for _ in range(2):
            for got, want in zip(search(pixels), quiet):
                np.testing.assert_array_equal(got, want)
    finally:
        stop.set()
        drawer.join()
        search.close()


def test_box_search_names_a_failure_in_its_helper():
    search = BoxSearch(ProposalConfig(count=4))
    try:
        with pytest.raises(RuntimeError, match="selective search failed in its helper process"):
            search(np.zeros((1, 8, 8), dtype=np.uint8))  # no colour channels
        assert search(_pixels(1, 96))[0].shape == (4, 4)  # the helper still serves
    finally:
        search.close()


def test_boxes_keep_the_area_and_aspect_limits_and_top_up_with_fixed_boxes():
    pixels = _pixels(1, 96)[0]
    cfg = ProposalConfig(count=40, min_area=0.2, max_aspect=2.0, nms_iou=0.3)
    boxes = selective_search_boxes(pixels, cfg)
    assert boxes.shape == (40, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    found = [i for i in range(40) if w[i] * h[i] >= 0.2 - 1e-6 and max(w[i] / h[i], h[i] / w[i]) <= 2.0 + 1e-6]
    # what the search kept passes the limits; the 3 × 3 cells that top it up are smaller, and past
    # the 17 fixed boxes the whole image repeats
    assert len(found) < 40 and (boxes[-1] == [0, 0, 1, 1]).all()
    crops = crop_pixels(pixels, boxes[:5], 48)
    assert crops.shape == (5, 48, 48, 3) and crops.dtype == np.uint8


@pytest.fixture(scope="module")
def lite0_pair():
    return (load_backbone("efficientnet-lite0", image_size=SIZE, device="cpu"),
            load_backbone("efficientnet-lite0", image_size=CROP, device="cpu"))


@pytest.mark.parametrize("mode", ["proposals", "grid+proposals"])
def test_regions_are_the_whole_image_then_each_box_encoded_alone(lite0_pair, mode):
    grid, crop = lite0_pair
    cfg = ProposalConfig(count=5, crop_size=CROP)
    regions = ProposalRegions(grid, crop, mode, cfg)
    pixels = _pixels(2)
    out = regions(pixels)
    cells = grid(pixels)
    k_grid = cells.features.shape[1] if mode == "grid+proposals" else 0
    assert out.features.shape == (2, k_grid + 1 + 5, 1280) and out.lengths.tolist() == [k_grid + 6] * 2
    assert regions.num_regions == k_grid + 6
    searched = _searched(pixels, cfg)
    for b in range(2):
        boxes = searched[b]
        if k_grid:
            torch.testing.assert_close(out.features[b, :k_grid], cells.features[b])
            torch.testing.assert_close(out.boxes[b, :k_grid], cells.boxes[b])
        torch.testing.assert_close(out.features[b, k_grid], cells.features[b].mean(0))
        assert out.boxes[b, k_grid].tolist() == [0, 0, 1, 1]
        alone = crop(crop_pixels(pixels[b], boxes, CROP)).features.mean(1)  # (5, D)
        torch.testing.assert_close(out.features[b, k_grid + 1:], alone)
        np.testing.assert_array_equal(out.boxes[b, k_grid + 1:].numpy(), boxes)
    described = regions.describe()
    assert described["regions"] == mode and described["feature_shape"] == [k_grid + 6, 1280]
    assert described["proposals"]["count"] == 5 and described["proposals"]["crop_backbone"]["preprocess"][
        "image_size"] == CROP


def test_load_regions_and_identity():
    assert identify_regions("grid", ProposalConfig()) == {}
    ident = identify_regions("grid+proposals", ProposalConfig(count=7))
    assert ident["regions"] == "grid+proposals" and ident["proposals"]["count"] == 7 and ident["opencv"]
    assert identify_regions("proposals", ProposalConfig()) != identify_regions("grid+proposals", ProposalConfig())
    extractor = load_regions("efficientnet-lite0", image_size=SIZE, regions="proposals",
                             proposals=ProposalConfig(count=3, crop_size=CROP), device="cpu")
    assert isinstance(extractor, ProposalRegions) and extractor.num_regions == 4
    with pytest.raises(ValueError, match="regions 'grid'"):
        ProposalRegions(extractor.grid, extractor.crops, "grid", ProposalConfig())


@pytest.mark.parametrize("overrides, message", [
    ({"regions": "boxes"}, "config key 'regions': 'boxes' is not allowed; expected one of 'grid', "
                           "'proposals', 'grid\\+proposals'"),
    ({"regions": "proposals", "backbone": "hf:/models/vit"}, "needs an EfficientNet backbone"),
    ({"regions": "proposals", "proposals": 0}, "proposals"),
    ({"regions": "proposals", "proposal_size": 8}, "proposal_size"),
])
def test_job_config_names_the_bad_region_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig(dest=str(tmp_path), **overrides).validate()


@pytest.mark.integration
def test_job_writes_proposal_regions_and_reuses_only_the_same_mode(tmp_path):
    from cluster.extract import run_job
    from dataio.shard_reader import read_shard
    from dataio.shards import read_manifest
    from helpers_ray import local_ray

    items = list(synthetic_items(6, split="train", size=SIZE))
    dest = tmp_path / "out"
    cfg = JobConfig(dest=str(dest), backbone="efficientnet-lite0", image_size=SIZE, regions="grid+proposals",
                    proposals=4, proposal_size=CROP, images_per_shard=3, workers=1, batch_size=2,
                    progress=False)
    with local_ray():
        first = run_job(items, cfg)
        written = {sh["name"]: {x.key: x for x in read_shard(str(dest / "train" / sh["name"]))}
                   for sh in read_manifest(str(dest / "train"))["shards"]}
        again = run_job(items, cfg)
        grid = run_job(items, JobConfig(**{**cfg.__dict__, "regions": "grid"}))
    assert first.units_failed == [] and first.images_written == 6
    assert first.extractor["regions"] == "grid+proposals" and first.extractor["feature_shape"] == [9, 1280]
    assert sorted(again.units_reused) == ["train-000000", "train-000001"] and again.units_computed == []
    assert grid.units_reused == [] and len(grid.units_computed) == 2  # another mode: not reused
    m = read_manifest(str(dest / "train"))
    assert m["feature_shape"] == [4, 1280] and "regions" not in m["extractor"]  # now the grid run's
    # the job's samples are the in-process extractor's, image by image (boxes to the bit)
    from cluster.extract_unit import extract_unit, plan_units
    extractor = load_regions("efficientnet-lite0", image_size=SIZE, regions="grid+proposals",
                             proposals=ProposalConfig(count=4, crop_size=CROP), device="cpu")
    for unit in plan_units(items, 3):
        extract_unit(extractor, unit, str(tmp_path / "local"), fingerprint="x", run_id="local")
        name = f"{unit.name}.tar"
        for ref in read_shard(str(tmp_path / "local" / "train" / name)):
            got = written[name][ref.key]
            assert got.regions.shape == (9, 1280) and got.meta["extractor"]["regions"] == "grid+proposals"
            np.testing.assert_array_equal(got.boxes, ref.boxes)
            np.testing.assert_allclose(got.regions.astype(np.float32), ref.regions.astype(np.float32),
                                       atol=2e-2, rtol=1e-2)
