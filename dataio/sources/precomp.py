"""SCAN's precomputed bottom-up features (``data/{f30k,coco}_precomp``) imported into shards.

``{split}_ims.npy`` is (N, 36, 2048) float32 (7 GB for COCO): it is memory-mapped and read one
image at a time, never loaded whole. ``{split}_caps.txt`` has one caption per line, five per image
in image order. Some precomp splits store every image five times (one row per caption, VSE++'s
``im_div = 5``); then every fifth row is used. ``{split}_ids.txt``, when present, gives image ids.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from tqdm import tqdm

from dataio.shards import ImageSample, ShardWriter, manifest_url, write_manifest
from dataio.text import tokenize

log = logging.getLogger(__name__)

CAPS_PER_IMAGE = 5


def _read_lines(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8") from e
    return [ln.strip() for ln in text.splitlines()]


def import_precomp(data_dir: str, split: str, dest: str, *, max_samples: int = 1000,
                   max_bytes: int = 1 << 30) -> str:
    """Write ``split`` of a precomp directory as shards + manifest at ``dest``; returns the manifest URL."""
    ims_path = os.path.join(data_dir, f"{split}_ims.npy")
    caps_path = os.path.join(data_dir, f"{split}_caps.txt")
    ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)  # (rows, k, D), stays on disk
    if ims.ndim != 3 or ims.dtype.kind != "f":
        raise ValueError(f"{ims_path}: expected a float (N, k, D) array, got {ims.dtype} {ims.shape}")
    caps = _read_lines(caps_path)
    if caps and caps[-1] == "":
        caps.pop()
    if len(caps) == CAPS_PER_IMAGE * len(ims):
        n_img, row_step = len(ims), 1
    elif len(caps) == len(ims) and len(ims) % CAPS_PER_IMAGE == 0:
        n_img, row_step = len(ims) // CAPS_PER_IMAGE, CAPS_PER_IMAGE
    else:
        raise ValueError(f"{caps_path}: {len(caps)} captions do not fit {len(ims)} rows of {ims_path} "
                         f"({CAPS_PER_IMAGE} captions per image)")
    ids_path = os.path.join(data_dir, f"{split}_ids.txt")
    ids = _read_lines(ids_path)[:n_img] if os.path.exists(ids_path) else None
    if ids is not None and len(ids) != n_img:
        raise ValueError(f"{ids_path}: {len(ids)} ids for {n_img} images")
    with ShardWriter(dest, split=split, max_samples=max_samples, max_bytes=max_bytes) as w:
        for i in tqdm(range(n_img), desc=f"precomp {split}", unit="img"):
            raw = caps[i * CAPS_PER_IMAGE:(i + 1) * CAPS_PER_IMAGE]
            key = f"{split}-{ids[i]}" if ids is not None else f"{split}-{i:06d}"
            regions = np.asarray(ims[i * row_step], dtype=np.float32)  # copies this image only
            w.write(ImageSample(key, regions, raw, [tokenize(c) for c in raw],
                                meta={"source": f"precomp:{os.path.basename(os.path.normpath(data_dir))}",
                                      "split": split, "row": i * row_step}))
    write_manifest(dest, w.records, split=split,
                   extractor={"name": "precomp", "source": os.path.abspath(data_dir), "version": 1})
    return manifest_url(dest)
