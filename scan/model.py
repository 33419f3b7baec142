"""The encoders of the family: regions → (B, k, d) and words → (B, n, d), each vector l2-normalised
(``model.kind: vse`` pools each side into (B, 1, d) first, then normalises).

As the reference (kuanghuei/SCAN model.py): a Xavier-initialised Linear over precomputed region
features, and a (bi)GRU over word embeddings whose two directions are averaged. A second text encoder
projects the token features of any local transformers model. Padded positions of every output are
exactly zero, so the cross-attention and any pooling downstream may ignore them safely.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import get_args

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dataio.text import local_model_dir
from scan.config import GRUImpl, ModelConfig
from scan.features.backbone_top import build_top
from scan.gru import gru as fused_gru
from scan.pooling import build_pool, length_mask  # noqa: F401  (length_mask: part of this API)
from scan.saliency_scorer import SaliencyGuidance
from scan.text_features import FrozenTokenFeatures, encoder_layers, load_transformer

log = logging.getLogger(__name__)

# Added under the square root so that the norm of an all-zero vector has a finite gradient
# (d sqrt(s)/ds is infinite at s = 0, and 0 * inf = NaN). sqrt(1e-20) = 1e-10 < 1e-8, so values move by
# less than the reference's own eps. Kept in fp32, where 1e-20 is representable (fp16 would flush it).
_SQRT_FLOOR = 1e-20


def l2norm(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along ``dim`` as the reference, with a gradient-safe square root.

    The norm and the division run in at least fp32 (eps = 1e-8 is below fp16's smallest subnormal),
    and the result is cast back to ``x.dtype``. A zero vector maps to zero with the true Jacobian
    I / eps = 1e8 I: finite in fp32/bf16, but beyond fp16's range, so an fp16 backward through an
    exactly-zero vector overflows (the loss scaler then skips the step).
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = (wide.square().sum(dim=dim, keepdim=True) + _SQRT_FLOOR).sqrt() + eps
    return (wide / norm).to(x.dtype)


def _check_lengths(lengths: torch.Tensor, batch: int, max_len: int, what: str) -> None:
    if lengths.shape != (batch,):
        raise ValueError(f"{what}: expected shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(f"{what} must lie in [1, {max_len}]; got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")


def _xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear with the reference's init: weight ~ U(-r, r), r = sqrt(6 / (in + out)), bias 0."""
    fc = nn.Linear(in_features, out_features)
    r = math.sqrt(6.0) / math.sqrt(in_features + out_features)
    nn.init.uniform_(fc.weight, -r, r)
    nn.init.zeros_(fc.bias)
    return fc


class ImageEncoder(nn.Module):
    """Precomputed region features (B, k, img_dim) → (B, k, embed_size).

    ``kind="linear"``: the reference's Xavier-initialised fc. ``"mlp"``: fc(x) + MLP(x) with a
    2-layer MLP (Linear → ReLU → Linear, hidden embed_size // 2, last layer zero-initialised so
    training starts from the linear encoder), as VSE∞ encodes precomputed region features.
    """

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False,
                 kind: str = "linear") -> None:
        super().__init__()
        if img_dim < 1:  # 0 means "from the shards": training sets it from their manifest first
            raise ValueError(f"config key 'model.img_dim': {img_dim} is not a feature size; set it to "
                             "the region features' D (training takes it from the shards' manifest)")
        self.fc = _xavier_linear(img_dim, embed_size)
        self.no_imgnorm = no_imgnorm
        if kind not in ("linear", "mlp"):
            raise ValueError(f"config key 'model.img_encoder': {kind!r} is not allowed; "
                             "expected one of 'linear', 'mlp'")
        self.mlp: nn.Module | None = None
        if kind == "mlp":
            hidden = max(1, embed_size // 2)
            self.mlp = nn.Sequential(nn.Linear(img_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_size))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, regions: torch.Tensor, img_lens: torch.Tensor | None = None) -> torch.Tensor:
        if regions.dim() != 3 or regions.shape[-1] != self.fc.in_features:
            raise ValueError(f"regions: expected (B, k, {self.fc.in_features}), "
                             f"got {tuple(regions.shape)}")
        features = self.fc(regions)
        if self.mlp is not None:
            features = features + self.mlp(regions)
        if not self.no_imgnorm:
            features = l2norm(features, dim=-1)
        if img_lens is not None:
            _check_lengths(img_lens, regions.shape[0], regions.shape[1], "img_lens")
            # The bias makes padded regions non-zero; zero them so they match the contract.
            mask = length_mask(img_lens, regions.shape[1])
            features = features * mask[..., None].to(features.dtype)
        return features


