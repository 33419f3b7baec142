"""Mixed precision in one place: the names, their dtypes, ``auto`` and the autocast contexts.

Every path asks here: the training engine (``train.precision``, ``auto`` resolved by
:func:`resolve_precision`), the evaluator's encoding (``eval.precision``, :func:`autocast`), the
label of a result computed from embeddings (:func:`lowest`), retrieval's query encoding, the
extraction's backbone (bf16 on a GPU) and the demo's report (:func:`native_bf16`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]  # what computes; train.precision also allows "auto"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {torch.float32: "fp32", torch.float64: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``bf16``, ``fp16``)."""
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The precision name of a dtype (float64 counts as fp32; another dtype: its own name)."""
    return _NAMES.get(dtype, str(dtype))


def lowest(dtypes: set[torch.dtype]) -> str:
    """The precision figures computed from tensors of ``dtypes`` have: the lowest among them."""
    found = {precision_name(d) for d in dtypes}
    return next((p for p in ("fp16", "bf16") if p in found), found.pop() if found else "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (not by emulation).

    CPUs need AVX512-BF16 or AMX: without them bf16 products are emulated (measured on a 2-core
    AVX-512 Xeon without either: 5.5 GFLOP/s in bf16 against 30.6 in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where the device computes it natively, else fp32 (logged with the reason)."""
    if requested != "auto":
        return requested
    if native_bf16(device):
        log.info("train.precision auto: bf16 (native on %s)", device.type)
        return "bf16"
    log.info("train.precision auto: fp32, since this %s has no native bf16 matrix products "
             "(no AVX512-BF16/AMX): emulated bf16 would run several times slower", device.type)
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context that computes in ``precision`` on ``device``: nothing for fp32, else torch's
    autocast to its dtype (fp16 only on CUDA)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("eval precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return torch.autocast(device.type, dtype=DTYPES[precision])
