"""Generated captioned scenes: coloured shapes in a 3 x 3 grid, five captions per image.

Every caption word is grounded in a region: the colour and shape words in the cell holding the
object, the position words ("top left", "center", ...) in the cell's place. Two outputs:

- :func:`synthetic_items`: rendered RGB images (for the real feature extractor);
- :func:`synthetic_samples`: ready region features without any CNN, one region per grid cell,
  ``feature = position[cell] + colour[c] + shape[s] + noise`` (empty cells: position + noise), so
  cross attention has something real to learn in seconds on a CPU.

Everything is a function of ``(seed, split, index)``: reproducible and independent of ``n``.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from dataio.shard_writer import ShardWriter, write_manifest
from dataio.shards import ImageSample, manifest_url
from dataio.sources import ImageItem
from dataio.text import tokenize

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
GRID = 3
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
_FEATURE_SEED = 20180101  # fixed: every split and seed shares one feature space


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int  # row * GRID + col


def position_words(cell: int) -> str:
    r, c = divmod(cell, GRID)
    if (r, c) == (1, 1):
        return "center"
    if r == 1:
        return f"middle {COLS[c]}"
    if c == 1:
        return f"{ROWS[r]} center"
    return f"{ROWS[r]} {COLS[c]}"


_TEMPLATES = (
    "a {c} {s} in the {p}",
    "there is a {c} {s} at the {p}",
    "the {p} has a {c} {s}",
    "a {c} {s} sits in the {p} of the picture",
    "one {c} {s} near the {p}",
)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_scene(rng: np.random.Generator) -> tuple[Obj, ...]:
    n = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    return tuple(Obj(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], int(c))
                 for c in cells)


def scene_captions(scene: tuple[Obj, ...], rng: np.random.Generator) -> list[str]:
    """Five different captions; each names every object (shuffled order, varied templates)."""
    caps = []
    for t in rng.permutation(len(_TEMPLATES)):
        parts = [_TEMPLATES[(t + j) % len(_TEMPLATES)].format(c=o.colour, s=o.shape, p=position_words(o.cell))
                 for j, o in enumerate(scene[i] for i in rng.permutation(len(scene)))]
        caps.append(" and ".join(parts))
    return caps


def render(scene: tuple[Obj, ...], size: int = 96, jitter_seed: int = 0) -> Image.Image:
    """The scene as an RGB image, shapes slightly jittered in size and place."""
    rng = np.random.default_rng(jitter_seed)
    im = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(im)
    cell = size / GRID
    for o in scene:
        r, c = divmod(o.cell, GRID)
        half = cell * rng.uniform(0.28, 0.42)
        cx, cy = (c + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell, (r + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        box = (cx - half, cy - half, cx + half, cy + half)
        if o.shape == "circle":
            draw.ellipse(box, fill=COLOURS[o.colour])
        elif o.shape == "square":
            draw.rectangle(box, fill=COLOURS[o.colour])
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLOURS[o.colour])
    return im


def _key(split: str, i: int) -> str:
    return f"syn-{split}-{i:06d}"


def _scene_and_captions(seed: int, split: str, i: int) -> tuple[tuple[Obj, ...], list[str]]:
    rng = _rng(seed, split, i)
    scene = make_scene(rng)
    return scene, scene_captions(scene, rng)


def synthetic_items(n: int, *, seed: int = 0, split: str = "train", size: int = 96) -> Iterator[ImageItem]:
    """``n`` rendered scenes as :class:`ImageItem` (the loader renders on demand and pickles)."""
    for i in range(n):
        scene, caps = _scene_and_captions(seed, split, i)
        yield ImageItem(_key(split, i), functools.partial(render, scene, size, seed * 1_000_003 + i),
                        caps, [tokenize(c) for c in caps], split,
                        {"source": "synthetic", "width": size, "height": size, "seed": seed})


def _prototypes(dim: int) -> dict[str, np.ndarray]:
    """Unit vectors for every colour, shape and cell position, fixed for a given ``dim``."""
    rng = np.random.default_rng(_FEATURE_SEED)
    names = list(COLOURS) + list(SHAPES) + [f"cell{c}" for c in range(GRID * GRID)]
    v = rng.normal(size=(len(names), dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return dict(zip(names, v))


def region_features(scene: tuple[Obj, ...], dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(9, dim) float32: one region per grid cell (row-major)."""
    proto = _prototypes(dim)
    feats = np.stack([proto[f"cell{c}"] * 0.5 for c in range(GRID * GRID)])
    for o in scene:
        feats[o.cell] += proto[o.colour] + proto[o.shape]
    return (feats + noise * rng.normal(size=feats.shape)).astype(np.float32)


def cell_boxes() -> np.ndarray:
    """(9, 4) float32 normalised x0, y0, x1, y1 of the grid cells (row-major)."""
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    return (np.stack([c, r, c + 1, r + 1], axis=1) / GRID).astype(np.float32)


def synthetic_samples(n: int, *, seed: int = 0, split: str = "train", dim: int = 64,
                      noise: float = 0.1) -> Iterator[ImageSample]:
    """``n`` scenes as shard samples with generated region features (no images, no CNN)."""
    for i in range(n):
        scene, caps = _scene_and_captions(seed, split, i)
        feats = region_features(scene, dim, noise, _rng(seed + 1, split, i))
        yield ImageSample(_key(split, i), feats, caps, [tokenize(c) for c in caps], cell_boxes(),
                          {"source": "synthetic", "split": split, "seed": seed,
                           "objects": [[o.colour, o.shape, o.cell] for o in scene]})


def write_synthetic(dest: str, n: int, *, seed: int = 0, split: str = "train", dim: int = 64,
                    noise: float = 0.1, shard_size: int = 100) -> str:
    """Write ``n`` generated samples as a shard set at ``dest``; returns the manifest URL."""
    with ShardWriter(dest, split=split, max_samples=shard_size) as w:
        for s in synthetic_samples(n, seed=seed, split=split, dim=dim, noise=noise):
            w.write(s)
    write_manifest(dest, w.records, split=split,
                   extractor={"name": "synthetic-grid", "dim": dim, "noise": noise, "version": 1})
    return manifest_url(dest)
