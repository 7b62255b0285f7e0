"""Checkpoints under <run_dir>/checkpoints/, safe against a kill at any moment.

Layout: one directory per checkpoint tag (`step_00000040/`) holding the engine's files
(DeepSpeed's format, or torch.distributed.checkpoint's for FSDP; written by every rank),
our `trainer_state.json` and, last, a `COMPLETE` marker; and a `latest` file naming the
newest complete tag.

Saving (collective): rank 0 removes any leftover directory of that tag (from an
interrupted run), barrier; every rank writes its part; barrier; rank 0 writes
trainer_state.json and COMPLETE (fsynced), then replaces `latest` atomically
(temp file + rename), then deletes complete tags beyond the last `keep_last` and
incomplete ones. A kill before the rename leaves `latest` on the previous
complete checkpoint; resumption ignores tags without COMPLETE (hooks.py can kill a run
between the two, to test it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.training import comm

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write to a temp file, fsync, rename over `path` (atomic), fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- reading (any rank, no collectives)
    def is_complete(self, tag: str) -> bool:
        return (self.root / tag / COMPLETE).is_file() and (self.root / tag / TRAINER_STATE).is_file()

    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if p.is_dir() and TAG.match(p.name) and self.is_complete(p.name)]
        return sorted(tags)

    def latest_tag(self) -> Optional[str]:
        """The tag `latest` names if complete; else the newest complete tag; None when there is none."""
        try:
            named = (self.root / LATEST).read_text().strip()
        except OSError:
            named = ""
        if named and self.is_complete(named):
            return named
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def trainer_state(self, tag: str) -> dict:
        return json.loads((self.root / tag / TRAINER_STATE).read_text())

    # -- saving (collective: call on every rank)
    def begin_save(self, tag: str) -> str:
        if comm.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            leftover = self.root / tag
            if leftover.exists():  # written by an interrupted run after the checkpoint it resumed from
                shutil.rmtree(leftover)
        comm.barrier()
        return str(self.root)

    def finish_save(self, tag: str, trainer_state: dict) -> None:
        comm.barrier()  # every rank has written its part
        if comm.rank() == 0:
            directory = self.root / tag
            write_durable(directory / TRAINER_STATE, json.dumps(trainer_state, indent=1, sort_keys=True))
            write_durable(directory / COMPLETE, "")
            write_durable(self.root / LATEST, tag)
            self.rotate(keep=tag)
        comm.barrier()

    def rotate(self, keep: str) -> None:
        complete = self.complete_tags()
        survivors = set(complete[-self.keep_last :]) | {keep}
        for path in self.root.iterdir():
            if path.is_dir() and TAG.match(path.name) and path.name not in survivors:
                shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
