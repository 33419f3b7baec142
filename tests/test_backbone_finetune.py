"""Fine-tuning the image backbone (issue 35): cut activations in the shards (``scan extract ...
cut=K``), the backbone's top in the model (``model.image.finetune_blocks``), its param group and
frozen epochs, the cut checked against the config, a dest of another extractor refused, the
whole backbone trained from stored pixels with augmentation, and evaluation / retrieval / pictures
of such a run refusing shards of another cut. Lite0 runs at 32 to 64 px here (224 px once)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cluster.extract import run_job
from cluster.extract_config import JobConfig
from cluster.extract_unit import extract_unit, plan_units
from dataio.augment import PixelAugment
from dataio.shard_reader import read_shard
from dataio.shards import ImageSample, read_manifest
from dataio.sources import ImageItem
from dataio.sources.synthetic import synthetic_items
from scan.config import ExperimentConfig, ImageBackboneConfig
from scan.configfile import ConfigError
from scan.features.backbone_top import (BackboneTop, check_cut, image_config_for_training,
                                        shards_extractor)
from scan.features.backbones import identify, load_backbone
from scan.features.proposals import identify_regions
from scan.model import build_model
from trainer.engine import EpochStepLR, param_groups

LITE = "efficientnet-lite0"


def _extract(dest, items, *, cut, size=64, images_per_shard=4) -> None:
    """Shards and manifests as `scan extract` writes them: every unit in this process (no Ray),
    then `run_job` finds them all done and writes the manifests."""
    cfg = JobConfig(dest=str(dest), backbone=LITE, image_size=size, cut=cut,
                    images_per_shard=images_per_shard, progress=False)
    identity = {**identify(LITE, size, cut), **identify_regions("grid", cfg.proposal_config())}
    backbone = load_backbone(LITE, image_size=size, device="cpu", cut=cut)
    for unit in plan_units(items, images_per_shard):
        extract_unit(backbone, unit, str(dest), fingerprint=unit.fingerprint(identity), run_id="t",
                     identity=identity)
    summary = run_job(items, cfg)
    assert summary.units_computed == [] and summary.units_failed == [], summary


@pytest.fixture(scope="module")
def cut1(tmp_path_factory):
    """Lite0 at 64 px, cut 1: 12 train and 6 val scenes (one unreadable image) -> (dest, items)."""
    items = list(synthetic_items(12, split="train", size=64)) + list(synthetic_items(6, split="val", size=64))
    items.append(ImageItem("broken", b"not an image", ["a broken picture"], [["a", "broken", "picture"]],
                           "train", {}))
    dest = tmp_path_factory.mktemp("cut1")
    _extract(dest, items, cut=1)
    return dest, items


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """The same scenes as stored pixels (cut all) at 32 px, and as final features (cut 0)."""
    items = list(synthetic_items(12, split="train", size=32)) + list(synthetic_items(6, split="val", size=32))
    out = tmp_path_factory.mktemp("pixels")
    _extract(out / "all", items, cut="all", size=32, images_per_shard=6)
    _extract(out / "k0", items, cut=0, size=32, images_per_shard=6)
    return out


def test_top_blocks_on_cut_activations_reproduce_the_final_features():
    """fp32: the last K blocks and the head over the activations before them give the K = 0
    features within 1e-4 (224 px, K = 1: the 7 x 7 x 192 input of Lite0's last block)."""
    rng = np.random.default_rng(0)
    for size, cut in ((224, 1), (64, 5), (32, "all")):
        px = rng.integers(0, 256, (1 if size == 224 else 3, size, size, 3), dtype=np.uint8)
        want = load_backbone(LITE, image_size=size, device="cpu")(px).features
        bottom = load_backbone(LITE, image_size=size, device="cpu", cut=cut)
        d = bottom.describe()
        if size == 224:
            assert d["cut_shape"] == [7, 7, 192] and d["feature_shape"] == [49, 192]
        got = bottom(px)
        assert got.boxes is None and got.features.shape[1:] == tuple(d["feature_shape"])
        top = BackboneTop(LITE, size, cut, tuple(d["cut_shape"]))
        with torch.no_grad():
            out = top(got.features)
        assert out.shape == want.shape
        assert float((out - want).abs().max()) <= 1e-4, (size, cut)


def test_other_backbones_say_they_support_no_cut(tiny_vit):
    check_cut(f"hf:{tiny_vit}", 0)
    with pytest.raises(ValueError, match=r"supports no cut \(cut=1\).*EfficientNet-Lite"):
        check_cut(f"hf:{tiny_vit}", 1)
    with pytest.raises(ConfigError, match=r"config key 'cut': 'all' is not allowed: backbone 'hf:.*supports no cut"):
        JobConfig(dest="x", backbone=f"hf:{tiny_vit}", cut="all").validate()
    with pytest.raises(ConfigError, match=r"cut=17 is not allowed for backbone 'efficientnet-lite0': it has 16 blocks"):
        JobConfig(dest="x", backbone=LITE, cut=17).validate()
    with pytest.raises(ConfigError, match=r"'regions': 'proposals' is not allowed with cut=1"):
        JobConfig(dest="x", backbone=LITE, cut=1, regions="proposals").validate()


def test_cut_shards_hold_fp16_activations_with_identity_and_cut(cut1):
    dest, items = cut1
    m = read_manifest(str(dest / "train"))
    ex = m["extractor"]
    assert ex["name"] == LITE and ex["cut"] == 1 and ex["cut_shape"] == [2, 2, 192]
    assert ex["digest"] == identify(LITE)["files_digest"] and m["identity"]["cut"] == 1
    assert m["feature_shape"] == [4, 192] and m["num_samples"] == 12  # the broken image left out
    assert [s["key"] for s in m["extraction"]["skipped_images"]] == ["broken"]
    samples = [s for shard in m["shards"] for s in read_shard(str(dest / "train" / shard["name"]))]
    assert len({s.key for s in samples}) == 12
    bottom = load_backbone(LITE, image_size=64, device="cpu", cut=1)
    from dataio.images import decode_image
    first = next(it for it in items if it.key == samples[0].key)
    want = bottom(decode_image(first.image(), size=64).pixels[None]).features[0].numpy()
    for s in samples:
        assert s.regions.dtype == np.float16 and s.boxes is None
        assert s.meta["extractor"]["cut"] == 1 and s.meta["extractor"]["digest"] == ex["digest"]
    np.testing.assert_allclose(samples[0].regions.astype(np.float32), want, rtol=1e-3, atol=1e-2)


def test_a_dest_of_another_cut_or_backbone_is_refused_and_the_same_resumes(cut1, tmp_path):
    dest, items = cut1
    before = {p.name: p.stat().st_mtime_ns for p in (dest / "train").glob("*.tar")}
    for kw, old, new in (({"cut": 2}, f"{LITE} cut=1", f"{LITE} cut=2"),
                         ({"cut": 0}, f"{LITE} cut=1", f"{LITE} cut=0"),
                         ({"backbone": "efficientnet-lite2", "cut": 1}, "efficientnet-lite0 cut=1",
                          "efficientnet-lite2 cut=1")):
        cfg = JobConfig(dest=str(dest), **{"backbone": LITE, "image_size": 64, "images_per_shard": 4,
                                           "progress": False, **kw})
        with pytest.raises(ConfigError, match=rf"already holds shards of backbone={old}.*this job "
                                              rf"extracts backbone={new}"):
            run_job(items, cfg)
    again = run_job(items, JobConfig(dest=str(dest), backbone=LITE, image_size=64, cut=1,
                                     images_per_shard=4, progress=False))
    assert again.units_computed == [] and len(again.units_reused) == 6  # 4 train units + 2 val
    assert before == {p.name: p.stat().st_mtime_ns for p in (dest / "train").glob("*.tar")}


def _finetune_cfg(dest, k) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data.train_shards, cfg.data.val_shards = str(dest / "train"), str(dest / "val")
    cfg.model.img_dim, cfg.model.embed_size, cfg.model.word_dim = 0, 16, 8
    cfg.model.image = ImageBackboneConfig(finetune_blocks=k, frozen_epochs=1)
    return cfg


def test_a_cut_other_than_the_configs_is_an_error_naming_both(cut1):
    dest, _ = cut1
    cfg = image_config_for_training(_finetune_cfg(dest, 1))
    img = cfg.model.image
    assert (img.backbone, img.image_size, img.cut_shape) == (LITE, 64, [2, 2, 192])
    for k in (2, 0, "all"):
        with pytest.raises(ValueError, match=rf"'data.train_shards'=.*shards of {LITE} with cut=1, but "
                                             rf"config key 'model.image.finetune_blocks' is {k!r}"):
            image_config_for_training(_finetune_cfg(dest, k))


def test_the_model_runs_the_top_with_frozen_batchnorm_its_own_lr_and_frozen_epochs(cut1):
    dest, _ = cut1
    cfg = image_config_for_training(_finetune_cfg(dest, 1))
    model = build_model(cfg.model, vocab_size=20).train()
    top = model.backbone_top
    assert top is not None and not top.training and top.cells == 4 and top.out_dim == 1280
    x = torch.randn(3, 4, 192).relu()  # 2 x 2 x 192 at 64 px: the last block keeps the grid
    stats = top.blocks[0]._bn1.running_mean.clone()
    out = model.encode_images(x, torch.full((3,), 4))
    assert out.shape == (3, 4, 16) and model.image_output_lens(torch.full((3,), 4)).tolist() == [4, 4, 4]
    out.sum().backward()
    assert torch.equal(stats, top.blocks[0]._bn1.running_mean)  # BatchNorm statistics frozen
    assert top.head[0].weight.grad is not None and float(top.head[0].weight.grad.norm()) > 0
    groups = param_groups(cfg, model)
    img = next(g for g in groups if "frozen_epochs" in g)
    assert {id(p) for p in img["params"]} == {id(p) for p in top.parameters()}
    assert img["lr"] == pytest.approx(cfg.optim.lr * 0.1)
    sched = EpochStepLR(torch.optim.Adam(groups), lr_update=[15], lr_decay=0.1, warmup_steps=0)
    sched.set_epoch(0)
    assert [g["lr"] for g in sched.optimizer.param_groups][-1] == 0.0  # frozen during epoch 0
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)
    sched.set_epoch(1)
    assert sched.optimizer.param_groups[-1]["lr"] == pytest.approx(cfg.optim.lr * 0.1)


