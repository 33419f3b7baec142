"""``deepspeed.initialize`` from the experiment config: DeepSpeed JSON, optimizer choice, lr schedule.

The DeepSpeed JSON (``train.deepspeed_config``, e.g. ``configs/deepspeed/default.json``) carries
the knobs the experiment schema does not model (ZeRO bucket sizes, fp16 loss-scaler window, ...);
the experiment fields below always override the keys they own, so one YAML is the truth for batch
size, precision, ZeRO stage, accumulation and clipping.

Gradient accumulation: hardest negatives are mined within each micro-batch (over the global
micro-batch of all ranks when ``loss.cross_device``), never across accumulated micro-batches;
accumulation only averages the micro-batch losses' gradients (DeepSpeed scales each by 1/steps).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from scan.precision import resolve_precision
from trainer.distributed import DistEnv

log = logging.getLogger(__name__)


def deepspeed_config(cfg: ExperimentConfig, world: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict: the optional JSON, then the experiment's own fields on top."""
    ds: dict[str, Any] = {}
    if cfg.train.deepspeed_config:
        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"config key 'train.deepspeed_config': {str(path)!r} does not exist")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
        _check_agrees(ds, cfg, path)
    precision = resolve_precision(cfg.train.precision, device)  # scan.precision: auto → bf16 where native
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.precision': 'fp16' is not supported on CPU (DeepSpeed "
                          "refuses fp16 without a GPU); use 'bf16' or 'fp32' here")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = cfg.train.zero_stage
    if precision == "bf16" and zero["stage"] == 0:
        # DeepSpeed keeps fp32 master weights for bf16 only inside its BF16/ZeRO optimizers; at
        # stage 0 Adam would update the bf16 weights directly and lose updates below bf16 resolution.
        # Stage 1 is stage 0 plus fp32 master weights (optimizer state split over ranks).
        log.info("train.precision bf16 with ZeRO stage 0: running ZeRO stage 1 for fp32 master weights")
        zero["stage"] = 1
    ds["zero_optimization"] = zero
    # Our optimizer is built here (torch / apex / DeepSpeed FusedAdam), not from DeepSpeed JSON.
    ds["zero_allow_untested_optimizer"] = True
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    fp16 = dict(ds.get("fp16", {}))
    fp16["enabled"] = precision == "fp16"
    fp16.setdefault("loss_scale", 0)  # 0: dynamic loss scaling
    ds["fp16"] = fp16
    bf16 = dict(ds.get("bf16", {}))
    bf16["enabled"] = precision == "bf16"
    ds["bf16"] = bf16
    if precision == "bf16":
        # fp32 master weights and gradient accumulation; the model computes in bf16.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    ds.setdefault("steps_per_print", 10**9)  # our own loop logs; keep DeepSpeed quiet
    return ds


