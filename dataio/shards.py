"""Shard format: one WebDataset sample per image, per-shard records, the manifest's names.

A data set directory (local or ``s3://bucket/prefix``) holds, for one split:

- ``<prefix>-000000.tar`` ... : samples ``<key>.regions.npy`` (k, D) float16, optional
  ``<key>.boxes.npy`` (k, 4) float32, optional ``<key>.saliency.npy`` (k,) float32 in [0, 1] (one
  value per region, for saliency-guided models), ``<key>.captions.json`` ``{"raw": [...], "tokens": [[...]]}``,
  ``<key>.meta.json``;
- ``<shard>.tar.json``: the shard's :class:`ShardRecord`, written only after the shard itself is in
  place, so a record marks a committed shard (resumable extraction jobs skip those);
- ``manifest.json``: written last; lists exactly the shards of the data set.

Writing is ``dataio.shard_writer``, reading ``dataio.shard_reader``; both check samples here.
"""
from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataio import storage
from dataio.errors import DataError
from dataio.npy import load_npy

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"
FORMAT = "scan-shards/1"
RECORD_SUFFIX = ".json"  # record of shard "x.tar" is "x.tar.json"
# Keys become tar member names and, downstream, file names: no separators, no dots, no "..".
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]{0,199}$")
_FIELDS = ("regions.npy", "captions.json", "meta.json")


@dataclass
class ImageSample:
    key: str  # image id; becomes __key__
    regions: np.ndarray  # (k, D) float16 in shards; the writer converts float32
    captions: list[str]  # raw captions
    tokens: list[list[str]]  # tokenised captions (dataio.text.tokenize or the source's own)
    boxes: np.ndarray | None = None  # (k, 4) float32, normalised x0, y0, x1, y1
    meta: dict = field(default_factory=dict)  # source, width, height, split, extractor...
    saliency: np.ndarray | None = None  # (k,) float32 in [0, 1]: each region's saliency


@dataclass
class ShardRecord:
    """Per-shard stats; ``caption_counts[i]`` is the number of captions of the shard's i-th image."""

    name: str  # file name relative to the data set directory, e.g. "shard-000003.tar"
    samples: int
    bytes: int
    sha256: str
    feature_shape: list[int]  # [k_max, D]
    captions: int
    caption_counts: list[int]
    created: float = 0.0
    # Byte boundaries of the samples in the tar: sample i is [offsets[i], offsets[i + 1]) (its
    # members' headers and padded data), so training can read any image by range. None in records
    # written before offsets were kept: :func:`sample_offsets` then reads them from the tar.
    offsets: list[int] | None = None
    # Every sample of the shard carries saliency.npy (records written before the field: False).
    saliency: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ShardRecord":
        optional = {"created": 0.0, "offsets": None, "saliency": False}
        try:
            kw = {k: d[k] for k in cls.__dataclass_fields__ if k not in optional}
            rec = cls(**kw, **{k: d.get(k, v) for k, v in optional.items()})
        except (KeyError, TypeError) as e:
            raise DataError(source, None, f"invalid shard record: {e!r}", "bad_record") from e
        if rec.offsets is not None and len(rec.offsets) != rec.samples + 1:
            raise DataError(source, None, f"invalid shard record: {len(rec.offsets)} offsets for "
                            f"{rec.samples} samples (expected samples + 1)", "bad_record")
        return rec


# ---------------------------------------------------------------------------------------------
# sample encoding and validation (shared by writer and reader)


