"""On one machine with the defaults, nothing the project starts listens beyond loopback: a local
extraction job (the whole local Ray it starts) and a one-process training run.

Each command runs in a session of its own; the test samples the listening sockets of the command and
of every descendant from start to exit, and checks them only once the servers that matter were seen
up, so that a pass cannot come from sampling too early.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
from PIL import Image

from helpers_dist import REPO, cpu_env, train_args

pytestmark = pytest.mark.integration

# Variables that would pick the interfaces for the code under test: the defaults are what is tested.
CHOSEN_BY_USER = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME",
                  "NCCL_SOCKET_IFNAME")
# The local Ray's servers that start with every job (the actor is waited for separately).
RAY_SERVERS = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


@dataclass(frozen=True, order=True)
class Listener:
    process: str
    pid: int
    proto: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) {self.proto} {self.ip}:{self.port}"


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # an IPv6 socket bound to ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(proc: psutil.Process) -> set[Listener]:
    """Its TCP sockets in LISTEN and its bound, unconnected UDP sockets."""
    found = set()
    name = proc.name()
    for conn in proc.net_connections(kind="inet"):
        if conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN:
            found.add(Listener(name, proc.pid, "tcp", conn.laddr.ip, conn.laddr.port))
        elif conn.type == socket.SOCK_DGRAM and conn.laddr and not conn.raddr:
            found.add(Listener(name, proc.pid, "udp", conn.laddr.ip, conn.laddr.port))
    return found


class Watched:
    """A command in its own session and the union of its process tree's listening sockets."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, to end them all
        self.listeners: set[Listener] = set()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            self.seen.setdefault(proc.pid, proc)
            try:
                self.listeners |= _listeners(proc)
            except psutil.NoSuchProcess:  # ended between the listing and the look
                continue

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sample()
            if ready():
                return
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.tail()}"
            time.sleep(0.25)

    def wait_exit(self, timeout: float) -> int:
        """Samples until the command exits (sockets opened late are checked too)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.sample()
            assert time.monotonic() < deadline, f"still running after {timeout} s:\n{self.tail()}"
            time.sleep(0.25)
        return self.proc.returncode

    def names_listening(self) -> set[str]:
        return {ln.process for ln in self.listeners}

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """Ends the session, then any process seen that left it; a finished run has none left."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in self.seen.values():
            try:
                proc.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        psutil.wait_procs(list(self.seen.values()), timeout=30)


@contextmanager
def watch(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[Watched]:
    watched = Watched(cmd, env, log)
    try:
        yield watched
    finally:
        watched.stop()


def default_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in CHOSEN_BY_USER}


def assert_loopback_only(listeners: set[Listener]) -> None:
    listing = "\n".join(map(str, sorted(listeners)))
    assert listeners, "no listening socket was seen at all"
    outside = [ln for ln in sorted(listeners) if not is_loopback(ln.ip)]
    assert not outside, ("listening beyond loopback:\n" + "\n".join(map(str, outside))
                         + f"\n\nall listening sockets:\n{listing}")


class Gate:
    """A FIFO standing in for an image: the actor that reads it blocks until `release`."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.fd: int | None = None

    def reader_waiting(self) -> bool:
        if self.fd is None:
            try:  # without a reader, a non-blocking open for writing fails with ENXIO
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
        return self.fd is not None

    def release(self, data: bytes) -> None:
        os.set_blocking(self.fd, True)
        os.write(self.fd, data)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _png(path: Path) -> bytes:
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, "PNG")
    return path.read_bytes()


def test_local_extraction_job_listens_on_loopback_only(tiny_vit, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    picture = _png(images / "open.png")
    gate = Gate(images / "gate.png")
    karpathy = tmp_path / "karpathy.json"
    karpathy.write_text(json.dumps({"dataset": "gate", "images": [
        {"filename": name, "split": "train",
         "sentences": [{"raw": "a red square", "tokens": ["a", "red", "square"]}]}
        for name in ("open.png", "gate.png")]}))
    cmd = [sys.executable, "-m", "app.cli", "extract", f"source.karpathy={karpathy}", f"source.images={images}",
           f"dest={tmp_path / 'out'}", f"backbone=hf:{tiny_vit}", "num_cpus=1", "progress=false"]
    try:
        with watch(cmd, default_env(dict(os.environ)), tmp_path / "extract.log") as job:
            # The actor is blocked on the gate: driver, GCS, raylet, agents and worker are all up.
            job.wait_until(lambda: gate.reader_waiting()
                           and all(any(server in name for name in job.names_listening())
                                   for server in RAY_SERVERS),
                           "local Ray with its actor reading the images", timeout=240)
            gate.release(picture)
            rc = job.wait_exit(timeout=120)
            assert rc == 0, job.tail()
    finally:
        gate.close()
    assert any(ln.pid == job.proc.pid for ln in job.listeners), "the driver was never seen listening"
    assert_loopback_only(job.listeners)


def test_one_process_training_listens_on_loopback_only(generated_shards, tmp_path):
    cmd = [sys.executable, "-m", "app.cli", "train",
           *train_args(generated_shards, tmp_path / "run", "train.epochs=1")]
    with watch(cmd, default_env(cpu_env()), tmp_path / "train.log") as run:
        # The process group listens from its creation to the exit: once its socket is seen, every
        # socket the rendezvous opened before it (a TCPStore) is seen with it.
        run.wait_until(lambda: any(ln.pid == run.proc.pid for ln in run.listeners),
                       "process group of the training process", timeout=180)
        rc = run.wait_exit(timeout=240)
        assert rc == 0, run.tail()
    assert_loopback_only(run.listeners)
