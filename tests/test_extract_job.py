"""The extraction job on a local Ray: shards, reruns, bad images, a killed actor, S3 output;
its config (`cluster.extract_config`) and the `scan extract` command line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scan.features.backbones import load_backbone
from scan.configfile import ConfigError
from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.extract_unit import FAULT_ENV, plan_units
from dataio import storage
from dataio.shard_reader import read_shard
from dataio.shards import read_manifest
from dataio.sources import ImageItem
from dataio.sources.synthetic import synthetic_items
from helpers_ray import local_ray as start_local_ray


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """One local Ray for the module (its workers inherit the S3 test environment)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with start_local_ray():
        yield


def _cfg(dest, backbone: str, **kw) -> JobConfig:
    kw = {"images_per_shard": 4, "workers": 1, "batch_size": 4, "progress": False, **kw}
    return JobConfig(dest=str(dest), backbone=backbone, **kw)


def _read_all(dest: str, split: str) -> dict:
    """key -> sample for every sample the split's manifest lists; asserts no key appears twice."""
    m = read_manifest(storage.join(dest, split))
    out = {}
    for shard in m["shards"]:
        for s in read_shard(storage.join(storage.join(dest, split), shard["name"])):
            assert s.key not in out, f"{s.key} appears twice"
            out[s.key] = s
    assert len(out) == m["num_samples"]
    return out


def _items(n_train: int, n_val: int = 0) -> list[ImageItem]:
    return list(synthetic_items(n_train, split="train")) + list(synthetic_items(n_val, split="val"))


def test_plan_units_is_deterministic_per_split():
    items = _items(5, 3)
    units = plan_units(items, 2)
    assert [u.name for u in units] == ["train-000000", "train-000001", "train-000002",
                                       "val-000000", "val-000001"]
    assert [len(u.items) for u in units] == [2, 2, 1, 2, 1]
    assert [u.fingerprint({"x": 1}) for u in units] == [u.fingerprint({"x": 1}) for u in plan_units(items, 2)]
    assert units[0].fingerprint({"x": 1}) != units[0].fingerprint({"x": 2})
    with pytest.raises(ValueError, match="images_per_shard must be >= 1, got 0"):
        plan_units(items, 0)


@pytest.mark.integration
def test_local_ray_extracts_every_image_once_and_reruns_reuse(local_ray, tiny_vit, tmp_path):
    items = _items(10, 5)
    dest = tmp_path / "out"
    summary = run_job(items, _cfg(dest, f"hf:{tiny_vit}", workers=2))
    assert summary.units_failed == [] and summary.units_reused == [] and summary.workers == 2
    assert sorted(summary.units_computed) == ["train-000000", "train-000001", "train-000002",
                                              "val-000000", "val-000001"]
    assert summary.images_computed == 15 == summary.images_written and summary.images_per_second > 0
    bb = load_backbone(tiny_vit, device="cpu")
    for split, n in (("train", 10), ("val", 5)):
        m = read_manifest(str(dest / split))
        assert m["extractor"]["digest"] == bb.digest and m["feature_shape"] == [16, 24]
        assert m["extraction"]["images_written"] == n and m["extraction"]["skipped_images"] == []
        samples = _read_all(str(dest), split)
        want = {it.key: it for it in items if it.split == split}
        assert set(samples) == set(want)
        for key, s in samples.items():
            assert s.regions.shape == (16, 24) and s.boxes.shape == (16, 4)
            assert s.captions == want[key].captions and s.tokens == want[key].tokens
            assert s.meta["extractor"]["digest"] == bb.digest and s.meta["split"] == split
            assert s.meta["extractor"]["preprocess"]["image_size"] == 32
        # The stored features are the backbone's own, up to float16.
        key = sorted(samples)[0]
        from dataio.images import decode_image
        pixels = decode_image(want[key].image(), size=32).pixels[None]
        np.testing.assert_allclose(samples[key].regions.astype(np.float32), bb(pixels).features[0].numpy(),
                                   atol=2e-2, rtol=1e-2)

    shard = dest / "train" / "train-000001.tar"
    mtime = shard.stat().st_mtime_ns
    again = run_job(items, _cfg(dest, f"hf:{tiny_vit}"))
    assert again.units_computed == [] and len(again.units_reused) == 5 and again.images_written == 15
    assert shard.stat().st_mtime_ns == mtime

    # A different unit size changes every unit: all recomputed, old shards gone, still once each.
    third = run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=3))
    assert len(third.units_computed) == 6 and third.units_reused == []
    assert set(_read_all(str(dest), "train")) == {it.key for it in items if it.split == "train"}
    assert sorted(p.name for p in (dest / "train").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]


