"""The image backbone split at a cut: its bottom writes cut activations into the shards, its top
fine-tunes with the matcher (``scan extract ... cut=K``, ``model.image.finetune_blocks: K``).

A cut ``K`` splits an EfficientNet-Lite before its last K MBConv blocks:

- ``K = 0``: the whole backbone is the bottom; the shards hold today's final cells (7 × 7 × 1280
  for Lite0 at 224 px);
- ``0 < K <= blocks``: the shards hold the activations entering block ``blocks - K`` (Lite0, 224 px:
  7 × 7 × 192 for K = 1 to 4, 14 × 14 × 112 for K = 5 to 7, ...), and `BackboneTop` runs those K
  blocks and the head conv (with its BatchNorm and activation) in the model;
- ``K = "all"``: the shards hold the preprocessed pixels ((x - 127) / 128 of the uint8 values, exact
  in fp16), and the top is the whole backbone (stem, every block, head).

The top is built from the same weight package as the extraction (its digest is checked against
the shards' manifest) and always runs in eval mode: its BatchNorm statistics stay frozen and drop
connect is off, as VSE∞ fine-tunes a backbone with frozen BatchNorm.

Transformers backbones (``hf:``) support no cut: only ``cut=0`` (their final features).
"""
from __future__ import annotations

import contextlib
import io
from typing import Literal, Union

import torch
from torch import nn

ALL = "all"
Cut = Union[int, Literal["all"]]


def is_lite(spec: str) -> bool:
    from scan.features.backbones import _LITE  # the one list of Lite names

    return spec in _LITE


def lite_network(name: str, image_size: int | None = None, *, weights: bool = True) -> nn.Module:
    """The package's EfficientNet-Lite (ImageNet weights from its weight package unless
    ``weights`` is False), in eval mode; ``image_size`` fixes its TF-"same" padding."""
    from efficientnet_lite_pytorch import EfficientNet

    from scan.features.backbones import _LITE, _lite_weights

    size = image_size or _LITE[name][2]
    if not weights:
        return EfficientNet.from_name(name, image_size=size).eval()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(name, weights_path=str(_lite_weights(name)),
                                           image_size=size).eval()


def check_cut(spec: str, cut: Cut) -> None:
    """Raise ValueError, naming the backbone and the cut, unless ``spec`` supports ``cut``."""
    if cut == 0:
        return
    if not is_lite(spec):
        raise ValueError(f"backbone {spec!r} supports no cut (cut={cut!r}); only cut=0, its final "
                         "features: cut activations need an EfficientNet-Lite backbone "
                         "(efficientnet-lite0, efficientnet-lite2)")
    if cut == ALL:
        return
    if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
        raise ValueError(f"cut {cut!r} is not allowed; expected an integer >= 0 or 'all'")
    blocks = len(lite_network(spec, weights=False)._blocks)
    if cut > blocks:
        raise ValueError(f"cut={cut} is not allowed for backbone {spec!r}: it has {blocks} blocks "
                         f"(cut 0 to {blocks}, or 'all' for the pixels)")


def _start(model: nn.Module, cut: Cut) -> int:
    """Index of the first block of the top."""
    return 0 if cut == ALL else len(model._blocks) - int(cut)


def _drop_rates(model: nn.Module) -> list[float]:
    """Each block's drop-connect rate, as the package's extract_features passes them."""
    rate, n = model._global_params.drop_connect_rate, len(model._blocks)
    return [rate * i / n if rate else rate for i in range(n)]


