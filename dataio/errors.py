"""Bad-input reporting: one error type naming shard, key and problem, and a skip counter.

With ``on_error="raise"`` (the default) a bad sample stops the run with :class:`DataError`.
With ``on_error="skip"`` it is logged, counted and left out. Counts made in DataLoader worker
processes travel back with each batch (``CaptionBatch.skipped``) and are added to :data:`SKIPS`
in the training process, so ``dataio.errors.SKIPS.get()`` is the figure to export as a metric.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Literal

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A bad shard or sample; the message names the shard, the sample key and the problem."""

    def __init__(self, shard: str, key: str | None = None, problem: str | None = None,
                 kind: str = "bad_sample"):
        # kind: a short category for the skip counter, e.g. "corrupt_tar", "non_finite".
        self.shard, self.key, self.problem, self.kind = shard, key, problem, kind
        # A DataLoader worker's error is re-raised in the main process as DataError(message):
        # then ``shard`` holds the whole, already formatted message.
        super().__init__(shard if problem is None else f"shard {shard!r}, key {key!r}: {problem}")


class SkipCounter:
    """Skipped samples by problem kind (thread-safe)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def merge(self, counts: dict[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    def get(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


SKIPS = SkipCounter()


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def handle(err: DataError, on_error: OnError, counter: SkipCounter) -> None:
    """Raise ``err``, or log and count it when skipping."""
    if on_error == "raise":
        raise err
    log.warning("skipping bad input: %s", err)
    counter.add(err.kind)
