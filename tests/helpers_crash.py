"""Runs ``scan`` and SIGKILLs itself just before one file-system step of one checkpoint save.

``python tests/helpers_crash.py SAVE OP -- <scan arguments>``: before the ``OP``-th file-system
step (1-based: each rename or directory removal of ``trainer.checkpoint``; each upload, marker
write or prefix removal of ``trainer.checkpoint_s3``) of the ``SAVE``-th call of ``save``, the
process kills itself, as a power cut or an OOM kill would. With
``SAVE 0`` nothing is killed and every step is printed to stderr as ``fs-step <save> <op> <what>``,
so a test can count them first.
"""
from __future__ import annotations

import os
import signal
import sys

from trainer import checkpoint, checkpoint_s3

KILL_SAVE, KILL_OP = int(sys.argv[1]), int(sys.argv[2])
state = {"save": 0, "op": 0}


def _counting(name, fn):
    def step(*args):
        state["op"] += 1
        print(f"fs-step {state['save']} {state['op']} {name} {' '.join(map(str, args))}",
              file=sys.stderr, flush=True)
        if (state["save"], state["op"]) == (KILL_SAVE, KILL_OP):
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args)
    return step


def _counting_save(fn):
    def save(*args, **kwargs):
        state["save"] += 1
        state["op"] = 0
        return fn(*args, **kwargs)
    return save


checkpoint._rename = _counting("rename", checkpoint._rename)
checkpoint._remove_tree = _counting("remove", checkpoint._remove_tree)
checkpoint.save = _counting_save(checkpoint.save)
# checkpoints in object storage (trainer.checkpoint_s3): each upload, marker write and removal
checkpoint_s3._upload_file = _counting("upload", checkpoint_s3._upload_file)
checkpoint_s3._write_marker = _counting("marker", checkpoint_s3._write_marker)
checkpoint_s3._remove_prefix = _counting("remove", checkpoint_s3._remove_prefix)
checkpoint_s3.save = _counting_save(checkpoint_s3.save)

if __name__ == "__main__":
    from app.cli import main

    assert sys.argv[3] == "--"
    sys.exit(main(sys.argv[4:]))
