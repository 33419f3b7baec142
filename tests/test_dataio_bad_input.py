"""Every bad input: an error naming shard, key and problem by default; skipped and counted on request."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dataio.errors import SKIPS, DataError, SkipCounter
from dataio.pipeline import caption_batches
from dataio.shard_reader import read_shard
from dataio.shard_writer import write_manifest
from dataio.shards import ShardRecord, encode_sample
from dataio.sources.synthetic import synthetic_samples
from dataio.text import Vocab

GOOD = list(synthetic_samples(6, seed=4, dim=16))  # 6 valid samples, 5 captions each


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _write_raw(path: str, raws: list[dict]) -> None:
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tw:
        for r in raws:
            tw.write(r)


def _bad(field: str, value):
    def f(raw):
        if value is None:
            del raw[field]
        else:
            raw[field] = value
        return raw
    return f


NAN = np.ones((9, 16), np.float16)
NAN[3, 3] = np.inf
# (id, change to the 3rd sample's raw fields, problem regex, skip-counter kind)
SAMPLE_CASES = [
    ("missing_field", _bad("captions.json", None), r"missing field\(s\) \['captions.json'\]", "missing_field"),
    ("wrong_dtype", _bad("regions.npy", _npy(np.ones((9, 16), np.float32))), "dtype is float32, expected float16", "bad_array"),
    ("wrong_shape", _bad("regions.npy", _npy(np.ones((16,), np.float16))), r"non-empty \(k, D\) array", "bad_array"),
    ("wrong_dim", _bad("regions.npy", _npy(np.ones((9, 8), np.float16))), "D=8, the data set has D=16", "bad_array"),
    ("nan_inf", _bad("regions.npy", _npy(NAN)), "NaN or inf", "non_finite"),
    ("pickled", _bad("regions.npy", _npy(np.array([{"x": 1}], dtype=object))), "not a plain numeric .npy", "bad_array"),
    ("bad_boxes", _bad("boxes.npy", _npy(np.ones((3, 4), np.float32))), r"boxes must be float \(9, 4\)", "bad_array"),
    ("empty_captions", _bad("captions.json", json.dumps({"raw": [], "tokens": []}).encode()), "no captions", "bad_caption"),
    ("empty_caption", _bad("captions.json", json.dumps({"raw": ["a", " "], "tokens": [["a"], []]}).encode()), "empty caption", "bad_caption"),
    ("tokens_not_lists", _bad("captions.json", json.dumps({"raw": ["a dog"], "tokens": ["a dog"]}).encode()), "has no valid tokens", "bad_caption"),
    ("non_utf8", _bad("captions.json", b'{"raw": ["caf\xe9"], "tokens": [["caf"]]}'), "not valid UTF-8", "bad_caption"),
    ("bad_json", _bad("captions.json", b'{"raw": ['), "not valid JSON", "bad_caption"),
    ("duplicate_key", lambda raw: {**raw, "__key__": GOOD[1].key}, "duplicate key within shard", "duplicate_key"),
    ("unsafe_key", lambda raw: {**raw, "__key__": "sub/dir"}, "unsafe or invalid key", "unsafe_key"),
]


def _dataset(tmp_path, change, index: int = 2) -> tuple[str, str, str]:
    """Two shards (3 + 3 samples); ``change`` spoils sample ``index`` (default: the 3rd of the
    first shard). Returns (manifest dir, first shard URL, spoiled key)."""
    raws = [encode_sample(s) for s in GOOD]
    bad_key = raws[index]["__key__"]
    raws[index] = change(dict(raws[index]))
    recs = []
    for i, part in enumerate((raws[:3], raws[3:])):
        name = f"shard-{i:06d}.tar"
        _write_raw(str(tmp_path / name), part)
        recs.append(ShardRecord(name, 3, 0, "", [9, 16], 15, [5, 5, 5]))
    write_manifest(str(tmp_path), recs, split="train", extractor={})
    return str(tmp_path), str(tmp_path / "shard-000000.tar"), bad_key


@pytest.mark.parametrize("case,change,problem,kind", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_bad_sample_raises_or_is_skipped(tmp_path, case, change, problem, kind):
    spec, shard, key = _dataset(tmp_path, change)
    with pytest.raises(DataError, match=problem) as err:
        list(read_shard(shard, feature_dim=16))
    assert err.value.shard == shard and err.value.kind == kind
    assert err.value.key == {"duplicate_key": GOOD[1].key, "unsafe_key": "sub/dir"}.get(case, key)
    assert shard in str(err.value)

    counter = SkipCounter()
    kept = [s.key for s in read_shard(shard, feature_dim=16, on_error="skip", counter=counter)]
    assert counter.get() == {kind: 1}
    assert kept == [GOOD[0].key, GOOD[1].key]


def test_bad_sample_in_pipeline_stops_with_named_error(tmp_path):
    spec, shard, key = _dataset(tmp_path, SAMPLE_CASES[4][1])  # NaN/inf
    with pytest.raises(DataError, match=rf"shard-000000.tar.*{key}.*NaN or inf"):
        list(caption_batches(spec, batch_size=4, encode=Vocab([]), seed=0, epoch=0, rank=0, world=1, num_workers=2))
    # The workers stopped with the error, not later in a garbage collection (which could run in
    # another loader's forked worker and fail there, inside whatever that worker was doing).
    assert multiprocessing.active_children() == []


def test_skip_keeps_batch_counts_equal_and_counts_skips(tmp_path, caplog):
    spec, shard, key = _dataset(tmp_path, SAMPLE_CASES[0][1])  # missing captions.json
    SKIPS.reset()
    runs = [list(caption_batches(spec, batch_size=4, encode=Vocab([]), seed=0, epoch=0, rank=r, world=2,
                                 num_workers=2, on_error="skip")) for r in range(2)]
    assert [len(r) for r in runs] == [4, 4]  # 15 captions per rank either way
    assert [sum(len(b) for b in r) for r in runs] == [15, 15]
    assert key not in {k for r in runs for b in r for k in b.keys}
    assert SKIPS.get() == {"missing_field": 1}  # counted in a worker, merged in this process
    assert "rank 0 epoch 0: skipped 1 bad samples {'missing_field': 1}" in caplog.text


def test_skip_of_an_image_shared_by_two_workers_is_counted_once(tmp_path):
    # world 1, batch 4, 2 workers: worker roles read captions [0, 16) and [16, 30); the 4th image
    # (captions 15..19) is read by both, and counted by the one holding its first caption.
    spec, _, key = _dataset(tmp_path, SAMPLE_CASES[4][1], index=3)  # NaN/inf
    SKIPS.reset()
    batches = list(caption_batches(spec, batch_size=4, encode=Vocab([]), seed=0, epoch=0, rank=0, world=1,
                                   num_workers=2, on_error="skip", shuffle=False))
    assert len(batches) == 8 and sum(len(b) for b in batches) == 30
    assert key not in {k for b in batches for k in b.keys}
    assert SKIPS.get() == {"non_finite": 1}


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tw:
        for s in GOOD[:3]:
            tw.write(encode_sample(s))
    return buf.getvalue()


def test_truncated_tar_mid_member(tmp_path):
    data = _tar_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=r"cut.tar.*corrupt or truncated tar") as err:
        list(read_shard(str(path)))
    assert err.value.key is not None  # names the last key read before the damage
    counter = SkipCounter()
    kept = [s.key for s in read_shard(str(path), on_error="skip", counter=counter)]
    assert kept == [GOOD[0].key][: len(kept)]  # at most the intact samples before the damage
    assert counter.get() == {"corrupt_tar": 1}


def test_truncated_tar_at_member_boundary_is_caught_by_the_record_count(tmp_path):
    data = _tar_bytes()
    path = tmp_path / "cut.tar"
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    # end of the 2nd sample's last member: a valid-looking tar without its last sample
    last = [m for m in members if m.name.startswith(GOOD[1].key)][-1]
    end = last.offset_data + ((last.size + 511) // 512) * 512
    path.write_bytes(data[:end])
    assert len(list(read_shard(str(path)))) == 2  # tarfile alone cannot tell
    with pytest.raises(DataError, match="truncated: 2 samples, the record says 3"):
        list(read_shard(str(path), expected=3))


def test_corrupt_tar_header(tmp_path):
    data = bytearray(_tar_bytes())
    data[512 * 6: 512 * 6 + 200] = os.urandom(200)  # garbage over a later member's header
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad.tar.*corrupt or truncated tar"):
        list(read_shard(str(path)))


def test_member_names_never_become_paths(tmp_path):
    """A tar member ``../evil.regions.npy`` is only ever a key to reject; nothing is extracted."""
    raw = encode_sample(GOOD[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for field in ("regions.npy", "captions.json", "meta.json"):
            ti = tarfile.TarInfo(f"../evil.{field}")
            ti.size = len(raw[field])
            tf.addfile(ti, io.BytesIO(raw[field]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.tar").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="unsafe or invalid key"):
        list(read_shard(str(out / "x.tar")))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["x.tar"]


def test_skip_with_nothing_valid_stops_instead_of_spinning(tmp_path):
    raws = [_bad("regions.npy", _npy(NAN))(encode_sample(s)) for s in GOOD[:3]]
    _write_raw(str(tmp_path / "shard-000000.tar"), raws)
    write_manifest(str(tmp_path), [ShardRecord("shard-000000.tar", 3, 0, "", [9, 16], 15, [5, 5, 5])],
                   split="train", extractor={})
    for resampled in (False, True):
        with pytest.raises(DataError, match="no valid samples|without valid samples"):
            list(caption_batches(str(tmp_path), batch_size=4, encode=Vocab([]), seed=0, epoch=0, rank=0, world=1,
                                 num_workers=0, on_error="skip", resampled=resampled))