def test_pixel_augmentation_crops_resizes_and_flips_deterministically():
    s = 8
    img = np.arange(s * s * 3, dtype=np.float32).reshape(s * s, 3) / 100
    sample = ImageSample("k", img.astype(np.float16), ["a"], [["a"]])
    aug = PixelAugment(s, seed=3, min_crop=1.0, flip=1.0)  # no crop, always flipped
    out = aug(sample, aug.rng("k", 0, 0, 0)).regions.reshape(s, s, 3)
    np.testing.assert_allclose(out, img.astype(np.float16).astype(np.float32).reshape(s, s, 3)[:, ::-1], atol=1e-6)
    aug = PixelAugment(s, seed=3)
    a = aug(sample, aug.rng("k", 1, 0, 2)).regions
    assert np.array_equal(a, aug(sample, aug.rng("k", 1, 0, 2)).regions)  # same draw, same pixels
    assert not np.array_equal(a, aug(sample, aug.rng("k", 2, 0, 2)).regions)
    with pytest.raises(Exception, match=r"expected stored pixels \(64, 3\)"):
        aug(dataclasses.replace(sample, regions=img[:10]), aug.rng("k", 0, 0, 0))


def test_whole_backbone_trains_from_pixels_and_its_run_refuses_shards_of_another_cut(pixels, tmp_path):
    """K = all on CPU: a few steps of the whole Lite0 on generated 32 px scenes with the workers'
    augmentation; then evaluate, retrieve and explain read the run from pixel shards and refuse
    final-feature shards (cut 0) of the same scenes."""
    from helpers_dist import run_train
    from tools.inference import evaluate_runs, find_record, gallery_for_runs, load_run

    wrong = run_train(str(pixels / "all" / "train"), tmp_path / "wrong", "model.image.finetune_blocks=1",
                      "model.img_dim=0", "train.epochs=1")
    assert wrong.returncode != 0 and not (tmp_path / "wrong" / "checkpoints").exists()
    assert ("shards of efficientnet-lite0 with cut='all', but config key 'model.image.finetune_blocks' is 1"
            in wrong.stderr), wrong.stderr[-2000:]
    out = tmp_path / "run"
    proc = run_train(str(pixels / "all" / "train"), out, f"data.val_shards={pixels / 'all' / 'val'}",
                     "model.image.finetune_blocks=all", "model.img_dim=0", "train.epochs=1",
                     "data.batch_size=6", "eval.val_images=0", "model.image.lr_scale=0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rsum" in json.dumps(x) for x in lines)
    run = load_run(out)
    assert run.cfg.model.image.cut_shape == [32, 32, 3] and run.model.backbone_top.stem is not None
    val_all, val_k0 = str(pixels / "all" / "val"), str(pixels / "k0" / "val")
    result = evaluate_runs([str(out)], val_all, out_dir=str(tmp_path / "eval"))
    assert np.isfinite(result.metrics["rsum"])
    assert find_record(val_all, None, run).regions.shape == (32 * 32, 3)
    for call in (lambda: evaluate_runs([str(out)], val_k0), lambda: gallery_for_runs([str(out)], val_k0),
                 lambda: find_record(val_k0, None, run)):
        with pytest.raises(ValueError, match=r"shards of efficientnet-lite0 with cut=0, but config key "
                                             r"'model.image.finetune_blocks' is 'all'"):
            call()
    assert shards_extractor(val_k0)["cut"] == 0


def test_the_workers_augment_stored_pixels(pixels):
    from dataio.pipeline import caption_batches

    spec = str(pixels / "all" / "train")

    def first(augment):
        loader = caption_batches(spec, batch_size=6, encode=lambda tokens, raw: [1, 2], seed=0, epoch=0,
                                 num_workers=1, shuffle=False, augment=augment)
        return next(iter(loader)).regions

    plain, aug = first(None), first(PixelAugment(32, seed=0))
    assert aug.shape == plain.shape == (6, 32 * 32, 3)
    assert not torch.equal(aug, plain) and torch.equal(aug, first(PixelAugment(32, seed=0)))
