"""Sources: Flickr8k (Karpathy JSON + images) conversion, SCAN precomp import, generated scenes."""
from __future__ import annotations

import json
import os
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from dataio.convert import convert_items, pixel_grid
from dataio.pipeline import caption_batches, image_records, iter_tokens
from dataio.shards import read_manifest
from dataio.sources.karpathy import karpathy_items
from dataio.sources.precomp import import_precomp
from dataio.sources.synthetic import COLOURS, SHAPES, position_words, synthetic_items, synthetic_samples
from dataio.text import build_vocab

def test_flickr8k_val_converts_all_1000_images(flickr8k, tmp_path):
    """The whole val split, every image with its 5 captions; train is listed in full (6,000).
    Features: a 6x6 pixel grid stand-in (real backbones are cluster/extract.py's job); the point
    here is the source and the shard set."""
    json_path, images = str(flickr8k / "dataset_flickr8k.json"), str(flickr8k / "images")
    assert len(list(karpathy_items(json_path, images, "train"))) == 6000
    items = list(karpathy_items(json_path, images, "val"))
    assert len(items) == 1000
    dest = str(tmp_path / "val")
    convert_items(items, dest, pixel_grid, split="val", extractor={"name": "pixel-grid-6"}, max_samples=250)
    m = read_manifest(dest)
    assert (m["split"], m["num_samples"], m["num_captions"], m["feature_shape"]) == ("val", 1000, 5000, [36, 48])
    back = list(image_records(dest, rank=0, world=1))
    assert [s.key for s in back] == [it.key for it in items]
    assert all(len(s.captions) == 5 and s.meta["split"] == "val" for s in back)
    assert back[0].captions == items[0].captions and back[0].meta["width"] == 224


