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


def _lock_is_free() -> bool:
    """Whether another open file description could take the registration lock now (flock locks of
    distinct opens conflict, even within one process)."""
    import fcntl

    from pipeline.data.shared_memory import REGISTRATION_LOCK

    with open(SHM / REGISTRATION_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_training_loader_registers_its_dataset_in_its_turn(tmp_path, monkeypatch, token_dataset):
    """Streaming picks a free prefix, then creates it: two jobs registering at the same moment on a node
    took the same one (FileExistsError '/000336_locals'). build_train_loader builds its StreamingDataset
    holding the node's registration lock, so another job's registration waits; a multi-node job does
    not take the lock."""
    import pipeline.data.loader as loader
    from pipeline.data.shared_memory import registration_turn

    seen = []

    class Watched(loader.StreamingDataset):  # the real dataset, built while the lock is checked
        def __init__(self, *args, **kwargs):
            seen.append(_lock_is_free())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loader, "StreamingDataset", Watched)
    data = token_dataset(tmp_path / "data", num_samples=32, seq_len=16, vocab_size=32)
    batch = next(iter(loader.build_train_loader(str(data), 4, 4, seed=0)))
    assert batch["input_ids"].shape == (4, 16)
    assert seen == [False] and _lock_is_free()  # held while registering, released after
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # one of several nodes: no turn taken
    with registration_turn() as took:
        assert not took and _lock_is_free()
