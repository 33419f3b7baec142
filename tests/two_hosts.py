"""Two hosts on one machine for the integration tests: ``scripts/two_hosts.sh`` driven from Python.

Host 1 (198.18.0.1) and host 2 (198.18.0.2) are network namespaces joined by a veth pair (the
interface is ``link0`` on both); each host's processes run in a mount namespace of their own where
:attr:`TwoHosts.disk` is that host's private folder and /tmp, /dev/shm are empty, so the hosts share
no file unless a test copies it to both (:meth:`TwoHosts.private` is a host's folder seen from
outside). Host 1 also serves moto's S3 (:meth:`TwoHosts.start_s3`) on its link address.

:func:`two_hosts_or_skip` skips only where namespaces cannot be made (not root, ``ip netns add``
refused); :meth:`TwoHosts.down` ends every process inside the namespaces and deletes them, also
after a failed test.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "two_hosts.sh"
IFNAME = "link0"
S3_PORT = 9000
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
_SUFFIX = itertools.count()


class TwoHosts:
    def __init__(self, name: str, disk: Path, root: Path):
        self.name, self.disk, self.root = name, disk, root
        self.addr = {1: "198.18.0.1", 2: "198.18.0.2"}
        self.procs: list[subprocess.Popen] = []
        self.s3_endpoint: str | None = None

    @classmethod
    def up(cls) -> "TwoHosts":
        name = f"s2h{os.getpid()}{'abcdefghijklmnopqrstuvwxyz'[next(_SUFFIX) % 26]}"
        subprocess.run(["bash", str(SCRIPT), "stale"], capture_output=True, text=True, timeout=60)
        done = subprocess.run(["bash", str(SCRIPT), "up", name], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "down", name], capture_output=True, timeout=60)
            raise RuntimeError(done.stderr.strip() or done.stdout.strip())
        fields = dict(f.split("=", 1) for f in done.stdout.split())
        disk = Path(fields["DISK"])
        return cls(name, disk, disk.parent)

    def private(self, host: int) -> Path:
        """Host ``host``'s private folder as seen from outside the hosts (it is :attr:`disk` inside)."""
        return self.root / f"host{host}"

    def command(self, host: int, cmd: Sequence[str]) -> list[str]:
        return ["bash", str(SCRIPT), "run", self.name, str(host), "--", *map(str, cmd)]

    def env(self, host: int, **extra: str) -> dict[str, str]:
        """A CPU training environment on ``host``: gloo on the link, S3 at host 1."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   GLOO_SOCKET_IFNAME=IFNAME, PYTHONPATH=str(REPO), **S3_ENV)
        if self.s3_endpoint:
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        env.update(extra)
        return env

    def start(self, host: int, cmd: Sequence[str], log: Path, **extra: str) -> subprocess.Popen:
        """``cmd`` on ``host`` in a session of its own, output to ``log`` (outside the hosts)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(host, cmd), cwd=REPO, env=self.env(host, **extra),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, host: int, cmd: Sequence[str], timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), cwd=REPO, env=self.env(host, **extra),
                              capture_output=True, text=True, timeout=timeout)

    def start_s3(self, log: Path) -> str:
        """moto's S3 server on host 1's link address; returns its endpoint (set for later commands)."""
        endpoint = f"http://{self.addr[1]}:{S3_PORT}"
        moto = Path(sys.executable).with_name("moto_server")
        self.start(1, [str(moto), "-H", self.addr[1], "-p", str(S3_PORT)], log)
        self.wait_http(2, endpoint, "moto S3")
        self.s3_endpoint = endpoint
        return endpoint

    def wait_http(self, host: int, url: str, what: str, timeout: float = 60) -> None:
        """Waits until ``url`` answers from ``host`` (any HTTP status)."""
        probe = ("import sys, urllib.request, urllib.error\n"
                 "try: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
                 "except urllib.error.HTTPError: pass\n")
        deadline = time.monotonic() + timeout
        while self.run(host, [sys.executable, "-c", probe, url], timeout=30).returncode != 0:
            assert time.monotonic() < deadline, f"{what} at {url} not answering from host {host}"
            time.sleep(0.5)

    def make_bucket(self, name: str) -> str:
        code = ("import boto3, os, sys\n"
                "boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL_S3']).create_bucket(Bucket=sys.argv[1])\n")
        done = self.run(2, [sys.executable, "-c", code, name], timeout=60)
        assert done.returncode == 0, done.stderr
        return f"s3://{name}"

    def link(self, up: bool) -> None:
        """Takes host 1's end of the link down or up (host 2's side stays configured)."""
        subprocess.run(["ip", "-n", f"{self.name}-h1", "link", "set", IFNAME, "up" if up else "down"],
                       check=True, timeout=30)

    def tx_bytes(self, host: int) -> int:
        """Bytes ``host`` has sent over the link (the veth's counter inside its namespace)."""
        out = subprocess.run(["ip", "netns", "exec", f"{self.name}-h{host}", "cat",
                              f"/sys/class/net/{IFNAME}/statistics/tx_bytes"],
                             capture_output=True, text=True, check=True, timeout=30)
        return int(out.stdout)

    def listening(self, host: int) -> str:
        """``ss -ltnup`` inside ``host``: its listening TCP and UDP sockets with their processes."""
        out = subprocess.run(["ip", "netns", "exec", f"{self.name}-h{host}", "ss", "-ltnupH"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc)
        subprocess.run(["bash", str(SCRIPT), "down", self.name], capture_output=True, timeout=120)


def two_hosts_or_skip() -> TwoHosts:
    """The hosts, or a skip naming why namespaces cannot be made here."""
    if os.geteuid() != 0:
        pytest.skip("two-host rehearsal: network namespaces need root")
    try:
        return TwoHosts.up()
    except (RuntimeError, FileNotFoundError) as err:
        pytest.skip(f"two-host rehearsal: cannot make network namespaces here: {err}")


def report(point: str, text: str) -> None:
    """One line per issue point, on stderr (pytest -s shows it; CI logs quote it)."""
    print(f"[two-hosts] {point}: {text}", file=sys.stderr, flush=True)

