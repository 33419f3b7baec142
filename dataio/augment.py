"""Training-time augmentation of stored pixels (shards extracted with ``cut=all``), as VSE∞
augments images for grid features: a random crop of 0.6 to 1.0 of each side at a random place,
resized back to the backbone's input size (size augmentation), and a left-right flip with
probability 0.5. It runs in the data layer's workers (`dataio.pipeline.caption_batches`,
``augment``), on each image of a batch once, drawn from (seed, epoch, rank, batch, image key), so a
batch is the same whichever worker makes it. VSE∞'s other size augmentation, dropping grid cells,
is ``model.region_dropout``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from dataio.errors import DataError
from dataio.shards import ImageSample


@dataclass(frozen=True)
class PixelAugment:
    size: int  # the stored pixels are (size * size, 3), row-major, normalised
    seed: int = 0
    min_crop: float = 0.6  # VSE∞: crop ratio random() * 0.4 + 0.6 of each side
    flip: float = 0.5

    def rng(self, key: str, epoch: int, rank: int, batch: int) -> np.random.Generator:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        return np.random.default_rng([self.seed, epoch, rank, batch, h])

    def __call__(self, sample: ImageSample, rng: np.random.Generator) -> ImageSample:
        s = self.size
        if sample.regions.shape != (s * s, 3):
            raise DataError("augment", sample.key, f"expected stored pixels ({s * s}, 3) of a {s} x {s} "
                            f"image (cut=all), got {sample.regions.shape}", "bad_array")
        x = torch.from_numpy(sample.regions.astype(np.float32)).view(s, s, 3).permute(2, 0, 1)[None]
        side = max(1, int(s * rng.uniform(self.min_crop, 1.0)))
        y0, x0 = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        x = F.interpolate(x[:, :, y0:y0 + side, x0:x0 + side], size=(s, s), mode="bilinear",
                          align_corners=False)
        if rng.random() < self.flip:
            x = x.flip(-1)
        return replace(sample, regions=x[0].permute(1, 2, 0).reshape(s * s, 3).numpy())
