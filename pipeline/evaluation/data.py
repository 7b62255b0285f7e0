"""Reading an MDS eval split (the data_prep contract) into tensors, in order."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from streaming import LocalDataset
from streaming.base.compression import decompress

IGNORE_INDEX = -100


@dataclass
class EvalSplit:
    input_ids: torch.Tensor  # [N, S]
    labels: torch.Tensor  # [N, S], -100 where not scored
    difficulty: Optional[torch.Tensor]  # [N]
    prompt_length: Optional[torch.Tensor]  # [N]
    manifest: dict

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def local_dataset(path: Path) -> LocalDataset:
    """The MDS dataset at `path`, read in place without shared memory: evaluations started at the same
    moment on one machine would otherwise race for streaming's shared-memory prefix (FileExistsError
    '/000083_locals', seen when the reproduction ran two evaluations side by side). A compressed shard
    is decompressed beside its file first, as StreamingDataset does for a local dataset."""
    index = json.loads((path / "index.json").read_text())
    for shard in index["shards"]:
        zipped = shard.get("zip_data")
        raw = path / shard["raw_data"]["basename"]
        if zipped and not raw.is_file():
            data = decompress(shard["compression"], (path / zipped["basename"]).read_bytes())
            tmp = raw.with_name(f".{raw.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, raw)  # whole or absent, whichever process gets there
    return LocalDataset(local=str(path))


def load_eval_split(path: str | Path, max_samples: Optional[int] = None) -> EvalSplit:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a prepared dataset: {manifest_path} is missing "
            "(run `python -m data_prep ...` first; an interrupted run has no manifest)"
        )
    manifest = json.loads(manifest_path.read_text())
    dataset = local_dataset(path)
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    rows = [dataset[i] for i in range(count)]
    if not rows:
        raise ValueError(f"eval split {path} has no samples")
    ids = torch.from_numpy(np.stack([r["input_ids"].astype(np.int64) for r in rows]))
    if "labels" in rows[0]:
        labels = torch.from_numpy(np.stack([r["labels"].astype(np.int64) for r in rows]))
    elif "loss_mask" in rows[0]:
        mask = torch.from_numpy(np.stack([r["loss_mask"].astype(bool) for r in rows]))
        labels = ids.masked_fill(~mask, IGNORE_INDEX)
    else:
        labels = ids.clone()
    scalar = lambda key: torch.tensor([int(r[key]) for r in rows]) if key in rows[0] else None  # noqa: E731
    return EvalSplit(ids, labels, scalar("difficulty"), scalar("prompt_length"), manifest)
