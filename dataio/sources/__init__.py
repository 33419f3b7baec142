"""Data sources: what people have (Karpathy JSON + images, SCAN precomp, generated scenes).

Image sources yield :class:`ImageItem` for the feature extractor (``cluster/extract.py``); the
precomp source and the generated region features go straight to shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from dataio import storage


@dataclass
class ImageItem:
    key: str  # image id, a safe name (becomes the shard sample's __key__)
    image: str | Callable[[], Image.Image]  # a local path or s3:// URL, or a picklable loader
    captions: list[str]
    tokens: list[list[str]]
    split: str
    meta: dict = field(default_factory=dict)

    def load(self) -> Image.Image:
        """The image as RGB (a path is opened here, so items stay cheap to ship to workers)."""
        if callable(self.image):
            return self.image().convert("RGB")
        with storage.open_url(self.image, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
