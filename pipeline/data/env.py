"""Process environment that mosaicml-streaming needs, set up once before datasets are built."""

from __future__ import annotations

import os

_cleaned = False


def prepare_streaming_env(clean_shared_memory: bool = True) -> bool:
    """Call once per process, before building any StreamingDataset, never in the training loop.

    - The deepspeed launcher exports LOCAL_SIZE but not LOCAL_WORLD_SIZE; without the latter
      streaming takes every rank for a lone local rank and they collide on shared memory.
    - Shared memory left by a killed run makes the next one fail or hang; streaming's cleaner
      runs on local rank 0 (a barrier when torch.distributed is up), so this cleans once per
      node. It also unlinks the blocks of live streaming datasets on the node, hence the
      once-only guard.
    Returns whether this call cleaned.
    """
    global _cleaned
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if not clean_shared_memory or _cleaned:
        return False
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    _cleaned = True
    return True
