"""Training-side reader of a prepared dataset: StreamingDataset + StreamingDataLoader, with the
manifest checked first and the loader state wrapped in a fingerprint (docs/data.md#72-loader-state-and-fingerprint).

Batches are dicts of LongTensors: ``input_ids`` [B, S] and ``labels`` [B, S] (HF convention,
-100 ignored; from the ``labels`` column, or from ``loss_mask``, or a copy of the ids for
concatenated text), plus ``difficulty`` and ``prompt_length`` [B] when the dataset has them, and
``attention_mask`` [B, S] (0 on the left padding) when its rows are left-padded (synthetic tasks),
and ``segment_ids`` [B, S] (a conversation's number in its row, 0 on the right padding) for
right-padded rows (chat, text `--pack pad`): the losses read real tokens from them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, read_manifest
from pipeline.data.padding import leading_pad_mask, left_pad_id, segments_from_loss_mask
from pipeline.data.shared_memory import registration_turn

IGNORE_INDEX = -100
SCALAR_COLUMNS = ("difficulty", "prompt_length")


class DataResumeError(ValueError):
    """A saved loader state does not belong to this data/loader configuration."""


@dataclass(frozen=True)
class LoaderFingerprint:
    """What must not change between saving a loader state and resuming from it."""

    index_sha256: str
    seed: int
    global_batch_size: int
    num_canonical_nodes: int
    shuffle: bool


class Collate:
    """Samples (dicts of numpy arrays) -> the batch contract above."""

    def __init__(self, columns: dict[str, str], left_pad_id: int | None = None, segments_from_loss_mask: bool = False):
        self.columns = columns
        self.left_pad_id = left_pad_id  # rows padded on the left: the batch carries an attention_mask
        self.segments_from_loss_mask = segments_from_loss_mask  # text `--pack pad` (padding.py)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def stack(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([np.asarray(s[name]) for s in samples]).astype(np.int64))

        ids = stack("input_ids")
        if "labels" in self.columns:
            labels = stack("labels")
        elif "loss_mask" in self.columns:
            labels = ids.masked_fill(stack("loss_mask") == 0, IGNORE_INDEX)
        else:
            labels = ids.clone()
        batch = {"input_ids": ids, "labels": labels}
        if self.left_pad_id is not None:
            batch["attention_mask"] = leading_pad_mask(ids, self.left_pad_id)
        if "segment_ids" in self.columns:
            batch["segment_ids"] = stack("segment_ids")
        elif self.segments_from_loss_mask:
            batch["segment_ids"] = stack("loss_mask")
        batch.update({name: stack(name) for name in SCALAR_COLUMNS if name in self.columns})
        return batch


class FingerprintedLoader(StreamingDataLoader):
    """A StreamingDataLoader whose state carries the fingerprint and refuses a mismatched resume."""

    def __init__(
        self, dataset: StreamingDataset, *, fingerprint: LoaderFingerprint, manifest: dict[str, Any], **kwargs: Any
    ):
        super().__init__(dataset, **kwargs)
        self.fingerprint = fingerprint
        self.manifest = manifest

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": asdict(self.fingerprint), "streaming": super().state_dict()}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if not isinstance(obj, dict) or set(obj) != {"fingerprint", "streaming"}:
            raise DataResumeError(
                "not a loader state saved by FingerprintedLoader.state_dict() "
                f"(keys: {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})"
            )
        saved, now = obj["fingerprint"], asdict(self.fingerprint)
        differing = [
            f"{key} (saved {saved.get(key)!r}, now {value!r})" for key, value in now.items() if saved.get(key) != value
        ]
        if differing:
            raise DataResumeError(
                "cannot resume the data loader: "
                + "; ".join(differing)
                + ". Resume with the same dataset, seed, global batch size and "
                "num_canonical_nodes, or start a new run."
            )
        super().load_state_dict(obj["streaming"])


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _remote_manifest(remote: str) -> dict[str, Any]:
    """Fetch manifest.json and index.json of a remote dataset, then check them."""
    from streaming.base.storage.download import CloudDownloader

    staging = Path(tempfile.mkdtemp(prefix="manifest-"))
    try:
        for name in (MANIFEST, "index.json"):
            CloudDownloader.direct_download(f"{remote.rstrip('/')}/{name}", str(staging / name))
        return read_manifest(staging)
    except DataPrepError:
        raise
    except Exception as err:  # provider-specific "not found" errors
        raise DataPrepError(
            f"{remote}: cannot fetch {MANIFEST}/index.json ({err}); not a complete prepared dataset?"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_train_loader(
    path: str | os.PathLike,
    micro_batch_size: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_canonical_nodes: int = 1,
    split: str | None = None,
    num_workers: int = 0,
    drop_last: bool = True,
    cache_dir: str | None = None,
    **dataset_kwargs: Any,
) -> FingerprintedLoader:
    """A loader over the prepared dataset at ``path`` (``path/split`` with ``split``, e.g. the
    train/eval splits of synthetic data). A local directory is read in place (local=path,
    remote=None); a remote URL (s3://...) is streamed into ``cache_dir``.
    ``dataset_kwargs`` go to StreamingDataset (e.g. predownload, shuffle_block_size)."""
    world = _world_size()
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world):
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of "
            f"micro_batch_size {micro_batch_size} x world size {world}"
        )
    location = f"{str(path).rstrip('/')}/{split}" if split else str(path)
    if "://" in location:
        if cache_dir is None:
            raise ValueError(f"reading {location} needs cache_dir (a local directory for the shards)")
        manifest = _remote_manifest(location)
        local, remote = cache_dir, location
    else:
        manifest = read_manifest(location)
        local, remote = location, None
    with registration_turn():  # another job on this node may be registering its dataset right now
        dataset = StreamingDataset(
            local=local,
            remote=remote,
            batch_size=micro_batch_size,
            shuffle=shuffle,
            shuffle_seed=seed,
            num_canonical_nodes=num_canonical_nodes,
            **dataset_kwargs,
        )
    fingerprint = LoaderFingerprint(manifest["index_sha256"], seed, global_batch_size, num_canonical_nodes, shuffle)
    return FingerprintedLoader(
        dataset,
        fingerprint=fingerprint,
        manifest=manifest,
        batch_size=micro_batch_size,
        collate_fn=Collate(manifest["columns"], left_pad_id(manifest), segments_from_loss_mask(manifest)),
        num_workers=num_workers,
        drop_last=drop_last,
    )