def check_key(key: Any, shard: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise DataError(shard, str(key), "unsafe or invalid key (allowed: letters, digits, _ + -; "
                        "no '/', '.', '..'; at most 200 characters)", "unsafe_key")
    return key


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # exponent bits all ones = inf/NaN; ~7x faster than np.isfinite here
        return not ((a.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(a).all())


def check_sample(s: ImageSample, shard: str, feature_dim: int | None = None) -> None:
    """Raise :class:`DataError` unless ``s`` is well formed (shapes, finiteness, captions)."""
    check_key(s.key, shard)
    r = s.regions
    if not isinstance(r, np.ndarray) or r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise DataError(shard, s.key, f"regions must be a non-empty (k, D) array, got "
                        f"{getattr(r, 'shape', type(r).__name__)}", "bad_array")
    if r.dtype not in (np.float16, np.float32, np.float64):
        raise DataError(shard, s.key, f"regions dtype must be float16/32, got {r.dtype}", "bad_array")
    if feature_dim is not None and r.shape[1] != feature_dim:
        raise DataError(shard, s.key, f"regions have D={r.shape[1]}, the data set has D={feature_dim}",
                        "bad_array")
    if not _all_finite(r):
        raise DataError(shard, s.key, "regions contain NaN or inf", "non_finite")
    if r.dtype != np.float16 and np.abs(r).max() > np.finfo(np.float16).max:
        raise DataError(shard, s.key, "regions overflow float16 (|x| > 65504)", "non_finite")
    if s.boxes is not None:
        b = s.boxes
        if not isinstance(b, np.ndarray) or b.shape != (r.shape[0], 4) or b.dtype.kind != "f":
            raise DataError(shard, s.key, f"boxes must be float ({r.shape[0]}, 4), got "
                            f"{getattr(b, 'dtype', '?')} {getattr(b, 'shape', '?')}", "bad_array")
        if not np.isfinite(b).all():
            raise DataError(shard, s.key, "boxes contain NaN or inf", "non_finite")
    if s.saliency is not None:
        a = s.saliency
        if not isinstance(a, np.ndarray) or a.shape != (r.shape[0],) or a.dtype.kind != "f":
            raise DataError(shard, s.key, f"saliency must be float ({r.shape[0]},), one value per region, "
                            f"got {getattr(a, 'dtype', '?')} {getattr(a, 'shape', '?')}", "bad_array")
        if not np.isfinite(a).all() or float(a.min()) < 0.0 or float(a.max()) > 1.0:
            raise DataError(shard, s.key, "saliency values must be finite and in [0, 1]", "non_finite")
    if not s.captions:
        raise DataError(shard, s.key, "no captions", "bad_caption")
    if len(s.tokens) != len(s.captions):
        raise DataError(shard, s.key, f"{len(s.captions)} captions but {len(s.tokens)} token lists",
                        "bad_caption")
    for raw, toks in zip(s.captions, s.tokens):
        if not isinstance(raw, str) or not raw.strip():
            raise DataError(shard, s.key, f"empty caption {raw!r}", "bad_caption")
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and t for t in toks):
            raise DataError(shard, s.key, f"caption {raw!r} has no valid tokens: {toks!r}",
                            "bad_caption")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(s: ImageSample) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {
        "__key__": s.key,
        "regions.npy": _npy_bytes(np.ascontiguousarray(s.regions, dtype=np.float16)),
        "captions.json": json.dumps({"raw": s.captions, "tokens": s.tokens}).encode(),
        "meta.json": json.dumps(s.meta, sort_keys=True).encode(),
    }
    if s.boxes is not None:
        out["boxes.npy"] = _npy_bytes(np.ascontiguousarray(s.boxes, dtype=np.float32))
    if s.saliency is not None:
        out["saliency.npy"] = _npy_bytes(np.ascontiguousarray(s.saliency, dtype=np.float32))
    return out


def _load_npy(data: bytes, shard: str, key: str, name: str) -> np.ndarray:
    try:  # never unpickle what a shard contains
        return load_npy(data)
    except ValueError as e:
        raise DataError(shard, key, f"{name} is not a plain numeric .npy: {e}", "bad_array") from e
    except Exception as e:  # truncated header, bad magic
        raise DataError(shard, key, f"{name} is unreadable: {e!r}", "bad_array") from e


def _load_json(data: bytes, shard: str, key: str, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(shard, key, f"{name} is not valid UTF-8: {e}", "bad_caption") from e
    except json.JSONDecodeError as e:
        raise DataError(shard, key, f"{name} is not valid JSON: {e}", "bad_caption") from e


def decode_sample(raw: dict[str, Any], shard: str, feature_dim: int | None = None) -> ImageSample:
    """A validated :class:`ImageSample` from a WebDataset sample dict of bytes."""
    key = check_key(raw.get("__key__"), shard)
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise DataError(shard, key, f"missing field(s) {missing}", "missing_field")
    regions = _load_npy(raw["regions.npy"], shard, key, "regions.npy")
    if regions.dtype != np.float16:
        raise DataError(shard, key, f"regions.npy dtype is {regions.dtype}, expected float16",
                        "bad_array")
    boxes = _load_npy(raw["boxes.npy"], shard, key, "boxes.npy") if "boxes.npy" in raw else None
    saliency = (_load_npy(raw["saliency.npy"], shard, key, "saliency.npy") if "saliency.npy" in raw
                else None)
    caps = _load_json(raw["captions.json"], shard, key, "captions.json")
    if not (isinstance(caps, dict) and isinstance(caps.get("raw"), list)
            and isinstance(caps.get("tokens"), list)):
        raise DataError(shard, key, "captions.json must be {\"raw\": [...], \"tokens\": [[...]]}",
                        "bad_caption")
    meta = _load_json(raw["meta.json"], shard, key, "meta.json")
    if not isinstance(meta, dict):
        raise DataError(shard, key, "meta.json must be an object", "bad_caption")
    s = ImageSample(key, regions, caps["raw"], caps["tokens"], boxes, meta, saliency)
    check_sample(s, shard, feature_dim)
    return s


# ---------------------------------------------------------------------------------------------
# the manifest


def manifest_url(spec: str) -> str:
    return spec if spec.endswith(".json") else storage.join(spec, MANIFEST)


def read_manifest(dest_or_manifest_url: str) -> dict:
    """The manifest of a data set directory (or the manifest URL itself), checked."""
    url = manifest_url(dest_or_manifest_url)
    try:
        m = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FileNotFoundError(_no_manifest(dest_or_manifest_url, url)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(url, None, f"manifest is not valid JSON: {e}", "bad_record") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise DataError(url, None, f"not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})",
                        "bad_record")
    return m


def _no_manifest(spec: str, url: str) -> str:
    """Why ``spec`` has no manifest, naming what was given (``x/manifest.jsn`` is not a folder)."""
    expected = f"expected a manifest .json, a folder holding {MANIFEST}, or a pattern of .tar shards"
    if url == spec:
        return f"no manifest at {url}"
    fs = storage.filesystem(spec)
    if not fs.exists(spec):
        return f"{spec} does not exist ({expected})"
    if not fs.isdir(spec):
        return f"{spec} is a file, not a manifest ({expected})"
    return f"no manifest at {url}"
