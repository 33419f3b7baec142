"""Image items -> shards with a feature function, serially (tests, demos, small sets).

The Ray extraction job (``cluster/extract.py``) does the same in parallel with a real backbone.
:func:`pixel_grid` is a cheap stand-in feature (a downsampled pixel grid), not a visual model.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataio.shard_writer import ShardWriter, write_manifest
from dataio.shards import ImageSample, ShardRecord
from dataio.sources import ImageItem

log = logging.getLogger(__name__)

# image -> (regions (k, D) float32, boxes (k, 4) float32 or None)
Featurizer = Callable[[Image.Image], tuple[np.ndarray, np.ndarray | None]]


def pixel_grid(image: Image.Image, grid: int = 6, cell: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``grid * grid`` regions, each the RGB pixels of one cell at ``cell x cell`` resolution
    scaled to [0, 1]: regions (grid², 3 * cell²), boxes (grid², 4)."""
    px = np.asarray(image.convert("RGB").resize((grid * cell, grid * cell), Image.BILINEAR), np.float32) / 255
    # (grid*cell, grid*cell, 3) -> (grid, cell, grid, cell, 3) -> (grid, grid, cell, cell, 3)
    regions = px.reshape(grid, cell, grid, cell, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    r, c = np.divmod(np.arange(grid * grid), grid)
    boxes = (np.stack([c, r, c + 1, r + 1], axis=1) / grid).astype(np.float32)
    return regions, boxes


def convert_items(items: Iterable[ImageItem], dest: str, featurize: Featurizer, *, split: str,
                  extractor: dict, max_samples: int = 1000, total: int | None = None) -> list[ShardRecord]:
    """Featurize every item and write a fresh shard set plus manifest at ``dest``."""
    with ShardWriter(dest, split=split, max_samples=max_samples) as w:
        for item in tqdm(items, total=total, desc=f"convert {split}", unit="img"):
            image = item.load()
            regions, boxes = featurize(image)
            meta = {**item.meta, "split": item.split, "width": image.width, "height": image.height,
                    "extractor": extractor.get("name")}
            w.write(ImageSample(item.key, regions, item.captions, item.tokens, boxes, meta))
    write_manifest(dest, w.records, split=split, extractor=extractor)
    log.info("wrote %d images in %d shards to %s", sum(r.samples for r in w.records), len(w.records), dest)
    return w.records
