"""What the engines do the same way: the optimizer's param groups, the CPU thread share, the
check that a loss can train anything, and the wrapper of a frozen model."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from pipeline.distributed import DistEnv
from pipeline.training.engines.base import Engine, FrozenModel, ParamGroup, PartitionStats


def optimizer_groups(groups: list[ParamGroup]) -> tuple[list[str], list[dict]]:
    """torch param groups for `groups`: each ParamGroup's decayed parameters, then its no_decay ones
    at weight decay 0 (empty ones left out), with the ParamGroup name of each (for learning_rates)."""
    names, torch_groups = [], []
    for group in groups:
        for params, wd in ((group.params, group.weight_decay), (group.no_decay, 0.0)):
            if params:
                names.append(group.name)
                torch_groups.append({"params": params, "lr": group.lr, "weight_decay": wd})
    return names, torch_groups


def share_cpu_cores(env: DistEnv) -> None:
    """Ranks on CPU share the node's cores: each takes its share of threads, so they do not
    oversubscribe them (unless OMP_NUM_THREADS says how many)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))


def check_trains(loss: torch.Tensor) -> None:
    """A loss without a graph would make backward fail obscurely, or do nothing."""
    if loss.grad_fn is None:
        raise RuntimeError("the loss does not depend on any trainable parameter (nothing to train)")


class EngineFrozenModel(FrozenModel):
    """A frozen model as an engine wraps it: `runner` (the engine's inference wrapper, or the
    sharded model itself) runs the forward without gradients; `engine` counts and gathers the
    model's partitioned parameters."""

    def __init__(self, engine: Engine, runner: Callable[..., Any], module: nn.Module):
        self._engine, self._runner, self._module = engine, runner, module
        self.rank, self.world_size = engine.rank, engine.world_size

    @property
    def module(self) -> nn.Module:
        return self._module

    def __call__(self, **inputs) -> Any:
        with torch.no_grad():
            return self._runner(**inputs)

    def partition_stats(self) -> PartitionStats:
        total, local, held_bytes = self._engine.param_partition(self._module)
        return PartitionStats(self.rank, self.world_size, total, local, held_bytes, 0, 0)

    def gather_full(self, param: nn.Parameter) -> torch.Tensor:
        return self._engine.gather_full(param)
