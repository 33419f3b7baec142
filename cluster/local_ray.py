"""Start a local Ray that listens on 127.0.0.1 only, or join a running cluster.

Import ``ray`` from here (``from cluster.local_ray import ray, session``): the module must run
before ray is first imported. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when
``ray._private.ray_constants`` is imported; while it is on (Linux's default) ``ray.init`` replaces a
loopback node address by the machine's interface address, and the GCS, raylet, object manager,
workers, dashboard and runtime-env agents and metrics servers then listen on every interface (or on
the interface address). With it off the node address is 127.0.0.1 and each of those servers binds
127.0.0.1 only. A process that joins a cluster (``ray job submit`` sets ``RAY_ADDRESS``) is left as
it is: the cluster's own settings apply.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"
CLUSTER_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

if not os.environ.get("RAY_ADDRESS"):
    # setdefault: a user who sets the flag chooses Ray's behaviour. Inherited by the local Ray's
    # processes, which then agree with this driver on the node address.
    os.environ.setdefault(CLUSTER_FLAG, "0")

import ray  # noqa: E402  (after the flag, see the module docstring)

log = logging.getLogger(__name__)


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join the given cluster, or RAY_ADDRESS (set by `ray job submit`), or start a local Ray.
    True when this call started a local Ray (the caller's to shut down when done with it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    # No dashboard (nothing here serves it); its host would default to 127.0.0.1 anyway.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    _warn_unless_loopback()
    return True


@contextlib.contextmanager
def session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """:func:`connect` for the block; a local Ray it started is shut down after it (idle, its ~9
    processes still took 7% of a core). A joined cluster, or a Ray already running, stays."""
    started = connect(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _warn_unless_loopback() -> None:
    """The flag only works when set before ray's first import: say so when it came too late."""
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        log.warning("the local Ray runs on %s, not %s: its servers listen beyond loopback (%s was "
                    "not 0 when ray was first imported: import cluster.local_ray before ray)",
                    node_ip, LOOPBACK, CLUSTER_FLAG)