def test_karpathy_split_selection_and_errors(flickr8k, tmp_path):
    json_path, images = str(flickr8k / "dataset_flickr8k.json"), str(flickr8k / "images")
    both = list(karpathy_items(json_path, images, ["train", "val"]))
    assert len(both) == 7000 and both[0].key == "1000268201_693b08cb0e"
    assert both[0].tokens[0][:3] == ["a", "child", "in"]
    with pytest.raises(ValueError, match=r"no images in split\(s\) \['test'\]; present: \['train', 'val'\]"):
        next(karpathy_items(json_path, images, "test"))
    with pytest.raises(FileNotFoundError, match="images\\[0\\].*no image at"):
        next(karpathy_items(json_path, str(tmp_path), "train"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "../x.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(ValueError, match="bad.json: images\\[0\\] filename '../x.jpg' does not give a safe key"):
        next(karpathy_items(str(bad), str(tmp_path), None, check_files=False))
    for filepath in ("../other", "/etc", "train2014/../../x", "..\\..\\x"):  # COCO's filepath field
        bad.write_text(json.dumps({"images": [{"filepath": filepath, "filename": "a.jpg", "split": "train",
                                               "sentences": []}]}))
        with pytest.raises(ValueError, match=r"images\[0\]: image path .* points outside the images folder"):
            next(karpathy_items(str(bad), str(tmp_path), None, check_files=False))
    bad.write_text(json.dumps({"images": [{"filepath": "val2014/./", "filename": "a.jpg", "split": "val",
                                           "sentences": [{"raw": "a b"}]}]}))
    assert next(karpathy_items(str(bad), str(tmp_path), None, check_files=False)).image == \
        os.path.join(str(tmp_path), "val2014", "a.jpg")


def _precomp(tmp_path, n: int, k: int = 36, d: int = 2048, repeat_rows: bool = False):
    rng = np.random.default_rng(0)
    ims = rng.random((n * (5 if repeat_rows else 1), k, d), dtype=np.float32)
    np.save(tmp_path / "dev_ims.npy", ims)
    words = ["dog", "runs", "a", "on", "grass", "red", "ball"]
    lines = [" ".join(rng.choice(words, size=5)).capitalize() + " ." for _ in range(5 * n)]
    (tmp_path / "dev_caps.txt").write_text("\n".join(lines) + "\n")
    return ims, lines


def test_precomp_import_is_memory_mapped(tmp_path):
    ims, lines = _precomp(tmp_path, 100)  # 29.5 MB of float32
    tracemalloc.start()
    spec = import_precomp(str(tmp_path), "dev", str(tmp_path / "shards"), max_samples=10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < ims.nbytes / 8  # never the whole array (numpy allocations are traced)
    m = read_manifest(spec)
    assert (m["num_samples"], m["num_captions"], m["feature_shape"], len(m["shards"])) == (100, 500, [36, 2048], 10)
    recs = list(image_records(spec))
    np.testing.assert_array_equal(recs[7].regions, ims[7].astype(np.float16))
    assert recs[7].captions == lines[35:40] and recs[7].key == "dev-000007"
    assert recs[7].tokens[0] == lines[35].lower().rstrip(" .").split()


def test_precomp_rows_repeated_per_caption_and_bad_counts(tmp_path):
    ims, lines = _precomp(tmp_path, 4, k=3, d=8, repeat_rows=True)  # 20 rows, 20 captions
    # one id per row: the five rows of an image carry its id (issue 10: keys took the first 4 rows')
    (tmp_path / "dev_ids.txt").write_text("\n".join(str(100 + i // 5) for i in range(20)))
    recs = list(image_records(import_precomp(str(tmp_path), "dev", str(tmp_path / "s"))))
    assert [r.key for r in recs] == ["dev-100", "dev-101", "dev-102", "dev-103"]
    np.testing.assert_array_equal(recs[2].regions, ims[10].astype(np.float16))
    assert recs[2].captions == lines[10:15]
    (tmp_path / "dev_ids.txt").write_text("\n".join(str(200 + i) for i in range(4)))  # one per image
    assert [r.key for r in image_records(import_precomp(str(tmp_path), "dev", str(tmp_path / "s1")))] \
        == ["dev-200", "dev-201", "dev-202", "dev-203"]
    (tmp_path / "dev_ids.txt").write_text("\n".join(str(100 + i) for i in range(20)))
    with pytest.raises(ValueError, match=r"dev_ids.txt: lines 1-5 are the rows of one image but name "
                                         r"different ids"):
        import_precomp(str(tmp_path), "dev", str(tmp_path / "s4"))
    (tmp_path / "dev_ids.txt").unlink()
    (tmp_path / "dev_caps.txt").write_text("one caption\n" * 7)
    with pytest.raises(ValueError, match="dev_caps.txt: 7 captions do not fit 20 rows"):
        import_precomp(str(tmp_path), "dev", str(tmp_path / "s2"))
    (tmp_path / "dev_caps.txt").write_bytes(b"ok\n" * 5 + b"caf\xe9\n")
    with pytest.raises(ValueError, match="dev_caps.txt: line 6 is not valid UTF-8"):
        import_precomp(str(tmp_path), "dev", str(tmp_path / "s3"))


def test_precomp_captions_from_karpathy_json(tmp_path):
    """COCO images have 5-7 captions; precomp files keep five. --karpathy takes them all."""
    _precomp(tmp_path, 3, k=3, d=8)
    (tmp_path / "dev_ids.txt").write_text("391895\n522418\n184613\n")
    images = [{"cocoid": cid, "filename": f"COCO_val2014_{cid:012d}.jpg", "split": "val",
               "sentences": [{"raw": f"caption {j} of {cid}", "tokens": ["caption", str(j)]}
                             for j in range(n)]}
              for cid, n in ((391895, 5), (522418, 7), (184613, 6))]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    spec = import_precomp(str(tmp_path), "dev", str(tmp_path / "s"),
                          karpathy_json=str(tmp_path / "dataset_coco.json"))
    recs = list(image_records(spec))
    assert [len(r.captions) for r in recs] == [5, 7, 6]
    assert recs[1].captions[6] == "caption 6 of 522418" and recs[1].key == "dev-522418"
    (tmp_path / "dev_ids.txt").write_text("391895\n1\n184613\n")
    with pytest.raises(ValueError, match=r"image id '1' \(line 2\) has no sentences in .*dataset_coco.json"):
        import_precomp(str(tmp_path), "dev", str(tmp_path / "s2"), karpathy_json=str(tmp_path / "dataset_coco.json"))


def test_synthetic_is_reproducible_and_grounded():
    a = list(synthetic_samples(20, seed=7, dim=32))
    b = list(synthetic_samples(20, seed=7, dim=32))
    c = list(synthetic_samples(20, seed=8, dim=32))
    assert [s.captions for s in a] == [s.captions for s in b] != [s.captions for s in c]
    np.testing.assert_array_equal(a[3].regions, b[3].regions)
    for s in a:
        assert len(set(s.captions)) == 5
        for colour, shape, cell in s.meta["objects"]:
            for cap in s.captions:  # every object is named with its colour, shape and place
                assert f"{colour} {shape}" in cap and position_words(cell) in cap
    # the region of a cell with an object is closer to that colour's other occurrences than empty cells
    from dataio.sources.synthetic import _prototypes
    proto = _prototypes(32)
    s = a[0]
    colour, shape, cell = s.meta["objects"][0]
    sims = s.regions @ proto[colour]
    assert int(np.argmax(sims)) in {o[2] for o in s.meta["objects"] if o[0] == colour}
    assert set(COLOURS) >= {o[0] for x in a for o in x.meta["objects"]}
    assert set(SHAPES) >= {o[1] for x in a for o in x.meta["objects"]}


def test_synthetic_items_render_images():
    items = list(synthetic_items(3, seed=1, split="val"))
    im = items[0].load()
    assert im.size == (96, 96) and im.mode == "RGB"
    px = np.asarray(im)
    colour, shape, cell = next(synthetic_samples(1, seed=1, split="val")).meta["objects"][0]
    r, c = divmod(cell, 3)
    centre = px[r * 32 + 16, c * 32 + 16]
    assert tuple(centre) == COLOURS[colour]  # the named colour is drawn in the named cell
    assert items[0].captions == next(synthetic_samples(1, seed=1, split="val")).captions
    import pickle

    assert pickle.loads(pickle.dumps(items[1])).load().size == (96, 96)  # ships to Ray workers


def test_generated_shards_fixture_trains_vocab(generated_shards):
    vocab = build_vocab(iter_tokens(generated_shards))
    assert {"red", "circle", "top", "left"} <= set(vocab.itos)
    bs = list(caption_batches(generated_shards, batch_size=64, encode=vocab, seed=0, epoch=0, rank=0, world=1,
                              num_workers=0))
    assert Counter(k for b in bs for k in b.keys).most_common(1)[0][1] == 5
