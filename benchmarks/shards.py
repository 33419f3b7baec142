"""Shard read throughput: local disk vs. a local S3 server (moto, own process), 1 and 2 workers.

Samples are images with 36 x 2048 float16 regions (SCAN's bottom-up features, ~147 KB each) and
five captions; the pipeline runs as in training (``caption_batches``: a uniform shuffle, each image
read by byte range, decode, collate to float32) with one caption per image, so samples/s =
images/s. S3 is read by ranged GETs (one request per image) and, with ``data.cache_dir``, from local
copies of the shards fetched on first use.

    .venv/bin/python benchmarks/shards.py [--images 1200] [--shard-size 100] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataio.pipeline import caption_batches  # noqa: E402
from dataio.shard_writer import ShardWriter, write_manifest  # noqa: E402
from dataio.shards import ImageSample  # noqa: E402
from dataio.text import Vocab  # noqa: E402


def _samples(n: int):
    rng = np.random.default_rng(0)
    caps = ["a dog runs on the grass"] * 5
    toks = [c.split() for c in caps]
    for i in range(n):
        yield ImageSample(f"img{i:07d}", rng.standard_normal((36, 2048), dtype=np.float32), caps, toks)


def write_set(dest: str, n: int, shard_size: int) -> str:
    with ShardWriter(dest, split="bench", max_samples=shard_size) as w:
        for s in _samples(n):
            w.write(s)
    write_manifest(dest, w.records, split="bench", extractor={"name": "random"})
    return dest


def read_rate(spec: str, workers: int, batch_size: int, cache_dir: str = "") -> tuple[float, int]:
    """(images/s, images) for one full epoch on one rank."""
    loader = caption_batches(spec, batch_size=batch_size, encode=Vocab(["a", "dog"]), seed=0, epoch=0,
                             rank=0, world=1, num_workers=workers, caps_per_image=1, cache_dir=cache_dir)
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t0), n


def start_moto() -> tuple[subprocess.Popen, str]:
    from trainer.distributed import free_loopback_port

    port = free_loopback_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-shards-")
    proc, endpoint = start_moto()
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        local = write_set(os.path.join(tmp, "local"), args.images, args.shard_size)
        s3 = write_set("s3://bench/set", args.images, args.shard_size)
        size_mb = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local) if f.endswith(".tar")) / 1e6
        print(f"{args.images} images, 36 x 2048 float16 regions, {size_mb:.0f} MB in "
              f"{-(-args.images // args.shard_size)} shards; batch {args.batch_size}; one epoch each")
        print(f"{'storage':<24} {'workers':>7} {'images/s':>10} {'MB/s':>8}")
        rates = {}
        for name, spec in (("local", local), ("s3 (moto)", s3)):
            for workers in (1, 2):
                read_rate(spec, workers, args.batch_size) if name == "local" and workers == 1 else None  # warm page cache
                rate, n = read_rate(spec, workers, args.batch_size)
                assert n == args.images, (n, args.images)
                rates[name, workers] = rate
                print(f"{name:<24} {workers:>7} {rate:>10.0f} {rate * size_mb / args.images:>8.0f}")
        # data.cache_dir: the first epoch fetches each shard once, later ones read the local copies
        for workers in (1, 2):
            cache = os.path.join(tmp, f"cache{workers}")
            for epoch in ("1st", "2nd"):
                rate, n = read_rate(s3, workers, args.batch_size, cache_dir=cache)
                assert n == args.images, (n, args.images)
                rates[f"s3 cached {epoch}", workers] = rate
                print(f"{'s3 cached, ' + epoch + ' epoch':<24} {workers:>7} {rate:>10.0f} "
                      f"{rate * size_mb / args.images:>8.0f}")
        for w in (1, 2):
            print(f"s3/local, {w} worker(s): {rates['s3 (moto)', w] / rates['local', w]:.2f}; "
                  f"cached, 2nd epoch: {rates['s3 cached 2nd', w] / rates['local', w]:.2f}")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
