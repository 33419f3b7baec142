"""A local Ray for the tests that start one (extraction jobs, the Ray evaluator)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """``ray.init`` of a local cluster for the block, stopped after it. A start-up RPC deadline can
    pass on a saturated machine: then it tries once more."""
    import ray

    for attempt in range(2):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    try:
        yield
    finally:
        ray.shutdown()
