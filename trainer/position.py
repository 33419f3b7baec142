"""Where training stands (:class:`Position`), what a checkpoint records of it, and resuming from it.

The position holds the epoch, the optimizer step and the epoch's segments (world size, captions
consumed per rank), from which ``dataio.pipeline`` re-plans exactly the captions not yet seen, on
any world size. A mid-epoch checkpoint continues only while :func:`data_identity` is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from dataio import storage
from dataio.pipeline import resolve_shards
from dataio.text import TextEncoder, Vocab
from scan.config import ExperimentConfig
from scan.configfile import ConfigError, to_dict
from trainer.distributed import DistEnv

log = logging.getLogger(__name__)


def data_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides an epoch's caption order: a checkpoint taken mid-epoch can continue it only
    while these are unchanged (world size, batch size and workers may change)."""
    shards = resolve_shards(cfg.data.train_shards)
    digest = hashlib.blake2b(json.dumps([[storage.basename(s.url), list(s.caption_counts)]
                                          for s in shards]).encode(), digest_size=12).hexdigest()
    return {"data.train_shards": digest, "data.caps_per_image": cfg.data.caps_per_image,
            "data.resampled": cfg.data.resampled, "train.seed": cfg.train.seed}


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    samples: int = 0  # captions this rank consumed in `epoch` since `segments`, at world `world`
    step: int = 0  # optimizer steps done
    world: int = 1
    segments: list[list[int]] = field(default_factory=list)  # earlier runs of `epoch`: [world, captions per rank]

    def epoch_segments(self) -> list[tuple[int, int]]:
        """Every run of the current epoch so far, this one included (for the data plan)."""
        done = [(int(w), int(n)) for w, n in self.segments]
        return done + [(self.world, self.samples)] if self.samples else done

    def continued(self, world: int) -> "Position":
        """The position a run on ``world`` ranks continues from (its own segment starts empty)."""
        return Position(self.epoch, 0, self.step, world, [list(s) for s in self.epoch_segments()])


def client_state(cfg: ExperimentConfig, pos: Position, vocab_path: str, enc: TextEncoder,
                  data: dict[str, Any]) -> dict[str, Any]:
    itos = enc.itos if isinstance(enc, Vocab) else None
    return {"scan_position": {**vars(pos), "segments": [list(s) for s in pos.segments]},
            "scan_config": to_dict(cfg), "scan_data": data,
            "scan_vocab": {"path": vocab_path, "itos": itos}}


def resumed_position(state: dict[str, Any], data: dict[str, Any], env: DistEnv) -> Position:
    """The checkpoint's position, continued on this run's world size; refuses a mid-epoch
    checkpoint whose epoch order this run's config would change (naming the keys)."""
    pos = Position(**state["scan_position"])
    if pos.epoch_segments():  # inside an epoch
        saved = state.get("scan_data", {})
        changed = {k: (saved.get(k), v) for k, v in data.items() if saved.get(k) != v}
        if changed:
            listed = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"--resume: the checkpoint is inside epoch {pos.epoch}, and this run would order "
                f"that epoch differently ({listed}). Set those keys back to the checkpoint's values, "
                f"or resume from a checkpoint taken at an epoch end (one is saved after every epoch)")
        if pos.world != env.world:
            log.info("resuming inside epoch %d on %d ranks (the checkpoint ran %d): the rest of the "
                     "epoch is re-planned over %d ranks, every caption still seen once", pos.epoch,
                     env.world, pos.world, env.world)
    return pos.continued(env.world)
