"""Process environment that mosaicml-streaming needs, set up once before datasets are built."""

from __future__ import annotations

import os

_cleaned = False


def prepare_streaming_env(clean_shared_memory: bool = True) -> bool:
    """Call once per process, before building any StreamingDataset, never in the training loop.

    - The deepspeed launcher exports LOCAL_SIZE but not LOCAL_WORLD_SIZE; without the latter
      streaming takes every rank for a lone local rank and they collide on shared memory.
    - Shared memory left by a killed run makes the next one fail or hang: the blocks no process
      maps any more are unlinked (`shared_memory.clean_stale_streaming_memory`; not streaming's
      own cleaner, which also unlinks the blocks of another job's live dataset on the node).
    Returns whether this call cleaned.
    """
    global _cleaned
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if not clean_shared_memory or _cleaned:
        return False
    from pipeline.data.shared_memory import clean_stale_streaming_memory

    # one rank per node cleans, before any rank of this job builds its dataset (the barrier)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        clean_stale_streaming_memory()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    _cleaned = True
    return True
