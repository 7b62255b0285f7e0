"""Reading safetensors checkpoints (single file or sharded with an index) by name, and
checking that they fit a model before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(directory: str | Path) -> Optional[list[Path]]:
    """The safetensors files of a local checkpoint directory, or None when it has none."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    return None


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint shard {path} named in {INDEX_FILE} does not exist")
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def model_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """Persistent tensor shapes of model_cls(config), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in tied}


def check_checkpoint_fits(model_cls, config, directory: str | Path) -> None:
    """Raise one ValueError naming every missing, unexpected or mis-shaped tensor."""
    files = checkpoint_files(directory)
    if files is None:
        return  # not a local safetensors directory: Hugging Face's loader reports what it finds
    found = checkpoint_shapes(files)
    expected = model_shapes(model_cls, config)
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(getattr(model_cls, "_tied_weights_keys", None) or []))
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    for name in sorted(set(found) & set(expected)):
        if found[name] != expected[name]:
            problems.append(
                f"tensor {name} has shape {list(found[name])} in the checkpoint but the config "
                f"needs {list(expected[name])}"
            )
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit {model_cls.__name__}: " + "; ".join(problems))
