"""Karpathy's split files (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k*.json``)
plus an image folder, as :class:`ImageItem` for the feature extractor.

Layout: ``{"dataset": ..., "images": [{"filename", "filepath"? (COCO), "split", "imgid",
"cocoid"?, "sentences": [{"raw", "tokens"}, ...]}, ...]}``; images live at
``image_root/[filepath/]filename``. SCAN trains COCO on ``train`` + ``restval``: pass both splits.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Iterable, Iterator

from dataio import storage
from dataio.shards import _SAFE_KEY
from dataio.sources import ImageItem
from dataio.text import tokenize


def load_karpathy(json_path: str) -> dict:
    try:
        d = json.loads(storage.read_bytes(json_path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path}: not valid UTF-8 JSON: {e}") from e
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise ValueError(f"{json_path}: key 'images' (a list) is missing: not a Karpathy split file")
    return d


def _image_path(image_root: str, filepath: str, filename: str, where: str) -> str:
    """``image_root/[filepath/]filename``, refusing any that would point outside ``image_root``
    (an absolute path, or ``..`` components): a split file must not make the job read elsewhere."""
    if not isinstance(filepath, str) or not isinstance(filename, str):
        raise ValueError(f"{where}: filepath and filename must be strings")
    rel = posixpath.normpath(posixpath.join(filepath, filename).replace("\\", "/"))
    if rel.startswith("/") or rel == ".." or rel.startswith("../") or os.path.isabs(filepath):
        raise ValueError(f"{where}: image path {posixpath.join(filepath, filename)!r} (filepath "
                         f"{filepath!r}, filename {filename!r}) points outside the images folder "
                         f"{image_root}")
    return storage.join(image_root, rel)  # also fine for s3:// roots


def karpathy_items(json_path: str, image_root: str, splits: str | Iterable[str] | None = None,
                   *, check_files: bool = True) -> Iterator[ImageItem]:
    """Items of the given split(s) (``None``: all), in file order. The tokens are the file's own
    (Karpathy's tokenisation; :func:`dataio.text.tokenize` where a sentence lacks them)."""
    d = load_karpathy(json_path)
    wanted = {splits} if isinstance(splits, str) else (set(splits) if splits is not None else None)
    present = {im.get("split") for im in d["images"]}
    if wanted is not None and not wanted & present:
        raise ValueError(f"{json_path}: no images in split(s) {sorted(wanted)}; present: {sorted(map(str, present))}")
    dataset = d.get("dataset", os.path.basename(json_path))
    for i, im in enumerate(d["images"]):
        if wanted is not None and im.get("split") not in wanted:
            continue
        try:
            filename, sentences = im["filename"], im["sentences"]
        except KeyError as e:
            raise ValueError(f"{json_path}: images[{i}] lacks key {e}") from e
        key = os.path.splitext(filename)[0]
        if not _SAFE_KEY.match(key):
            raise ValueError(f"{json_path}: images[{i}] filename {filename!r} does not give a safe key")
        path = _image_path(image_root, im.get("filepath", ""), filename, f"{json_path}: images[{i}]")
        if check_files and not storage.is_s3(path) and not os.path.isfile(path):  # one HEAD per image on S3: skipped
            raise FileNotFoundError(f"{json_path}: images[{i}] ({filename!r}): no image at {path}")
        raws = [s["raw"] for s in sentences]
        tokens = [s.get("tokens") or tokenize(s["raw"]) for s in sentences]
        meta = {"source": f"karpathy:{dataset}", "filename": filename, "imgid": im.get("imgid")}
        if "cocoid" in im:
            meta["cocoid"] = im["cocoid"]
        yield ImageItem(key, path, raws, tokens, im["split"], meta)
