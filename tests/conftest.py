"""Shared fixtures: a real moto S3 server over HTTP on 127.0.0.1, a generated shard set, and the
real Flickr8k photos of ../shared/data/flickr8k (found beside the repository, as in CI)."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"

# Dummy credentials for the local server only; every S3 client in the session resolves them (and
# the endpoint) from the standard AWS environment variables, as in production.
_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)  # for subprocesses (Ray jobs, CLIs)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_kwargs())

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its ``s3://`` URL."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def _boto_kwargs() -> dict:
    return {"aws_access_key_id": _S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": _S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": _S3_ENV["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1 for the whole session.

    Sets ``AWS_ENDPOINT_URL_S3`` and dummy credentials in ``os.environ`` (restored afterwards), so
    code under test finds the server the standard way, with no endpoint passed in.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def generated_shards(tmp_path_factory) -> str:
    """Manifest path of a generated captioned-region set: 120 train images x 5 captions,
    9 regions x 64-d features (dataio.sources.synthetic), 4 shards of 30 images."""
    from dataio.sources.synthetic import write_synthetic

    dest = Path(tmp_path_factory.mktemp("generated_shards")) / "train"
    return write_synthetic(str(dest), 120, seed=0, split="train", dim=64, shard_size=30)


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The Flickr8k folder (dataset_flickr8k.json: train 6,000, val 1,000; images/). Missing, the
    tests that need it skip with this reason, and fail under CI, where it must be present."""
    if not (FLICKR8K / "dataset_flickr8k.json").is_file():
        reason = f"Flickr8k not found at {FLICKR8K} (../shared/data/flickr8k beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return FLICKR8K


def _save_tiny_model(tmp_path_factory, name: str, build) -> Path:
    """``build()`` (a transformers model, made after seeding) saved into a fresh temporary folder."""
    import torch

    torch.manual_seed(_TINY_SEEDS[name])
    path = tmp_path_factory.mktemp(name)
    build().save_pretrained(path)
    return path


_TINY_SEEDS = {"tiny_vit": 0, "tiny_bert": 5}


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """Directory of a tiny random ViT saved as a local transformers model: 32 px, 4 x 4 patches, D = 24."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=48)
    return str(_save_tiny_model(tmp_path_factory, "tiny_vit",
                                lambda: ViTModel(cfg, add_pooling_layer=False).eval()))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random BERT saved as a local transformers model: vocabulary 50, H = 16."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return _save_tiny_model(tmp_path_factory, "tiny_bert", lambda: BertModel(config))