class LiteBottom(nn.Module):
    """Normalised pixels (B, 3, S, S) → the activations entering the last ``cut`` blocks
    (B, C, h, w); with ``cut="all"`` the pixels themselves."""

    def __init__(self, model: nn.Module, cut: Cut):
        super().__init__()
        self.model, self.cut = model, cut
        self.stop = _start(model, cut)
        self.rates = _drop_rates(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut == ALL:
            return x
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        for i in range(self.stop):
            x = m._blocks[i](x, drop_connect_rate=self.rates[i])
        return x


class BackboneTop(nn.Module):
    """The last ``cut`` blocks and the head of an EfficientNet-Lite over cut activations:
    (B, h * w, C) row-major cells (or (B, S * S, 3) pixels) → (B, rows * cols, out_dim) final cells.

    Always in eval mode (``train()`` keeps it there): BatchNorm uses and keeps its ImageNet
    statistics, and drop connect is off, so a step's result does not depend on the batch split
    over ranks."""

    def __init__(self, name: str, image_size: int, cut: Cut, in_shape: tuple[int, int, int],
                 model: nn.Module | None = None):
        super().__init__()
        if cut == 0:
            raise ValueError("BackboneTop needs a cut > 0 ('all' or a block count)")
        check_cut(name, cut)
        model = model if model is not None else lite_network(name, image_size)
        start = _start(model, cut)
        self.name, self.cut, self.in_shape = name, cut, tuple(int(v) for v in in_shape)
        self.stem = nn.ModuleList([model._conv_stem, model._bn0]) if cut == ALL else None
        self.blocks = nn.ModuleList(model._blocks[start:])
        self.rates = _drop_rates(model)[start:]
        self.head = nn.ModuleList([model._conv_head, model._bn1])
        self.act = model._swish
        self.out_dim = model._bn1.num_features
        with torch.no_grad():
            h, w, c = self.in_shape
            out = self._run(torch.zeros(1, c, h, w))
        self.grid = (int(out.shape[2]), int(out.shape[3]))
        super().train(False)

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "BackboneTop":
        return super().train(False)  # BatchNorm statistics frozen, no drop connect

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.act(self.stem[1](self.stem[0](x)))
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate)
        return self.act(self.head[1](self.head[0](x)))

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        h, w, c = self.in_shape
        if regions.dim() != 3 or tuple(regions.shape[1:]) != (h * w, c):
            raise ValueError(f"backbone top ({self.name}, cut={self.cut}): expected cut activations "
                             f"(B, {h * w}, {c}) ({h} x {w} x {c}), got {tuple(regions.shape)}")
        b = regions.shape[0]
        self._align_statistics(self.head[0].weight.dtype)
        x = regions.reshape(b, h, w, c).permute(0, 3, 1, 2)  # NHWC memory: channels_last strides
        return self._run(x.to(self.head[0].weight.dtype)).flatten(2).transpose(1, 2)

    def _align_statistics(self, dtype: torch.dtype) -> None:
        """BatchNorm's (frozen) running statistics in the weights' dtype: an engine that casts only
        the parameters (DeepSpeed's bf16) leaves these buffers in fp32, which batch_norm refuses."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_mean.dtype != dtype:
                m.running_mean.data = m.running_mean.data.to(dtype)
                m.running_var.data = m.running_var.data.to(dtype)


def extractor_cut(extractor: dict | None) -> Cut:
    """The cut of shards from their extractor record (manifest or meta.json; 0 when none)."""
    return extractor.get("cut", 0) if isinstance(extractor, dict) else 0  # older records: a name


def build_top(image_cfg) -> BackboneTop | None:
    """The model's backbone top for ``model.image`` (`scan.config.ImageBackboneConfig`), None when
    ``finetune_blocks`` is 0. Its backbone, input size, weights digest and cut shape come from the
    train shards (`resolve_image_config`); weights of another digest are refused, naming both."""
    k = image_cfg.finetune_blocks
    if k == 0:
        return None
    if not image_cfg.backbone or len(image_cfg.cut_shape) != 3:
        raise ValueError("config key 'model.image.backbone' / 'model.image.cut_shape' are not set: "
                         "training fills them from the train shards' extractor (scan extract ... cut="
                         f"{k}); model.image.finetune_blocks={k!r} needs them")
    if image_cfg.digest:
        from scan.features.backbones import _lite_weights, file_digest

        have = file_digest([_lite_weights(image_cfg.backbone)])
        if have != image_cfg.digest:
            raise ValueError(f"backbone {image_cfg.backbone}: the installed weights (sha256 {have[:12]}) "
                             f"are not those the shards were extracted with (sha256 "
                             f"{image_cfg.digest[:12]}); install the same weight package")
    return BackboneTop(image_cfg.backbone, image_cfg.image_size, k, tuple(image_cfg.cut_shape))


def check_shards_cut(extractor: dict | None, finetune_blocks: Cut, where: str) -> None:
    """Raise ValueError naming both unless shards of ``extractor`` (their manifest's or a sample's
    record) hold the activations ``model.image.finetune_blocks`` expects; ``where``: the config
    key and value of the shards."""
    cut = extractor_cut(extractor)
    if cut != finetune_blocks:
        name = extractor.get("name", "?") if isinstance(extractor, dict) else (extractor or "no extractor record")
        raise ValueError(f"{where}: shards of {name} with cut={cut!r}, but config key "
                         f"'model.image.finetune_blocks' is {finetune_blocks!r}: extract them with "
                         f"cut={finetune_blocks!r} (scan extract ... cut={finetune_blocks}), or set "
                         f"model.image.finetune_blocks={cut!r}")


def resolve_image_config(image_cfg, extractor: dict | None, where: str):
    """``model.image`` with the backbone, input size, digest and cut shape of the train shards'
    extractor filled in, after checking their cut against ``finetune_blocks`` (and, when already
    filled, e.g. on resume, that they are the same backbone)."""
    from dataclasses import replace

    check_shards_cut(extractor, image_cfg.finetune_blocks, where)
    if image_cfg.finetune_blocks == 0:
        return image_cfg
    found = {"backbone": extractor["name"], "image_size": int(extractor["preprocess"]["image_size"]),
             "digest": extractor["digest"], "cut_shape": [int(v) for v in extractor["cut_shape"]]}
    for key, value in found.items():
        have = getattr(image_cfg, key)
        if have and have != value:
            raise ValueError(f"{where}: shards of model.image.{key} {value!r}, but the config says "
                             f"{have!r}")
    return replace(image_cfg, **found)


def shards_extractor(spec: str) -> dict | None:
    """The extractor record of a data set: its manifest's, or for a brace pattern of ``.tar``
    shards the first sample's ``meta.json`` (None for shards without one, e.g. imported precomp)."""
    from dataio.pipeline import resolve_shards
    from dataio.shard_reader import read_shard
    from dataio.shards import read_manifest

    if spec.endswith(".json") or not spec.endswith(".tar"):
        return read_manifest(spec).get("extractor")
    first = next(read_shard(resolve_shards(spec)[0].url), None)
    return None if first is None else first.meta.get("extractor")