class GRUTextEncoder(nn.Module):
    """Word ids (B, n) with lengths (B,) → (B, n, embed_size), as the reference's EncoderText.

    ``embeddings`` (vocab_size, e) initialises the word embedding (e.g. GloVe rows in vocabulary
    order). GloVe 6B is 50-d while SCAN uses word_dim 300: when e < word_dim the first e columns
    are copied and the remaining ones keep the reference's U(-0.1, 0.1) init; e > word_dim is an
    error (truncating pretrained vectors would silently discard information).
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bidirectional: bool = True, no_txtnorm: bool = False,
                 embeddings: torch.Tensor | None = None, gru_impl: str = "auto") -> None:
        super().__init__()
        if gru_impl not in get_args(GRUImpl):
            raise ValueError(f"config key 'model.gru_impl': {gru_impl!r} is not allowed; "
                             f"expected one of {', '.join(map(repr, get_args(GRUImpl)))}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if embeddings is not None:
            self._copy_embeddings(embeddings)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.no_txtnorm = no_txtnorm
        # auto: scan.gru on CPU (nn.GRU's CPU training runs gate by gate through autograd), the
        # module itself (cuDNN, already fused) on CUDA. Both compute the same from the same weights.
        self.gru_impl = gru_impl

    def _copy_embeddings(self, embeddings: torch.Tensor) -> None:
        vocab_size, word_dim = self.embed.weight.shape
        if embeddings.dim() != 2 or embeddings.shape[0] != vocab_size or embeddings.shape[1] > word_dim:
            raise ValueError(f"embeddings: expected ({vocab_size}, e) with e <= word_dim {word_dim}, "
                             f"got {tuple(embeddings.shape)}")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain non-finite values")
        with torch.no_grad():
            self.embed.weight[:, : embeddings.shape[1]] = embeddings.to(self.embed.weight.dtype)
        log.info("word embedding initialised from a (%d, %d) matrix (word_dim %d)",
                 vocab_size, embeddings.shape[1], word_dim)

    def forward(self, tokens: torch.Tensor, cap_lens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected (B, n), got {tuple(tokens.shape)}")
        batch, n = tokens.shape
        _check_lengths(cap_lens, batch, n, "cap_lens")
        x = self.embed(tokens)  # (B, n, word_dim)
        if self.gru_impl == "fused" or (self.gru_impl == "auto" and x.device.type == "cpu"):
            out = fused_gru(self.rnn, x, cap_lens)  # exactly the packed nn.GRU below
        else:
            out = self._packed_gru(x, cap_lens, n)
        if self.bidirectional:
            half = out.shape[-1] // 2
            out = (out[..., :half] + out[..., half:]) / 2
        if not self.no_txtnorm:
            out = l2norm(out, dim=-1)  # zero rows stay zero
        return out

    def _packed_gru(self, x: torch.Tensor, cap_lens: torch.Tensor, n: int) -> torch.Tensor:
        # pack_padded_sequence wants lengths on the CPU; enforce_sorted=False keeps batch order.
        packed = pack_padded_sequence(x, cap_lens.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        # total_length=n keeps the input's padding width; padded steps come back as zeros.
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)  # (B, n, dirs * d)
        return out


class HFTextEncoder(nn.Module):
    """Token ids (B, n) + attention mask (B, n) → (B, n, embed_size) from a local transformers model.

    The model's last hidden states are projected by a Xavier-initialised Linear and l2-normalised per
    token. ``freeze`` keeps the transformer's weights fixed: it is then not a submodule at all (only
    ``fc`` trains, is cast and is checkpointed) and its features come from the process's
    ``scan.text_features.FrozenTokenFeatures`` for the model, which runs it once per caption.
    ``finetune_layers`` (with ``freeze``): a trained copy of the top layers (``top``) runs over the
    cached hidden states entering them, so the text side adapts while the rest stays cached.
    """

    def __init__(self, path: str | os.PathLike, embed_size: int, freeze: bool = False,
                 finetune_layers: int = 0, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        model_dir = Path(local_model_dir(str(path)))
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"hf text encoder path {str(model_dir)!r}: no config.json there; "
                             "expected a local transformers model directory")
        if finetune_layers and not freeze:
            raise ValueError("hf text encoder: finetune_layers needs freeze (unfrozen, every layer trains)")
        self.freeze = freeze
        self.top: nn.ModuleList | None = None
        if freeze:
            self.frozen: FrozenTokenFeatures | None = FrozenTokenFeatures.for_model(str(model_dir),
                                                                                    finetune_layers)
            hidden_size = self.frozen.hidden_size
            if finetune_layers:
                layers = encoder_layers(self.frozen.backbone)
                self.top = copy.deepcopy(layers[len(layers) - finetune_layers:]).requires_grad_(True)
        else:
            self.frozen = None
            self.backbone = load_transformer(str(model_dir))
            self.backbone.requires_grad_(True)
            hidden_size = self.backbone.config.hidden_size
        self.fc = _xavier_linear(hidden_size, embed_size)

    @property
    def transformer(self) -> nn.Module:
        """The transformers model (the frozen features' own copy when frozen)."""
        return self.frozen.backbone if self.frozen is not None else self.backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            hidden = self.frozen.lookup(input_ids, attention_mask.sum(1), self.fc.weight.dtype)
            if self.top is not None:
                # Additive key mask (B, 1, 1, n), as the model's own forward builds for its layers.
                bias = (1 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
                for layer in self.top:
                    hidden = layer(hidden, attention_mask=bias)
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers
        else:
            hidden = self.backbone(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state  # (B, n, H)
        out = self.fc(hidden)
        if self.normalize:
            out = l2norm(out, dim=-1)
        return out * attention_mask[..., None].to(out.dtype)


class SCANModel(nn.Module):
    """Both encoders of one model of the family (``model.kind``), built from ``ModelConfig``.

    ``scan`` and ``dvsa`` keep one vector per region and word; ``vse`` pools each side
    (``scan.pooling``: mean or VSE∞'s GPO) of the un-normalised vectors into one, then normalises,
    so its outputs are (B, 1, d) with length 1 (``output_lens``).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.pooled = cfg.kind == "vse"
        # model.image.finetune_blocks: the backbone's top over the shards' cut activations
        self.backbone_top = build_top(cfg.image)
        img_dim = cfg.img_dim if self.backbone_top is None else self.backbone_top.out_dim
        self.img_enc = ImageEncoder(img_dim, cfg.embed_size, cfg.no_imgnorm or self.pooled,
                                    cfg.img_encoder)
        if cfg.text_encoder == "gru":
            self.txt_enc: nn.Module = GRUTextEncoder(
                vocab_size, cfg.word_dim, cfg.embed_size, cfg.num_layers, cfg.bidirectional,
                cfg.no_txtnorm or self.pooled, embeddings, cfg.gru_impl)
        elif cfg.text_encoder == "hf":
            if embeddings is not None:
                raise ValueError("model.text_encoder 'hf' takes no word embeddings "
                                 "(model.glove must be empty)")
            self.txt_enc = HFTextEncoder(cfg.hf_path, cfg.embed_size, cfg.hf_freeze,
                                         cfg.hf_finetune_layers, normalize=not self.pooled)
        else:
            raise ValueError(f"config key 'model.text_encoder': {cfg.text_encoder!r} is not allowed; "
                             "expected one of 'gru', 'hf'")
        if self.pooled:
            self.img_pool, self.txt_pool = build_pool(cfg.pooling), build_pool(cfg.pooling)
        # scan_sal: the gated fusion unit, whose per-side terms the encoders append as channels
        self.guidance = SaliencyGuidance(cfg.embed_size) if cfg.kind == "scan_sal" else None

    def forward(self, regions: torch.Tensor, img_lens: torch.Tensor, tokens: torch.Tensor,
                cap_lens: torch.Tensor, saliency: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region (B, k, embed) and word (B, n, embed) embeddings of a batch (scan_sal: with the
        saliency (B, k) and its guidance channels, ``scan.saliency_scorer``; other kinds ignore
        ``saliency``).

        Training calls this through the DeepSpeed engine (``engine(...)``), never the encoders
        directly: the engine's forward hooks the backward that its bf16/fp16/ZeRO optimizers need
        (e.g. BF16_Optimizer clears the low-precision grads of the previous micro-batch there).
        """
        return self.encode_images(regions, img_lens, saliency), self.encode_captions(tokens, cap_lens)

    def output_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """The valid lengths of the encoders' outputs for inputs of ``lens`` (B,): 1 when pooled."""
        return torch.ones_like(lens) if self.pooled else lens

    def image_output_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """`output_lens` of the image side: with a backbone top, its final cells per image."""
        if self.backbone_top is not None:
            lens = torch.full_like(lens, self.backbone_top.cells)
        return self.output_lens(lens)

    def encode_images(self, regions: torch.Tensor, img_lens: torch.Tensor | None = None,
                      saliency: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k, img_dim) → (B, k, embed_size), or (B, 1, embed_size) pooled, or with scan_sal
        and its saliency (B, k): (B, k, 3 · embed_size + 1); regions beyond ``img_lens`` are zero.
        With a backbone top, ``regions`` are cut activations and k becomes its final cells."""
        if self.backbone_top is not None:
            regions = self.backbone_top(regions)
            img_lens = None if img_lens is None else torch.full_like(img_lens, self.backbone_top.cells)
        out = self.img_enc(regions, img_lens)
        if self.guidance is not None:
            if saliency is None:
                raise ValueError("model.kind 'scan_sal' needs each region's saliency (saliency.npy in the "
                                 "shards) and these images have none: extract the data set with "
                                 "saliency, e.g. scan extract ... saliency=img-focus dest=<new folder>")
            lens = img_lens if img_lens is not None else torch.full(
                (regions.shape[0],), regions.shape[1], device=regions.device)
            return self.guidance.images(out, saliency, lens)
        if not self.pooled:
            return out
        lens = img_lens if img_lens is not None else torch.full(
            (regions.shape[0],), regions.shape[1], device=regions.device)
        pooled = self.img_pool(out, lens)
        return (pooled if self.cfg.no_imgnorm else l2norm(pooled, dim=-1))[:, None]

    def encode_captions(self, tokens: torch.Tensor, cap_lens: torch.Tensor) -> torch.Tensor:
        """(B, n) ids, (B,) lengths → (B, n, embed_size), or (B, 1, embed_size) pooled; words
        beyond ``cap_lens`` are zero."""
        if isinstance(self.txt_enc, HFTextEncoder):
            _check_lengths(cap_lens, tokens.shape[0], tokens.shape[1], "cap_lens")
            out = self.txt_enc(tokens, length_mask(cap_lens, tokens.shape[1]).long())
        else:
            out = self.txt_enc(tokens, cap_lens)
        if self.guidance is not None:
            return self.guidance.captions(out, cap_lens)
        if not self.pooled:
            return out
        pooled = self.txt_pool(out, cap_lens)
        return (pooled if self.cfg.no_txtnorm else l2norm(pooled, dim=-1))[:, None]


def build_model(cfg: ModelConfig, vocab_size: int, embeddings: torch.Tensor | None = None) -> SCANModel:
    model = SCANModel(cfg, vocab_size, embeddings)
    log.info("%s model: %s text encoder, %.2fM parameters (%.2fM trainable)", cfg.kind, cfg.text_encoder,
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return model


def build_trained(cfg: ModelConfig, vocab_size: int, trainable: dict[str, torch.Tensor]) -> SCANModel:
    """A float32 model in eval mode holding the trained parameters ``trainable`` (by name); frozen
    ones come from their source (e.g. the pretrained ``model.hf_path``), as training started."""
    model = build_model(cfg, vocab_size)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in trainable.items()},
                                                strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen |= {n for n, _ in model.named_buffers()}  # a backbone top's frozen BatchNorm statistics
    if unexpected or not set(missing) <= frozen:
        raise ValueError(f"trained weights do not fit the model of this config: missing "
                         f"{sorted(set(missing) - frozen)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()
