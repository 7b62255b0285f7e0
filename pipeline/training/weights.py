"""Reading a Hugging Face checkpoint tensor by tensor, for loading into a partitioned model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from safetensors import safe_open

from pipeline.models.checkpoint_io import checkpoint_files, checkpoint_shapes


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """A local checkpoint directory, or a hub name resolved through the local Hugging Face cache
    (downloaded first when the hub is reachable and HF_HUB_OFFLINE is not set)."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


class TensorSource(Protocol):
    """Tensors by name, read on demand: what Engine.load_weights reads (e.g. a CheckpointTensors)."""

    def __contains__(self, name: str) -> bool: ...

    def __call__(self, name: str) -> torch.Tensor: ...


class CheckpointTensors:
    """name -> tensor, read on demand from the checkpoint's safetensors files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = checkpoint_files(self.directory)
        if files is None:
            raise FileNotFoundError(f"{self.directory} holds no model.safetensors (or safetensors index)")
        self.shapes = checkpoint_shapes(files)
        self._file = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                self._file.update({name: path for name in f.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __call__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file[name]), framework="pt") as f:
            return f.get_tensor(name)

    def check_fits(self, expected: dict[str, tuple], may_be_missing: Iterable[str] = ()) -> None:
        """`expected`: the model's tensor shapes by name; names in `may_be_missing` are initialised instead."""
        allowed = set(may_be_missing)
        missing = sorted(set(expected) - set(self.shapes) - allowed)
        unexpected = sorted(set(self.shapes) - set(expected))
        wrong = [
            f"{n}: {list(self.shapes[n])} in the checkpoint, {list(expected[n])} in the model"
            for n in sorted(set(expected) & set(self.shapes))
            if tuple(self.shapes[n]) != tuple(expected[n])
        ]
        problems = (
            ([f"missing tensors {missing}"] if missing else [])
            + ([f"unexpected tensors {unexpected}"] if unexpected else [])
            + wrong
        )
        if problems:
            raise ValueError(f"checkpoint {self.directory} does not fit the model: " + "; ".join(problems))


def persistent_buffers(model: torch.nn.Module):
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buf


def plain_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape a tensor reports: the whole one, unless an engine partitioned it in place
    (then ask the engine: `Engine.full_shape`)."""
    return tuple(param.shape)


def full_shapes(
    model: torch.nn.Module, full_shape: Callable[[torch.nn.Parameter], tuple[int, ...]]
) -> dict[str, tuple]:
    """Shapes of the parameters (whole, as `full_shape` reads them: `Engine.full_shape` for a
    partitioned model) and persistent buffers, by name."""
    shapes = {n: full_shape(p) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in persistent_buffers(model)})
    return shapes
