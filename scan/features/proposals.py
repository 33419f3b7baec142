"""Object-like regions without a detector: selective-search boxes, each cropped and encoded
by the backbone on its own (R-CNN style), beside or instead of the backbone's grid cells.

SCAN was designed for bottom-up detector regions; no detector weights install here, so this is
the nearest object-level region set that does. Per image (`ProposalRegions`):

- region 0 is the whole image: the mean of the backbone's grid cells;
- regions 1..count are boxes from OpenCV's selective search (fast mode, run on a
  ``search_size`` copy): those covering at least ``min_area`` of the image with an aspect ratio
  of at most ``max_aspect``, kept greedily in selective-search order unless they overlap a kept
  box by IoU ``nms_iou`` or more; fewer than ``count`` are topped up with fixed boxes (the 2 × 2
  quadrants, the 3 × 3 cells, then centred boxes). Each box is cut from the backbone's input
  pixels, resized to ``crop_size`` and encoded by the same backbone at that size; its feature
  map is mean-pooled to one D-vector;
- with ``mode="grid+proposals"`` the grid cells come first (h * w of them), then the above.

docs/RESULTS.md ("Object-like regions raise both models") measured it on Flickr8k: grid +
proposals raise SCAN and VSE++ by 13 to 15 val rsum, and VSE++ stays ahead.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import torch

from scan.features.backbones import Backbone, Regions, load_backbone
from scan.features.proposal_boxes import MODES, BoxSearch, ProposalConfig, check_opencv, crop_pixels

log = logging.getLogger(__name__)


class ProposalRegions:
    """A `Backbone`'s interface (preprocess, describe(), __call__ -> Regions) over two copies of
    one backbone: at its own size for the grid, at ``crop_size`` for the boxes."""

    def __init__(self, grid: Backbone, crops: Backbone, mode: str, cfg: ProposalConfig):
        if mode not in MODES[1:]:
            raise ValueError(f"regions {mode!r}: expected one of {MODES[1:]}")
        self.grid, self.crops, self.mode, self.cfg = grid, crops, mode, cfg
        self.opencv = check_opencv()
        self.search = BoxSearch(cfg)  # a helper process, one thread: see proposal_boxes
        self.preprocess = grid.preprocess
        self.feature_dim = grid.feature_dim
        self.num_regions = (grid.num_regions if mode == "grid+proposals" else 0) + 1 + cfg.count

    @property
    def image_size(self) -> int:
        return self.grid.image_size

    def describe(self) -> dict:
        out = self.grid.describe()
        return {**out, "feature_shape": [self.num_regions, self.feature_dim], "regions": self.mode,
                "proposals": {**asdict(self.cfg), "opencv": self.opencv, "crop_backbone": self.crops.describe()}}

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> Regions:
        """pixels (B, S, S, 3) uint8 -> Regions with k = num_regions (every image the same k)."""
        pixels = np.asarray(pixels)
        self.search.submit(pixels)  # the helper searches while the grid is encoded here
        cells = self.grid(pixels)  # features (B, h*w, D)
        found = self.search.result()
        feats, boxes = [], []
        for b in range(pixels.shape[0]):
            props = found[b]  # (count, 4)
            crop = self.crops(crop_pixels(pixels[b], props, self.cfg.crop_size)).features.mean(1)  # (count, D)
            whole = cells.features[b].mean(0, keepdim=True)  # (1, D)
            f = [whole, crop]
            bx = [torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.from_numpy(props)]
            if self.mode == "grid+proposals":
                f.insert(0, cells.features[b])
                bx.insert(0, cells.boxes[b])
            feats.append(torch.cat(f))
            boxes.append(torch.cat(bx))
        n = pixels.shape[0]
        return Regions(features=torch.stack(feats), boxes=torch.stack(boxes),
                       lengths=torch.full((n,), self.num_regions, dtype=torch.int64))


def load_regions(spec: str, *, image_size: int | None = None, regions: str = "grid",
                 proposals: ProposalConfig | None = None,
                 device: str | torch.device | None = None, cut: int | str = 0) -> Backbone | ProposalRegions:
    """The extractor of one region mode: the backbone itself for ``grid`` (with its ``cut``), else
    `ProposalRegions`."""
    if cut != 0 and regions != "grid":
        raise ValueError(f"regions {regions!r} need the final features; cut={cut!r} is for the grid only")
    grid = load_backbone(spec, image_size=image_size, device=device, cut=cut)
    if regions == "grid":
        return grid
    cfg = proposals or ProposalConfig()
    crops = load_backbone(spec, image_size=cfg.crop_size, device=device)
    log.info("regions %s: %d selective-search boxes per image, each encoded at %d px", regions,
             cfg.count, cfg.crop_size)
    return ProposalRegions(grid, crops, regions, cfg)


def identify_regions(regions: str, proposals: ProposalConfig) -> dict:
    """What the region mode adds to the extraction's identity (empty for the grid)."""
    if regions == "grid":
        return {}
    # "search": shards written before the search moved to its helper process (where some boxes
    # depended on Ray's threads) are not reused as if they were these
    return {"regions": regions, "proposals": asdict(proposals), "opencv": check_opencv(),
            "search": "helper process"}