def check_split_cut(spec: str, image_cfg, key: str) -> None:
    """Evaluation, retrieval and pictures: the split ``spec`` (config key or option ``key``) must
    hold the cut a run's model was trained on, named with both when not."""
    resolve_image_config(image_cfg, shards_extractor(spec), f"{key}={spec!r}")  # same cut and backbone


def image_config_for_training(cfg):
    """``cfg`` (an ExperimentConfig) with ``model.image`` filled from its train shards' extractor,
    after checking that the train and val shards hold the cut ``model.image.finetune_blocks``
    expects: an error naming both before any step."""
    from dataclasses import replace

    d = cfg.data
    image = resolve_image_config(cfg.model.image, shards_extractor(d.train_shards),
                                 f"config key 'data.train_shards'={d.train_shards!r}")
    if d.val_shards:
        resolve_image_config(image, shards_extractor(d.val_shards), f"config key 'data.val_shards'={d.val_shards!r}")
    return replace(cfg, model=replace(cfg.model, image=image))


def pixel_augment(cfg):
    """The workers' `dataio.augment.PixelAugment` of a run training the whole backbone from
    stored pixels (``finetune_blocks: all`` with ``model.image.augment``), else None."""
    from dataio.augment import PixelAugment

    image = cfg.model.image
    if image.finetune_blocks != ALL or not image.augment:
        return None
    return PixelAugment(image.cut_shape[0], cfg.train.seed)