def _odd_images(root: Path) -> list[ImageItem]:
    """Items over odd files, in units of three: convertible ones first, the last unit all broken."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "rgb.jpg")
    Image.fromarray(noise).convert("L").save(root / "gray.jpg")
    Image.fromarray(noise).convert("CMYK").save(root / "cmyk.jpg")
    alpha = np.dstack([noise, rng.integers(0, 256, (48, 64), dtype=np.uint8)])
    Image.fromarray(alpha, "RGBA").save(root / "alpha.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "tiny.png")
    Image.new("RGB", (10000, 8000), (120, 60, 30)).save(root / "huge.jpg", quality=30)
    (root / "trunc.jpg").write_bytes((root / "rgb.jpg").read_bytes()[:300])
    (root / "garbage.png").write_bytes(b"GIF89a but not really")
    names = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "alpha.png", "tiny.png", "huge.jpg",
             "trunc.jpg", "garbage.png", "missing.jpg"]
    items = [ImageItem(name.replace(".", "_"), str(root / name),
                       [f"caption {i} of {name}" for i in range(5)],
                       [["caption", str(i), "of", name] for i in range(5)], "train", {"source": "odd"})
             for name in names]
    items[0].captions[4], items[0].tokens[4] = " ", []  # an empty caption: dropped, image kept
    return items


@pytest.mark.integration
def test_bad_images_are_converted_or_skipped_with_reasons(local_ray, tiny_vit, tmp_path):
    (tmp_path / "img").mkdir()
    items = _odd_images(tmp_path / "img")
    dest = tmp_path / "out"
    summary = run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=3))
    assert summary.units_failed == [] and len(summary.units_computed) == 3  # the job did not die
    skipped = {Path(s["file"]).name: s["reason"] for s in summary.skipped}
    assert set(skipped) == {"trunc.jpg", "garbage.png", "missing.jpg"}
    assert skipped["trunc.jpg"].startswith("corrupt") and skipped["garbage.png"].startswith("unreadable")
    assert "No such file" in skipped["missing.jpg"]
    converted = {Path(c["file"]).name: c["note"] for c in summary.converted}
    assert converted == {"gray.jpg": "L -> RGB", "cmyk.jpg": "CMYK -> RGB",
                         "alpha.png": "RGBA with alpha -> RGB over white", "tiny.png": "tiny 1x1 upscaled"}

    samples = _read_all(str(dest), "train")
    assert set(samples) == {"rgb_jpg", "gray_jpg", "cmyk_jpg", "alpha_png", "tiny_png", "huge_jpg"}
    assert (samples["huge_jpg"].meta["width"], samples["huge_jpg"].meta["height"]) == (10000, 8000)
    assert samples["cmyk_jpg"].meta["converted"] == "CMYK -> RGB"
    m = read_manifest(str(dest / "train"))
    assert m["num_captions"] == 29  # captions of skipped images are not written ...
    assert samples["rgb_jpg"].captions == [f"caption {i} of rgb.jpg" for i in range(4)]
    ext = m["extraction"]
    assert ext["images_in"] == 9 and ext["images_written"] == 6 and ext["captions_dropped"] == 16
    assert ext["bad_captions"] == [{"key": "rgb_jpg", "caption": " "}]
    assert {Path(s["file"]).name for s in ext["skipped_images"]} == set(skipped)  # ... and say so
    # The all-broken unit has no shard; its stats mark it done, so a rerun reuses everything.
    assert [s["name"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=3)).units_computed == []


@pytest.mark.integration
def test_actor_killed_mid_unit_still_gives_every_image_once(local_ray, tiny_vit, tmp_path, monkeypatch):
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")  # an actor exits hard half-way through its 2nd unit
    items = _items(16)
    dest = tmp_path / "out"
    summary = run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=2, max_retries=1))
    assert marker.exists()
    assert summary.units_failed == [] and len(summary.units_computed) == 8
    stats = [json.loads(p.read_text()) for p in (dest / "train" / "_units").glob("*.json")]
    retried = [s for s in stats if s["attempt"] == 1]
    assert len(retried) == 1  # exactly the unit the dead actor was writing, redone elsewhere
    assert len({s["pid"] for s in stats}) == 2  # the replacement actor did the rest
    assert set(_read_all(str(dest), "train")) == {it.key for it in items}
    assert not [p for p in (dest / "train").iterdir() if ".tmp-" in p.name]  # partial file removed


@pytest.mark.integration
def test_unit_failing_every_attempt_is_reported_and_no_manifest(local_ray, tiny_vit, tmp_path):
    dest = tmp_path / "out"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "train-000001.tar").mkdir()  # the shard's rename target cannot be replaced
    summary = run_job(_items(8), _cfg(dest, f"hf:{tiny_vit}", max_retries=1))
    assert [f["unit"] for f in summary.units_failed] == ["train-000001"]
    assert summary.units_failed[0]["attempts"] == 2 and summary.manifests == []
    assert summary.units_failed[0]["error"].startswith(("IsADirectoryError", "OSError"))
    assert not (dest / "train" / "manifest.json").exists()
    assert summary.units_computed == ["train-000000"]


@pytest.mark.integration
def test_writes_shards_to_s3(local_ray, tiny_vit, s3_server):
    bucket = s3_server.make_bucket()
    dest = f"{bucket}/features/syn"
    items = _items(6, 2)
    summary = run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=3))
    assert summary.units_failed == [] and summary.manifests == [f"{dest}/train/manifest.json",
                                                                f"{dest}/val/manifest.json"]
    assert set(_read_all(dest, "train")) == {it.key for it in items if it.split == "train"}
    assert set(_read_all(dest, "val")) == {it.key for it in items if it.split == "val"}
    listing = storage.listdir(f"{dest}/train")
    assert not [n for n in listing if ".tmp-" in n]
    assert run_job(items, _cfg(dest, f"hf:{tiny_vit}", images_per_shard=3)).units_computed == []


def _scan_extract(*args: str) -> int:
    """`scan extract ARGS` in this process (no Ray is started by input it refuses)."""
    from app.cli import main

    return main(["extract", *args])


def test_cli_refuses_bad_input_before_starting_ray(tmp_path, capsys):
    assert _scan_extract("source.synthetic=2", "backbone=resnet9000", f"dest={tmp_path}") == 2
    assert "unknown backbone 'resnet9000'" in capsys.readouterr().err
    (tmp_path / "k.json").write_text('{"images": [{"filename": "../x.jpg", "split": "train"}]}')
    assert _scan_extract(f"source.karpathy={tmp_path / 'k.json'}", f"source.images={tmp_path}",
                         f"dest={tmp_path}") == 2
    assert "k.json: images[0]" in capsys.readouterr().err
    assert _scan_extract("source.synthetic=2", "images_per_shard=0", f"dest={tmp_path}") == 2
    assert "config key 'images_per_shard': 0 is not allowed; expected >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    # the old name of images_per_shard is an unknown key, and the message lists the allowed ones
    (["source.synthetic=2", "dest=x", "images_per_unit=3"],
     ["unknown config key 'images_per_unit'", "images_per_shard"]),
    (["source.synthetic=2", "dest=x", "source.synth=3"], ["unknown config key 'source.synth'", "synthetic"]),
    (["source.synthetic=2", "dest=x", "batch_size=many"], ["config key 'batch_size'", "'many'", "expected int"]),
    (["source.synthetic=2", "dest=x", "use_gpu=maybe"], ["config key 'use_gpu'", "'maybe'", "bool"]),
    (["source.synthetic=2", "dest=x", "workers=-1"], ["config key 'workers'", "-1", ">= 0"]),
    (["source.synthetic=2", "dest=x", "image_size=0"], ["config key 'image_size'", ">= 1"]),
    (["source.synthetic=2", "dest=x", "source.splits=train,val"],
     ["config key 'source.splits'", "source.splits=[train,val]"]),
    (["dest=x"], ["exactly one source", "source.karpathy", "source.synthetic", "neither"]),
    (["source.synthetic=2", "source.karpathy=k.json", "dest=x"], ["exactly one source", "both"]),
    (["source.karpathy=k.json", "dest=x"], ["config key 'source.images' is not set"]),
    (["source.synthetic=2"], ["config key 'dest' is not set"]),
    (["source.synthetic=2", "dest"], ["'dest' is not of the form key=value"]),
])
def test_config_errors_name_the_key_and_value(args, words, capsys):
    from cluster.extract_config import load_extraction

    with pytest.raises(ConfigError) as err:
        load_extraction(None, args)
    for word in words:
        assert word in str(err.value)
    assert _scan_extract(*args) == 2  # the command line says the same, exit code 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("scan extract: error: ") and all(word in stderr for word in words)


def test_config_errors_name_the_file_and_the_local_paths(tmp_path):
    from cluster.extract_config import load_extraction

    bad = tmp_path / "bad.yaml"
    bad.write_text("source:\n  synthetic: 2\ndest: out\nimages_per_shard: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'images_per_shard': 'lots' is not allowed"):
        load_extraction(bad)
    with pytest.raises(ConfigError, match="no/such.yaml does not exist"):
        load_extraction("no/such.yaml")
    (tmp_path / "k.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config key 'source.images': '.*nowhere' is not a directory"):
        load_extraction(None, [f"source.karpathy={tmp_path / 'k.json'}", f"source.images={tmp_path / 'nowhere'}",
                               "dest=x"])
    with pytest.raises(ConfigError, match=r"config key 'source.karpathy': '.*missing.json' is not a file"):
        load_extraction(None, [f"source.karpathy={tmp_path / 'missing.json'}", f"source.images={tmp_path}",
                               "dest=x"])
    with pytest.raises(ConfigError, match="'source.images'.*not allowed with source.synthetic"):
        load_extraction(None, ["source.synthetic=2", f"source.images={tmp_path}", "dest=x"])
    # s3:// sources are not checked here (one request each); the workers report what is missing
    cfg = load_extraction(None, ["source.karpathy=s3://b/k.json", "source.images=s3://b/img", "dest=s3://b/out"])
    assert cfg.source.images == "s3://b/img"


def test_job_config_is_checked_by_run_job_too(tmp_path):
    with pytest.raises(ConfigError, match="config key 'batch_size': 0 is not allowed; expected >= 1"):
        run_job(_items(2), JobConfig(dest=str(tmp_path), batch_size=0))
    with pytest.raises(ConfigError, match="config key 'dest' is not set"):
        run_job(_items(2), JobConfig())


def test_yaml_and_overrides_fill_the_typed_config(tmp_path):
    from cluster.extract_config import ExtractionConfig, SourceConfig, load_extraction

    repo = Path(__file__).resolve().parents[1]
    shipped = repo / "configs" / "extract.yaml"
    # configs/extract.yaml is every key at its dataclass default
    cfg = load_extraction(shipped, ["source.synthetic=3", "dest=out"])
    assert cfg == ExtractionConfig(dest="out", source=SourceConfig(synthetic=3))
    (tmp_path / "k.json").write_text("{}")
    cfg = load_extraction(shipped, [f"source.karpathy={tmp_path / 'k.json'}", f"source.images={tmp_path}",
                                    "dest=s3://b/x", "images_per_shard=500", "source.splits=[train,val]",
                                    "image_size=300", "address=127.0.0.1:6379", "use_gpu=false"])
    assert (cfg.source.splits, cfg.images_per_shard, cfg.image_size, cfg.address, cfg.use_gpu) == (
        ["train", "val"], 500, 300, "127.0.0.1:6379", False)
    assert isinstance(cfg, JobConfig)  # run_job takes the whole config


def test_shipped_yaml_is_generated_from_the_schema():
    """Defaults and their documentation are written once, in cluster/extract_config.py."""
    from cluster.extract_config import template_yaml

    repo = Path(__file__).resolve().parents[1]
    assert (repo / "configs" / "extract.yaml").read_text() == template_yaml(), (
        "regenerate: .venv/bin/python -m cluster.extract_config > configs/extract.yaml")


def test_help_lists_every_key_with_its_default(capsys):
    from app.cli import main
    from cluster.extract_config import ExtractionConfig
    from scan import configfile

    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "key=value" in out
    keys = configfile.keys(ExtractionConfig)
    assert {k.name for k in keys} >= {"source.karpathy", "source.images", "source.synthetic", "dest",
                                      "images_per_shard", "summary_json"}
    for k in keys:
        assert f"{k.name}={json.dumps(k.default)}" in out, k.name
        assert k.help and k.help in out
    assert "images_per_shard=256" in out and 'backbone="efficientnet-lite2"' in out
