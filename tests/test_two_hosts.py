"""The two-host rehearsal (issue 33): two network namespaces joined by a veth pair (198.18.0.1 and
198.18.0.2), each host with a disk of its own, moto's S3 and Prometheus on host 1. A paper recipe
(F30K t2i LSE, bf16, ZeRO 1, the global batch of 128) at tiny widths trains with one rank per host
over gloo on the link, shards and checkpoints in S3:

- uninterrupted (``deepspeed --hostfile --no_ssh --node_rank R``), scraped by Prometheus over the
  link, the listening sockets of each host sampled meanwhile;
- host 2's rank SIGKILLed mid-epoch, both restarted with ``--resume latest``: the same losses;
- the evaluation sharded over both hosts equals one process's.

Each test prints one ``[two-hosts] point N: ...`` line with its figures (pytest -s shows them).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest

from trainer.telemetry import read_run_log
from two_hosts import REPO, TwoHosts, report, two_hosts_or_skip

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
BUCKET = "rehearsal"
STEPS = 7  # 60 images x 5 captions / 128: 3 steps per epoch (the last short); checkpoints every 2 steps
RECIPE = "configs/f30k_t2i_lse.yaml"
PROM_PORT, METRICS_PORT = 9090, 9400


def _shards_code(dest: str, n: int, seed: int, split: str, shard_size: int) -> list[str]:
    code = ("import sys\nfrom dataio.sources.synthetic import write_synthetic\n"
            "print(write_synthetic(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]), split=sys.argv[4], "
            "dim=64, shard_size=int(sys.argv[5])))\n")
    return [sys.executable, "-c", code, dest, str(n), str(seed), split, str(shard_size)]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = two_hosts_or_skip()
    try:
        h.logs = tmp_path_factory.mktemp("two_hosts_logs")
        h.start_s3(h.logs / "moto.log")
        h.make_bucket(BUCKET)
        for dest, n, seed, split, size in ((f"s3://{BUCKET}/train", 60, 0, "train", 15),
                                           (f"s3://{BUCKET}/val", 40, 1, "val", 20)):
            done = h.run(2, _shards_code(dest, n, seed, split, size), timeout=120)  # over the link
            assert done.returncode == 0, done.stderr[-3000:]
        for host in (1, 2):  # each host's own copy of the hostfile
            (h.private(host) / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
        report("point 1", f"hosts {h.name}-h1 ({h.addr[1]}) and {h.name}-h2 ({h.addr[2]}) up, private "
                          f"disks at {h.disk}, S3 at {h.s3_endpoint}, shards written from host 2")
        yield h
    finally:
        h.down()
        gone = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert h.name not in gone, f"namespaces of {h.name} left behind:\n{gone}"


def _overrides(h: TwoHosts, run: str, host: int, *extra: str) -> list[str]:
    return [f"data.train_shards=s3://{BUCKET}/train/manifest.json", "data.val_shards=",
            f"train.output_dir=s3://{BUCKET}/{run}", f"train.staging_dir={h.disk}/{run}",
            "model.img_dim=64", "model.embed_size=8", "model.word_dim=8", "data.num_workers=1",
            f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.keep_checkpoints=2", "train.log_every=1",
            "metrics.enabled=false", *extra]


def _deepspeed(h: TwoHosts, run: str, port: int, *extra: str, resume: str | None = None,
               metrics: bool = False) -> dict[int, subprocess.Popen]:
    procs = {}
    for host in (1, 2):
        more = ["metrics.enabled=true", f"metrics.addr={h.addr[host]}", f"metrics.port_base={METRICS_PORT}",
                "metrics.targets_dir="] if metrics else []
        cmd = [BIN / "deepspeed", "--hostfile", h.disk / "hostfile", "--no_ssh", "--node_rank", host - 1,
               "--master_addr", h.addr[1], "--master_port", port, "--module", "app.cli", "train",
               "--config", RECIPE, *_overrides(h, run, host, *extra, *more)]
        cmd += ["--resume", resume] if resume else []
        procs[host] = h.start(host, cmd, h.logs / f"{run}-host{host}.log")
    return procs


def _wait(h: TwoHosts, procs: dict[int, subprocess.Popen], run: str, timeout: float = 420) -> dict[int, int]:
    codes = {}
    for host, proc in procs.items():
        try:
            codes[host] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            h.stop(proc)
            pytest.fail(f"{run} on host {host} still running after {timeout} s:\n{_tail(h, run, host)}")
    return codes


def _tail(h: TwoHosts, run: str, host: int) -> str:
    return (h.logs / f"{run}-host{host}.log").read_text(errors="replace")[-4000:]


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_run_log(path) if r["kind"] == "step"}


def _is_rank(proc: psutil.Process) -> bool:
    argv = proc.cmdline()  # torchrun's own command line has "-m app.cli" too
    return (any(a == "-m" and b == "app.cli" for a, b in zip(argv, argv[1:]))
            and not any(a.endswith("torchrun") for a in argv))


def _rank_pid(h: TwoHosts, host: int) -> int | None:
    """The training rank's process on ``host`` (``python -u -m app.cli ...`` under a launcher; not
    one of its data-loader workers, which share its command line)."""
    out = subprocess.run(["ip", "netns", "pids", f"{h.name}-h{host}"], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            proc = psutil.Process(pid)
            if _is_rank(proc) and not _is_rank(proc.parent()):
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def _wait_for_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and re.search(pattern, path.read_text(errors="replace"))):
        assert proc.poll() is None, f"exited before {pattern!r}:\n{path.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s"
        time.sleep(0.2)


def _prometheus_bin() -> str:
    """Debian's prometheus, installed by scripts/ensure_prometheus.sh when missing (as
    tests/test_prometheus_scrape.py does; a skip only where apt-get is unavailable)."""
    found = shutil.which("prometheus")
    if found:
        return found
    done = subprocess.run(["bash", str(REPO / "scripts" / "ensure_prometheus.sh")], capture_output=True,
                          text=True, timeout=600)
    if done.returncode == 2:
        pytest.skip(f"prometheus is not installed and cannot be installed here: {done.stderr.strip()}")
    assert done.returncode == 0 and shutil.which("prometheus"), done.stderr[-3000:]
    return shutil.which("prometheus")


def _prometheus(h: TwoHosts) -> subprocess.Popen:
    binary = _prometheus_bin()
    folder = h.private(1) / "prometheus"
    folder.mkdir()
    targets = [f"{h.addr[1]}:{METRICS_PORT}", f"{h.addr[2]}:{METRICS_PORT}"]
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: scan\n    static_configs:\n      - targets: {json.dumps(targets)}\n")
    inside = h.disk / "prometheus"
    proc = h.start(1, [binary, f"--config.file={inside / 'prometheus.yml'}",
                       f"--storage.tsdb.path={inside / 'tsdb'}", f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
                   h.logs / "prometheus.log")
    h.wait_http(1, f"http://127.0.0.1:{PROM_PORT}/-/ready", "prometheus")
    return proc


def _query_range(h: TwoHosts, query: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": 1})
    code = ("import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n")
    done = h.run(1, [sys.executable, "-c", code, f"http://127.0.0.1:{PROM_PORT}/api/v1/query_range?{params}"])
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["status"] == "success", body
    return body["data"]["result"]


class _Listening:
    """Samples ``ss`` inside each host while a run is up: (host, address:port, process) seen."""

    def __init__(self, h: TwoHosts):
        self.h, self.seen, self._stop = h, set(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for host in (1, 2):
                for line in self.h.listening(host).splitlines():
                    parts = line.split()
                    proc = re.search(r'"([^"]+)"', line)
                    self.seen.add((host, parts[0], parts[4], proc.group(1) if proc else "?"))
            self._stop.wait(0.5)

    def stop(self) -> set:
        self._stop.set()
        self._thread.join()
        return self.seen


@pytest.fixture(scope="module")
def straight(hosts):
    """The uninterrupted run, Prometheus scraping both ranks, the listening sockets sampled."""
    prom = _prometheus(hosts)
    listening = _Listening(hosts)
    start = time.time()
    procs = _deepspeed(hosts, "straight", 29500, metrics=True)
    codes = _wait(hosts, procs, "straight")
    seen = listening.stop()
    assert codes == {1: 0, 2: 0}, _tail(hosts, "straight", 1) + _tail(hosts, "straight", 2)
    series = _query_range(hosts, "scan_train_loss", start - 5, time.time() + 1)
    hosts.stop(prom)
    return {"losses": _losses(hosts.private(1) / "straight" / "metrics.jsonl"), "series": series,
            "listening": seen}


def test_uninterrupted_run_trains_across_the_link(hosts, straight):
    losses = straight["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    log = (hosts.logs / "straight-host1.log").read_text(errors="replace")
    assert "batch: global 128 captions = 2 rank(s) x 64" in log
    assert not (hosts.private(2) / "straight" / "metrics.jsonl").exists()  # rank 0's log is host 1's
    report("point 3", f"2 hosts x 1 rank (deepspeed --no_ssh, gloo on link0), {STEPS} steps, losses "
                      + ", ".join(f"{losses[s]:.5f}" for s in sorted(losses)))


def test_prometheus_scrapes_both_hosts(straight):
    by_rank = {s["metric"]["rank"]: s for s in straight["series"]}
    assert set(by_rank) == {"0", "1"}, straight["series"]
    instances = {s["metric"]["instance"] for s in straight["series"]}
    assert instances == {f"198.18.0.1:{METRICS_PORT}", f"198.18.0.2:{METRICS_PORT}"}
    last = {r: float(s["values"][-1][1]) for r, s in by_rank.items()}
    report("point 5", f"query scan_train_loss -> {len(by_rank)} series: "
                      + "; ".join(f"rank {r} at {by_rank[r]['metric']['instance']} last {v:.5f}"
                                  for r, v in sorted(last.items())))


def test_what_listens_on_each_host(straight):
    seen = straight["listening"]
    table = sorted(seen)
    lines = [f"host{h} {proto} {addr} {proc}" for h, proto, addr, proc in table]
    on_link = [(h, a, p) for h, _, a, p in table if not a.startswith(("127.", "[::1]"))]
    # what must be on the link: S3 and the exporters (scraped from host 1), the rendezvous store and
    # gloo's pair sockets (the peer connects to them)
    assert any(a == f"198.18.0.1:{METRICS_PORT}" for h, a, p in on_link if h == 1), lines
    assert any(a == f"198.18.0.2:{METRICS_PORT}" for h, a, p in on_link if h == 2), lines
    assert f"127.0.0.1:{PROM_PORT}" in {a for _, _, a, _ in table}  # Prometheus: loopback of host 1
    report("point 6", "listening during the two-host run: " + " | ".join(lines))


def test_killed_rank_resumes_with_the_same_losses(hosts, straight):
    run = "killed"
    procs = _deepspeed(hosts, run, 29510)
    _wait_for_line(hosts.logs / f"{run}-host1.log", r"step 4 loss", procs[1])
    pid = _rank_pid(hosts, 2)
    assert pid is not None, "host 2's rank not found"
    psutil.Process(pid).kill()  # SIGKILL, mid-epoch 1 (steps 4-6)
    codes = _wait(hosts, procs, run, timeout=180)
    assert codes[1] != 0 and codes[2] != 0, codes  # host 1's rank lost its peer and stopped
    before = _losses(hosts.private(1) / run / "metrics.jsonl")
    assert len(before) < STEPS
    procs = _deepspeed(hosts, run, 29520, resume="latest")
    codes = _wait(hosts, procs, run)
    assert codes == {1: 0, 2: 0}, _tail(hosts, run, 1) + _tail(hosts, run, 2)
    assert "resumed from" in (hosts.logs / f"{run}-host2.log").read_text()  # from the bucket
    got, want = _losses(hosts.private(1) / run / "metrics.jsonl"), straight["losses"]
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    report("point 3", f"host 2's rank SIGKILLed after step {max(before)}; both resumed with --resume latest: "
                      + ", ".join(f"step {s} {got[s]:.5f} (uninterrupted {want[s]:.5f})" for s in sorted(got)))


def test_evaluation_sharded_over_both_hosts_equals_one_process(hosts, straight):
    args = ["-m", "app.cli", "evaluate", "--run-dir", f"s3://{BUCKET}/straight",
            "--shards", f"s3://{BUCKET}/val/manifest.json", "eval.protocol=split"]
    one = hosts.run(1, [sys.executable, *args, "--out", hosts.disk / "eval-one"], timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    procs = {host: hosts.start(host, [BIN / "torchrun", "--nnodes", "2", "--nproc_per_node", "1",
                                      "--node-rank", host - 1, "--master-addr", hosts.addr[1],
                                      "--master-port", "29700", "--local-addr", hosts.addr[host],
                                      *args, "--out", hosts.disk / "eval-two"],
                               hosts.logs / f"eval-host{host}.log") for host in (1, 2)}
    codes = _wait(hosts, procs, "eval")
    assert codes == {1: 0, 2: 0}, _tail(hosts, "eval", 1) + _tail(hosts, "eval", 2)
    single = json.loads((hosts.private(1) / "eval-one" / "metrics.json").read_text())["metrics"]
    sharded = json.loads((hosts.private(1) / "eval-two" / "metrics.json").read_text())["metrics"]
    assert "rsum" in single and sharded == single
    report("point 3", f"evaluation sharded over both hosts = one process: rsum {sharded['rsum']:.4f}, "
                      f"all {len(single)} figures equal")


def test_link_down_during_training_and_s3_reads(hosts, straight):
    """The veth down for 4 s mid-epoch: host 2 is then reading shards from S3 and exchanging
    gradients with host 1; TCP's retransmissions and the storage retries carry the run through."""
    run = "linkdown"
    procs = _deepspeed(hosts, run, 29530)
    _wait_for_line(hosts.logs / f"{run}-host1.log", r"step 4 loss", procs[1])
    hosts.link(False)
    down = subprocess.run(["ip", "netns", "exec", f"{hosts.name}-h2", "cat", "/sys/class/net/link0/operstate"],
                          capture_output=True, text=True).stdout.strip()
    time.sleep(4)
    hosts.link(True)
    assert down in ("down", "lowerlayerdown"), down  # host 2 lost its carrier: nothing crosses the link
    codes = _wait(hosts, procs, run)
    assert codes == {1: 0, 2: 0}, _tail(hosts, run, 1) + _tail(hosts, run, 2)
    got, want = _losses(hosts.private(1) / run / "metrics.jsonl"), straight["losses"]
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    listing = hosts.run(2, [sys.executable, "-c", "import sys; from dataio import storage; "
                            "print('\\n'.join(storage.sizes(sys.argv[1])))", f"s3://{BUCKET}/{run}"])
    assert listing.returncode == 0, listing.stderr
    keys = listing.stdout.split()
    prefixes = {k.split("/")[1] for k in keys if k.startswith("checkpoints/step")}
    assert prefixes and all(f"checkpoints/{p}/COMPLETE" in keys for p in prefixes), keys
    assert not [k for k in keys if ".tmp-" in k], keys
    retried = (hosts.logs / f"{run}-host2.log").read_text().count("retrying in")
    slowest = max(r["step_time_s"] for r in read_run_log(hosts.private(1) / run / "metrics.jsonl")
                  if r["kind"] == "step" and r["step"] > 4)
    report("point 7", f"link0 down 4 s after step 4: the run finished, losses of steps 1-{STEPS} equal the "
                      f"uninterrupted run's, {retried} storage retries logged on host 2, "
                      f"{len(prefixes)} checkpoints in S3 all complete, no temporary object; slowest later step "
                      f"{slowest:.1f} s")
