"""mosaicml-streaming's shared memory on this node: clean what dead processes left, spare live datasets.

Streaming keeps each dataset's coordination state in POSIX shared-memory blocks named
`/dev/shm/NNNNNN_<name>` (a prefix number per dataset) and maps them for the dataset's lifetime.
A killed run leaves its blocks behind, and the next run may then take its local directory for one
in use. Streaming's own cleaner unlinks every such block, also those of a dataset another job is
using on the same node; here a block is stale only when no process maps it: its (device, inode)
appears in no /proc/PID/maps (blocks of other users, whose maps we cannot read, are left alone).
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

SHM = Path("/dev/shm")
REGISTRATION_LOCK = "melt_streaming_registration.lock"
_STREAMING_BLOCK = re.compile(r"\d{6}_\w+")


def mapped_files() -> set[tuple[int, int]]:
    """(device, inode) of every file some process on this machine maps (what /proc lets us read)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # the process ended, or is not ours
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                mapped.add((os.makedev(major, minor), int(fields[4])))
    return mapped


def clean_stale_streaming_memory(shm: Path = SHM) -> list[str]:
    """Unlink streaming's blocks that no process maps; returns their names."""
    if not shm.is_dir():
        return []
    mapped = mapped_files()
    removed = []
    for block in shm.iterdir():
        if not _STREAMING_BLOCK.fullmatch(block.name):
            continue
        try:
            stat = block.stat()
            if stat.st_uid != os.getuid() or (stat.st_dev, stat.st_ino) in mapped:
                continue
            block.unlink()
            removed.append(block.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


@contextmanager
def registration_turn(shm: Path = SHM) -> Iterator[bool]:
    """Jobs on one node take turns registering their datasets' shared memory (yields whether this job
    took a turn).

    Streaming picks a dataset's prefix as the first number free in /dev/shm, then creates it: two jobs
    doing so at the same moment pick the same number and one dies (FileExistsError '/000336_locals').
    Here a single-node job's local leader holds an exclusive lock on a file beside the blocks (as
    node-local as they are) for the whole registration, and the job's other ranks start theirs only
    once it holds it (a barrier), so no rank scans while another job registers. A multi-node job does
    not take a turn: waiting on one node while holding another could deadlock two jobs that share nodes.
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world or not shm.is_dir():
        yield False
        return
    handle = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        handle = open(shm / REGISTRATION_LOCK, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        if distributed:
            dist.barrier()
        yield True
        if distributed:
            dist.barrier()
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
