"""The token features of a FROZEN transformers text encoder, computed once per caption.

A frozen backbone gives the same last hidden states for a caption at every step of every epoch,
so running it at every step (6 transformer layers over every caption, every epoch) is pure waste:
``FrozenTokenFeatures`` runs it once per distinct token sequence and afterwards only looks the rows
up. Only the projection on top (``scan.model.HFTextEncoder.fc``) trains, or, when its top
``trained_top_layers`` layers fine-tune, those layers too: the rows are then the hidden states
entering them (the output of the frozen layers below), which are just as fixed per caption.

Exactness rule: every row is stored in float16, whether it was precomputed, loaded from disk or
computed on a miss, so a caption's features are the same bits however they were reached (training,
validation, ``scan explain``). float16 keeps 11 significant bits of LayerNorm outputs (|x| < 20):
a relative change below 5e-4, far below what the trained projection resolves.

One instance per model directory, cut and process (``for_model``): the training model and the fp32
model built for each validation share it. On disk (``save`` / ``load``) one file per model:
``ids`` (T,) int32, ``offsets`` (C + 1,) int64 and ``features`` (T, H) float16 for C captions of
T tokens in all; a later run merges what it adds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from dataio import storage

log = logging.getLogger(__name__)

STORE_DTYPE = torch.float16
_INSTANCES: dict[str, "FrozenTokenFeatures"] = {}


def load_transformer(model_dir: str) -> torch.nn.Module:
    """The transformers model of a local directory, never reaching the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the hub, even for metadata
    from transformers import AutoModel  # heavy import, only when a transformers encoder is used

    return AutoModel.from_pretrained(model_dir, local_files_only=True)


def encoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer layers of a BERT-layout model (BERT, RoBERTa, MiniLM, ...)."""
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(backbone).__name__}: no encoder.layer stack; fine-tuning the top "
                         "layers (model.hf_finetune_layers) needs a BERT-layout encoder")
    return layers


class FrozenTokenFeatures:
    """Hidden states (n, H) of a frozen backbone per caption, keyed by its token ids: the last
    layer's, or those entering the top ``trained_top_layers`` layers (which train elsewhere)."""

    def __init__(self, model_dir: str, backbone: torch.nn.Module | None = None,
                 trained_top_layers: int = 0) -> None:
        self.model_dir = str(model_dir)
        # Always fp32 and in eval mode, whatever the training precision does to the trained part.
        self.backbone = (backbone if backbone is not None else load_transformer(self.model_dir)).float().eval()
        self.backbone.requires_grad_(False)
        self.hidden_size = int(self.backbone.config.hidden_size)
        self.num_layers = int(self.backbone.config.num_hidden_layers)
        if not 0 <= trained_top_layers <= self.num_layers:
            raise ValueError(f"config key 'model.hf_finetune_layers': {trained_top_layers} is not "
                             f"allowed; {self.model_dir} has {self.num_layers} layers")
        self.trained_top_layers = trained_top_layers
        self.rows: dict[tuple[int, ...], Tensor] = {}  # ids → (n, H) STORE_DTYPE, views of one block
        self.computed = 0  # captions run through the backbone by this process (misses included)

    @classmethod
    def for_model(cls, model_dir: str, trained_top_layers: int = 0) -> "FrozenTokenFeatures":
        path = str(Path(model_dir).resolve())
        key = f"{path}@{trained_top_layers}"
        if key not in _INSTANCES:
            _INSTANCES[key] = cls(path, trained_top_layers=trained_top_layers)
        return _INSTANCES[key]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def compute(self, id_lists: Sequence[Sequence[int]], batch_size: int = 256,
                progress: bool = False) -> None:
        """Runs the backbone over the captions not yet held, in batches of similar lengths (little
        padding), and stores their rows."""
        todo = sorted({tuple(int(i) for i in ids) for ids in id_lists} - self.rows.keys(), key=len)
        if not todo:
            return
        pad = int(getattr(self.backbone.config, "pad_token_id", 0) or 0)
        bar = tqdm(total=len(todo), desc="frozen text features", unit="caption", disable=not progress,
                   leave=False)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            n = len(chunk[-1])  # sorted by length: the last is the longest
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), n, dtype=torch.long)
            for r, key in enumerate(chunk):
                ids[r, :len(key)] = torch.tensor(key)
                mask[r, :len(key)] = 1
            out = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                output_hidden_states=self.trained_top_layers > 0)
            hidden = (out.hidden_states[self.num_layers - self.trained_top_layers]
                      if self.trained_top_layers else out.last_hidden_state)  # (b, n, H)
            hidden = hidden.to("cpu", STORE_DTYPE)
            for r, key in enumerate(chunk):
                self.rows[key] = hidden[r, :len(key)].clone()
            self.computed += len(chunk)
            bar.update(len(chunk))
        bar.close()

    def lookup(self, input_ids: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, n) ids with (B,) lengths → (B, n, H) features in ``dtype`` on the ids' device; zero
        past each length. Captions not held yet are computed first (and kept)."""
        keys = [tuple(row[:int(n)]) for row, n in zip(input_ids.tolist(), lengths.tolist())]
        missing = [k for k in keys if k not in self.rows]
        if missing:
            self.compute(missing)
        out = torch.zeros(len(keys), input_ids.shape[1], self.hidden_size, dtype=STORE_DTYPE)
        for r, key in enumerate(keys):
            out[r, :len(key)] = self.rows[key]
        return out.to(input_ids.device, dtype)

    # -- on disk ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """All rows held, atomically (a crash leaves the previous file or none)."""
        keys = list(self.rows)
        lengths = torch.tensor([len(k) for k in keys], dtype=torch.long)
        offsets = torch.zeros(len(keys) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        state = {"model_dir": self.model_dir, "hidden_size": self.hidden_size,
                 "ids": torch.tensor([i for k in keys for i in k], dtype=torch.int32),
                 "offsets": offsets,
                 "features": (torch.cat([self.rows[k] for k in keys]) if keys
                              else torch.zeros(0, self.hidden_size, dtype=STORE_DTYPE))}
        storage.atomic_write(str(path), lambda f: torch.save(state, f))

    def load(self, path: str | os.PathLike) -> int:
        """Adds the rows of a file written by :meth:`save` (by a backbone of the same size);
        returns how many captions were new."""
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            ids, offsets, features = state["ids"], state["offsets"], state["features"]
        except (KeyError, TypeError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"{path}: not a frozen text feature file ({err!r}); delete it to "
                             "recompute") from err
        if features.shape[1:] != (self.hidden_size,) or features.dtype != STORE_DTYPE:
            raise ValueError(f"{path}: features {tuple(features.shape)} {features.dtype} do not fit a "
                             f"backbone of hidden size {self.hidden_size} stored as {STORE_DTYPE}")
        ids, bounds = ids.tolist(), offsets.tolist()
        added = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            key = tuple(ids[a:b])
            if key not in self.rows:
                self.rows[key] = features[a:b]
                added += 1
        return added


def cache_file(folder: str | os.PathLike, model_dir: str, trained_top_layers: int = 0) -> Path:
    """Where the features of ``model_dir`` live in ``folder``: named after the model's directory and
    a hash of its config and weight files (their names, sizes and modification times), and the
    number of top layers left out (those then train)."""
    root = Path(model_dir).resolve()
    h = hashlib.sha256(str(root).encode())
    for f in sorted(root.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    cut = f"-below-top{trained_top_layers}" if trained_top_layers else ""
    return Path(folder) / f"{root.name}-{h.hexdigest()[:16]}{cut}.pt"


def precompute(model_dir: str, id_lists: Iterable[Sequence[int]], folder: str | os.PathLike | None,
               progress: bool = True, device: torch.device | str | None = None,
               trained_top_layers: int = 0) -> FrozenTokenFeatures:
    """The process's features of ``model_dir`` (below its top ``trained_top_layers`` layers)
    holding every caption of ``id_lists``: read from ``folder`` where a file is there, the rest
    computed (on ``device`` when given, e.g. the rank's GPU), and the file rewritten when anything
    was added (``folder`` None: in memory only)."""
    feats = FrozenTokenFeatures.for_model(model_dir, trained_top_layers)
    if device is not None:
        feats.backbone.to(device)
    path = cache_file(folder, model_dir, trained_top_layers) if folder else None
    if path is not None and path.is_file():
        added = feats.load(path)
        log.info("frozen text features: %d captions read from %s", added, path)
    id_lists = list(id_lists)
    before = len(feats)
    feats.compute(id_lists, progress=progress)
    if len(feats) > before:
        log.info("frozen text features: %d captions computed", len(feats) - before)
        if path is not None:
            feats.save(path)
            log.info("frozen text features: %d captions saved to %s", len(feats), path)
    return feats
