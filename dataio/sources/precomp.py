"""SCAN's precomputed bottom-up features (``data/{f30k,coco}_precomp``) imported into shards.

``{split}_ims.npy`` is (N, 36, 2048) float32 (7 GB for COCO): it is memory-mapped and read one
image at a time, never loaded whole. ``{split}_caps.txt`` has one caption per line, five per image
in image order. Some precomp splits store every image five times (one row per caption, VSE++'s
``im_div = 5``); then every fifth row is used. ``{split}_ids.txt``, when present, gives image ids:
one line per image, or one per row in the repeated layout (the five lines of an image agree).

COCO's Karpathy images carry 5-7 captions, the precomp files only five: with ``karpathy_json``
(``dataset_coco.json``) each image takes all of its captions from that file instead, matched by its
id (``cocoid``, else the file name's stem, else ``imgid``). Evaluation uses the first five.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from tqdm import tqdm

from dataio.npy import open_npy
from dataio.shard_writer import ShardWriter, write_manifest
from dataio.shards import ImageSample, manifest_url
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
    lines = [ln.strip() for ln in text.splitlines()]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _image_ids(path: str, n_img: int, row_step: int) -> list[str] | None:
    """One id per image from ``{split}_ids.txt`` (per image, or per row of the repeated layout)."""
    if not os.path.exists(path):
        return None
    ids = _read_lines(path)
    if len(ids) == n_img:
        return ids
    if row_step > 1 and len(ids) == n_img * row_step:
        for i in range(n_img):
            group = ids[i * row_step:(i + 1) * row_step]
            if len(set(group)) != 1:
                raise ValueError(f"{path}: lines {i * row_step + 1}-{(i + 1) * row_step} are the rows "
                                 f"of one image but name different ids {group}")
        return ids[::row_step]
    raise ValueError(f"{path}: {len(ids)} ids for {n_img} images"
                     + (f" ({n_img * row_step} rows)" if row_step > 1 else ""))


def _karpathy_captions(json_path: str) -> dict[str, list[dict]]:
    """Image id -> its sentences, under every id a precomp file may use for it."""
    from dataio.sources.karpathy import load_karpathy

    by_id: dict[str, list[dict]] = {}
    for im in load_karpathy(json_path)["images"]:
        for key in (im.get("cocoid"), os.path.splitext(im.get("filename", ""))[0], im.get("imgid")):
            if key is not None and key != "":
                by_id.setdefault(str(key), im.get("sentences", []))
    return by_id


def import_precomp(data_dir: str, split: str, dest: str, *, max_samples: int = 1000,
                   max_bytes: int = 1 << 30, karpathy_json: str | None = None) -> str:
    """Write ``split`` of a precomp directory as shards + manifest at ``dest``; returns the manifest URL."""
    ims_path = os.path.join(data_dir, f"{split}_ims.npy")
    caps_path = os.path.join(data_dir, f"{split}_caps.txt")
    ims = open_npy(ims_path)  # (rows, k, D), stays on disk
    if ims.ndim != 3 or ims.dtype.kind != "f":
        raise ValueError(f"{ims_path}: expected a float (N, k, D) array, got {ims.dtype} {ims.shape}")
    caps = _read_lines(caps_path)
    if len(caps) == CAPS_PER_IMAGE * len(ims):
        n_img, row_step = len(ims), 1
    elif len(caps) == len(ims) and len(ims) % CAPS_PER_IMAGE == 0:
        n_img, row_step = len(ims) // CAPS_PER_IMAGE, CAPS_PER_IMAGE
    else:
        raise ValueError(f"{caps_path}: {len(caps)} captions do not fit {len(ims)} rows of {ims_path} "
                         f"({CAPS_PER_IMAGE} captions per image)")
    ids_path = os.path.join(data_dir, f"{split}_ids.txt")
    ids = _image_ids(ids_path, n_img, row_step)
    sentences = None
    if karpathy_json:
        if ids is None:
            raise ValueError(f"--karpathy needs {ids_path} to match the precomp images to {karpathy_json}")
        sentences = _karpathy_captions(karpathy_json)
    with ShardWriter(dest, split=split, max_samples=max_samples, max_bytes=max_bytes) as w:
        for i in tqdm(range(n_img), desc=f"precomp {split}", unit="img"):
            raw = caps[i * CAPS_PER_IMAGE:(i + 1) * CAPS_PER_IMAGE]
            tokens = [tokenize(c) for c in raw]
            if sentences is not None:
                found = sentences.get(ids[i])
                if not found:
                    raise ValueError(f"{ids_path}: image id {ids[i]!r} (line {i + 1}) has no "
                                     f"sentences in {karpathy_json}")
                raw = [s["raw"] for s in found]
                tokens = [s.get("tokens") or tokenize(s["raw"]) for s in found]
            key = f"{split}-{ids[i]}" if ids is not None else f"{split}-{i:06d}"
            regions = np.array(ims[i * row_step])  # copies this image only (float16 stays float16)
            w.write(ImageSample(key, regions, raw, tokens,
                                meta={"source": f"precomp:{os.path.basename(os.path.normpath(data_dir))}",
                                      "split": split, "row": i * row_step}))
    write_manifest(dest, w.records, split=split,
                   extractor={"name": "precomp", "source": os.path.abspath(data_dir), "version": 1})
    return manifest_url(dest)
