"""The trainer's side of the data (docs/data.md#7-reading-for-training), over the streaming reader in `pipeline.data`:
dataset checks phrased as config errors, the loader fingerprint known before any process
group (so a mismatched resumption is refused before anything is written), and an
endless batch iterator whose position is saved in every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch

from pipeline.training.config import ConfigError, RunConfig


def read_manifest(path: str | Path) -> dict:
    """The dataset's manifest (checked against its index by data_prep); ConfigError naming data.path."""
    from data_prep.errors import DataPrepError
    from data_prep.manifest import read_manifest as read_prepared

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"config key 'data.path': {path} does not exist or is not a directory")
    try:
        return read_prepared(path)
    except DataPrepError as err:
        raise ConfigError(f"config key 'data.path': {err}") from None


def data_seed(cfg: RunConfig) -> int:
    return cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.seed


def data_fingerprint(cfg: RunConfig, manifest: dict) -> dict:
    """The loader's fingerprint (what must not change between a checkpoint and its resumption)."""
    from pipeline.data import LoaderFingerprint

    return asdict(
        LoaderFingerprint(
            manifest["index_sha256"],
            data_seed(cfg),
            cfg.data.global_batch_size,
            cfg.data.num_canonical_nodes,
            cfg.data.shuffle,
        )
    )


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
    from pipeline.data import DataResumeError

    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise DataResumeError(
            f"refusing to resume from {where}: the data does not match the checkpoint's "
            f"({'; '.join(diffs)}). Resume with the original data settings, or use a new run_dir."
        )


def tokenizer_source(path: str | Path, manifest: dict) -> Optional[str]:
    """What the manifest names as its tokenizer: a directory (relative to the dataset) or a hub name."""
    entry = manifest.get("tokenizer")
    if isinstance(entry, dict):
        entry = entry.get("name_or_path") or entry.get("path")
    if not isinstance(entry, str) or not entry:
        return None
    local = (Path(path) / entry).resolve()
    return str(local) if local.is_dir() else entry


class TrainData:
    """Endless micro-batches for this rank; `state_dict()` is its position at a step boundary."""

    def __init__(self, cfg: RunConfig):
        from pipeline.data import build_train_loader, prepare_streaming_env

        prepare_streaming_env()  # LOCAL_WORLD_SIZE, stale shared memory (once per node)
        data = cfg.data
        self.loader = build_train_loader(
            data.path,
            data.micro_batch_size,
            data.global_batch_size,
            data_seed(cfg),
            shuffle=data.shuffle,
            num_canonical_nodes=data.num_canonical_nodes,
            num_workers=data.num_workers,
        )
        self._it: Optional[Iterator] = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None  # next epoch
        raise RuntimeError("the dataset yields no full micro-batch for this rank (too few samples)")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
