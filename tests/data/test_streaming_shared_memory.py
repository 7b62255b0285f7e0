"""Cleaning streaming's shared memory spares the blocks a live process maps (another job's dataset on
the node) and removes those a dead one left (pipeline/data/shared_memory.py)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from multiprocessing import shared_memory

from pipeline.data.shared_memory import SHM, clean_stale_streaming_memory


def _block_name() -> str:
    # streaming's pattern (6 digits, then a name), far from the prefixes a real dataset takes
    return f"{900000 + uuid.uuid4().int % 99999:06d}_test_{uuid.uuid4().hex[:8]}"


def test_stale_blocks_go_live_ones_stay():
    stale, live = _block_name(), _block_name()
    # a process that creates a block and dies without unlinking it (as a killed run does)
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from multiprocessing import shared_memory, resource_tracker
shm = shared_memory.SharedMemory({stale!r}, create=True, size=64)
resource_tracker.unregister(shm._name, "shared_memory")  # as after a SIGKILL: nobody unlinks it
""",
        ],
        check=True,
    )
    # a live process holding its block mapped (a dataset of another job)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory({live!r}, create=True, size=64)
print("mapped", flush=True)
sys.stdin.read()
shm.close(); shm.unlink()
""",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert (SHM / stale).exists() and (SHM / live).exists()
        removed = clean_stale_streaming_memory()
        assert stale in removed and live not in removed
        assert not (SHM / stale).exists() and (SHM / live).exists()
        mine = shared_memory.SharedMemory(_block_name(), create=True, size=64)  # mapped by this process
        try:
            assert mine.name.lstrip("/") not in clean_stale_streaming_memory()
        finally:
            mine.close()
            mine.unlink()
    finally:
        holder.communicate("", timeout=30)
        for name in (stale, live):
            (SHM / name).unlink(missing_ok=True)