def _check_agrees(ds: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """The experiment config decides ZeRO stage and precision; a JSON that says otherwise is an error."""
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.train.zero_stage:
        raise ConfigError(f"DeepSpeed config {path} asks for ZeRO stage {stage} but config key "
                          f"'train.zero_stage' is {cfg.train.zero_stage}; set train.zero_stage={stage}")
    for name in ("fp16", "bf16"):
        if ds.get(name, {}).get("enabled") and cfg.train.precision not in (name, "auto"):
            raise ConfigError(f"DeepSpeed config {path} enables {name} but config key "
                              f"'train.precision' is {cfg.train.precision!r}; set train.precision={name}")


def _nvidia_apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam when NVIDIA apex is installed (PyPI's ``apex`` is unrelated)."""
    try:
        import apex.optimizers  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(apex.optimizers, "FusedAdam", None)


def param_groups(cfg: ExperimentConfig, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: a transformers text encoder's own layers at
    ``optim.lr × optim.text_lr_scale`` (fine-tuning pretrained weights at a lower rate), the rest
    at ``optim.lr``; the image backbone's top (``model.image.finetune_blocks``) at ``optim.lr ×
    model.image.lr_scale``, held at 0 for its first ``model.image.frozen_epochs``. Empty groups are
    left out."""
    text, image, rest = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("backbone_top."):
                image.append(p)
            else:
                (text if name.startswith(("txt_enc.top.", "txt_enc.backbone.")) else rest).append(p)
    img = cfg.model.image
    groups = [{"params": rest, "lr": cfg.optim.lr},
              {"params": text, "lr": cfg.optim.lr * cfg.optim.text_lr_scale},
              {"params": image, "lr": cfg.optim.lr * img.lr_scale, "frozen_epochs": img.frozen_epochs}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: ExperimentConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]],
                    device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """Adam or AdamW; fused where possible. ``params``: parameters or groups (each group's own
    ``lr`` wins). Returns the optimizer and a name for the log."""
    o = cfg.optim
    decoupled = o.name == "adamw"
    kwargs = dict(lr=o.lr, weight_decay=o.weight_decay)
    if device.type == "cuda":
        apex_cls = _nvidia_apex_fused_adam() if o.use_apex else None
        if apex_cls is not None:
            return apex_cls(params, adam_w_mode=decoupled, **kwargs), f"apex.optimizers.FusedAdam({o.name})"
        if o.use_apex:
            log.warning("optim.use_apex is set but NVIDIA apex is not installed; using DeepSpeed FusedAdam")
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=decoupled, **kwargs), f"deepspeed.ops.adam.FusedAdam({o.name})"
        except Exception as err:  # the op is JIT-built: no CUDA toolkit / ninja on this machine
            log.warning("DeepSpeed FusedAdam unavailable (%s); using torch's fused optimizer", err)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(params, fused=True, **kwargs), f"torch.optim.{cls.__name__}(fused=True)"
    if o.use_apex:
        log.warning("optim.use_apex is set but there is no GPU; using torch's optimizer")
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, **kwargs), f"torch.optim.{cls.__name__}"


def lr_factor(step: int, epoch: int, *, lr_update: list[int], lr_decay: float,
              warmup_steps: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) taken in ``epoch``.

    The reference's step decay (× lr_decay once per epoch of lr_update reached), times a linear
    warmup over the first ``warmup_steps`` steps. The epoch is the training loop's own counter, not
    derived from a step count, so batches that do not divide by ``train.grad_accum`` (or an epoch
    re-planned on resume) never shift the decay.
    """
    factor = lr_decay ** sum(1 for e in lr_update if epoch >= e)
    if warmup_steps > 0 and step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


class EpochStepLR(LRScheduler):
    """:func:`lr_factor` as a scheduler: DeepSpeed calls ``step()`` after every optimizer step, the
    loop calls ``set_epoch`` at every epoch start. Both counters are in ``state_dict``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr_update: list[int], lr_decay: float,
                 warmup_steps: int):
        self.epoch = 0
        self.lr_update, self.lr_decay, self.warmup_steps = list(lr_update), lr_decay, warmup_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """Each group's lr; 0 for a group still within its ``frozen_epochs`` (the image backbone's)."""
        f = lr_factor(self.last_epoch, self.epoch, lr_update=self.lr_update, lr_decay=self.lr_decay,
                      warmup_steps=self.warmup_steps)
        return [0.0 if self.epoch < group.get("frozen_epochs", 0) else base * f
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    def set_epoch(self, epoch: int) -> None:
        """Applies ``epoch``'s decay to the next optimizer step at once."""
        self.epoch = epoch
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def build_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer) -> EpochStepLR:
    o = cfg.optim
    return EpochStepLR(optimizer, lr_update=list(o.lr_update), lr_decay=o.lr_decay,
                       warmup_steps=o.warmup_steps)


@dataclass
class Engine:
    """The DeepSpeed engine plus what the loop reports about it."""

    ds: Any  # deepspeed.DeepSpeedEngine
    optimizer_name: str
    ds_config: dict[str, Any]
    scheduler: EpochStepLR


def build_engine(cfg: ExperimentConfig, model: torch.nn.Module, env: DistEnv) -> Engine:
    """Wraps ``model`` in a DeepSpeed engine; the process group must already exist."""
    import deepspeed

    from trainer.checkpoint import install_weights_only_loader

    ds_config = deepspeed_config(cfg, env.world, env.device)
    model.to(env.device)
    optimizer, name = build_optimizer(cfg, param_groups(cfg, model), env.device)
    scheduler = build_scheduler(cfg, optimizer)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                             lr_scheduler=scheduler, config=ds_config,
                                             dist_init_required=False)
    install_weights_only_loader(ds_engine)
    if env.is_main:
        log.info("optimizer %s; precision %s; ZeRO stage %d; micro-batch %d x accumulation %d x "
                 "world %d", name,
                 "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32",
                 ds_config["zero_optimization"]["stage"], cfg.data.batch_size, cfg.train.grad_accum, env.world)
    return Engine(ds=ds_engine, optimizer_name=name, ds_config=ds_config, scheduler=scheduler)


def fp32_trainable_state(ds_engine: Any) -> dict[str, torch.Tensor]:
    """The trained parameters in float32 on the CPU, by name: the optimizer's fp32 master weights
    where DeepSpeed keeps them (bf16/fp16, ZeRO: gathered from every rank's partition), else the
    parameters themselves. Every rank must call it (ZeRO gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in ds_engine.module.named_parameters():
        if not p.requires_grad:
            continue  # frozen: rebuilt from its source (bf16 training keeps only a rounded copy)
        master = safe_get_full_fp32_param(p)
        out[name] = (master if master is not None else p).detach().float().cpu().clone()
    return out
