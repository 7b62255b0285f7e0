"""MDS shards: one MDSWriter per output part (a subfolder), then one merged index.

Parts are numbered by position in the dataset, not by worker, so the shards and the merged
index are the same whatever the number of workers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import numpy.typing as npt

from .manifest import INDEX, file_sha256
from .output import Location


@dataclass(frozen=True)
class ShardOptions:
    compression: str | None
    hashes: tuple[str, ...]
    size_limit: int


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def ndarray_column(dtype: npt.DTypeLike, length: int) -> str:
    return f"ndarray:{np.dtype(dtype).name}:{length}"


def write_part(
    location: Location, columns: dict[str, str], samples: Iterable[dict[str, Any]], options: ShardOptions
) -> int:
    """Write ``samples`` into ``location`` (uploading when it has a remote); returns the count."""
    from streaming import MDSWriter

    count = 0
    with MDSWriter(
        out=location.mds_out,
        columns=columns,
        compression=options.compression,
        hashes=list(options.hashes),
        size_limit=options.size_limit,
        keep_local=True,
    ) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
        # finish() polls its upload queue with sleep(1), which would cost up to a second per
        # part: flush the last shard here and wait for the queue at a finer grain instead.
        if writer.new_samples:
            writer.flush_shard()
            writer._reset_cache()
        while writer.executor._work_queue.qsize():
            time.sleep(0.001)
    return count


def merge_parts(location: Location, parts: list[str]) -> str:
    """Merge the parts' indexes, in the given order, into ``location/index.json``; its sha256."""
    from streaming.base.util import merge_index

    indexes = [str(location.local / part / INDEX) for part in parts]
    # merge_index logs a WARNING on the root logger about its temporary folder on every call;
    # it is not a problem for the user, so keep it off their terminal.
    logging.disable(logging.WARNING)
    try:
        merge_index(indexes, location.mds_out, keep_local=True)
    finally:
        logging.disable(logging.NOTSET)
    return file_sha256(location.local / INDEX)
