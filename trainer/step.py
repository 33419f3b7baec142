"""One optimizer step: :func:`forward_backward_step` per micro-batch (forward through the engine,
the run's ``scan.loss.TrainingLoss``, backward), and :func:`train_step`, which adds the engine's step at the
end of an accumulation window."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dataio.pipeline import CaptionBatch
from scan.loss import TrainingLoss
from trainer.engine import Engine


def _grad_norm(engine: Engine) -> float | None:
    """Global gradient norm before clipping: DeepSpeed's where its optimizer records it; with a plain
    optimizer (fp32, ZeRO 0) every rank holds the averaged gradients, so compute it here."""
    if engine.ds.zero_optimization_stage() > 0 or engine.ds.bfloat16_enabled() or engine.ds.fp16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.ds.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class NonFiniteLoss(FloatingPointError):
    def __init__(self, loss: float, keys: list[str]):
        self.loss, self.keys = loss, keys
        super().__init__(f"non-finite training loss {loss}")


@dataclass
class StepResult:
    loss: float  # summed over ranks: the loss of the global micro-batch
    stepped: bool  # an optimizer step was taken (the end of an accumulation window)
    grad_norm: float | None
    lr: float  # the lr this micro-batch's step applies


def forward_backward_step(engine: Engine, batch: CaptionBatch, loss_fn: TrainingLoss,
                          device: torch.device, dtype: torch.dtype, epoch: int = 0) -> float:
    """Forward through the engine, the run's loss (region / word dropout, then the cross-device
    hinge with ``epoch``'s negatives), backward (gradients accumulate in the engine); returns the
    loss summed over ranks."""
    ds = engine.ds
    b = batch.to(device, dtype)
    img_emb, cap_emb = ds(b.regions, b.img_lens, b.tokens, b.cap_lens, b.saliency)  # saliency: scan_sal only
    img_lens, cap_lens = ds.module.image_output_lens(b.img_lens), ds.module.output_lens(b.cap_lens)
    loss, total = loss_fn(img_emb, img_lens, cap_emb, cap_lens, b.image_ids, epoch)
    total_f = float(total)
    if not math.isfinite(total_f):  # the all-reduced value: every rank stops together
        raise NonFiniteLoss(total_f, batch.keys)
    ds.backward(loss)
    return total_f


def train_step(engine: Engine, batch: CaptionBatch, loss_fn: TrainingLoss, device: torch.device,
               dtype: torch.dtype, epoch: int = 0) -> StepResult:
    """One micro-batch: :func:`forward_backward_step`, then the optimizer step at the end of an
    accumulation window (DeepSpeed counts the micro-batches)."""
    ds = engine.ds
    total_f = forward_backward_step(engine, batch, loss_fn, device, dtype, epoch)
    grad_norm = _grad_norm(engine) if ds.is_gradient_accumulation_boundary() else None
    before, lr = ds.global_steps, float(ds.get_lr()[0])
    ds.step()
    stepped = ds.global_steps != before
    if stepped and grad_norm is None:
        grad_norm = _float(ds.get_global_grad_norm())
    return StepResult(total_f, stepped, grad_norm, lr)


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def loss_scale(ds: Any) -> float | None:
    """The dynamic fp16 loss scale (ZeRO optimizers keep it in ``loss_scale_config``)."""
    if not ds.fp16_enabled():
        return None
    holder = getattr(ds.optimizer, "loss_scale_config", ds.optimizer)
    return _float(getattr(holder, "cur_scale", None))
