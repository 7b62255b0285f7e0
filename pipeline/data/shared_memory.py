"""mosaicml-streaming's shared memory on this node: clean what dead processes left, spare live datasets.

Streaming keeps each dataset's coordination state in POSIX shared-memory blocks named
`/dev/shm/NNNNNN_<name>` (a prefix number per dataset) and maps them for the dataset's lifetime.
A killed run leaves its blocks behind, and the next run may then take its local directory for one
in use. Streaming's own cleaner unlinks every such block, also those of a dataset another job is
using on the same node; here a block is stale only when no process maps it: its (device, inode)
appears in no /proc/PID/maps (blocks of other users, whose maps we cannot read, are left alone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM = Path("/dev/shm")
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
