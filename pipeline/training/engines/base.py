"""The engine interface: everything the trainer and the phases ask of a distributed backend.

Phases, losses and logging only see this interface, never DeepSpeed or FSDP types.
An engine owns the process group, model construction (partitioned from the start),
the optimizer and lr schedule, micro-step / optimizer-step mechanics, checkpoint
I/O in its own format, and gathering a full state dict for export.

Gradient contract: after `optimizer_step()`, parameters have moved along the
gradient of the SUM of every loss passed to `backward()` in that step, over all
micro-steps and all ranks (the losses are already divided by the global token
count; the engine undoes its own averaging over ranks / accumulation steps).
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from pipeline.distributed import DistEnv
from pipeline.training.config import RunConfig
from pipeline.training.weights import TensorSource, persistent_buffers


@dataclass
class ParamGroup:
    name: str  # e.g. "all", "gates", "attention" (optimizer.groups.<name> overrides)
    params: list[nn.Parameter]  # trainable parameters only
    lr: float
    weight_decay: float = 0.0
    no_decay: list[nn.Parameter] = field(default_factory=list)  # same lr, weight decay 0 (norms, biases)


@dataclass
class StepResult:
    applied: bool  # False when the engine skipped it (non-finite gradients)
    grad_norm: float  # before clipping (inf / nan when skipped)


@dataclass
class PartitionStats:
    rank: int
    world_size: int
    total_numel: int  # parameters of the whole model
    local_numel: int  # parameter elements held by this rank
    param_bytes: int  # this rank's parameter storage
    master_bytes: int  # this rank's fp32 master copy (0 when it is the parameter itself)
    optimizer_state_bytes: int  # this rank's optimizer moments

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FrozenModel(ABC):
    """A frozen model wrapped by `Engine.build_frozen` for inference (e.g. the distillation teacher).

    Calling it runs the model's forward in eval mode under `torch.no_grad()`; it is collective
    (partitioned parameters are gathered layer by layer), so every rank calls it equally often.
    It never gets gradients or optimizer state, and it is not part of the engine's checkpoints
    (it is reloaded from its own checkpoint on resumption).
    """

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The model itself (unwrapped), e.g. to read its config or register hooks."""

    @abstractmethod
    def __call__(self, **inputs) -> Any: ...

    @abstractmethod
    def partition_stats(self) -> PartitionStats:
        """This rank's share of the frozen model's parameters (optimizer fields 0)."""

    rank: int

    @abstractmethod
    def gather_full(self, param: nn.Parameter) -> torch.Tensor:
        """Collective: the whole parameter, however the engine partitions it."""

    def full_tensors(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """Collective: (name, full tensor on CPU on rank 0 / None elsewhere), one parameter or
        persistent buffer at a time, in named_parameters() order, then the buffers."""
        for name, param in self.module.named_parameters():
            full = self.gather_full(param)
            yield name, (full.cpu() if self.rank == 0 else None)
        for name, buf in persistent_buffers(self.module):
            yield name, (buf.detach().cpu() if self.rank == 0 else None)


class Engine(ABC):
    name: str = "abstract"

    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.rank, self.world_size = env.rank, env.world_size
        micro, global_batch = cfg.data.micro_batch_size, cfg.data.global_batch_size
        self.grad_accum_steps = global_batch // (micro * env.world_size)
        precision = cfg.engine.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.on_gpu())
        self._group_names: list[str] = []  # per optimizer param group, its ParamGroup's name (set by prepare)

    # -- process group and placement
    @staticmethod
    @abstractmethod
    def on_gpu() -> bool:
        """Whether this engine runs on CUDA devices (else CPU)."""

    @abstractmethod
    def init_distributed(self) -> None: ...

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.env.local_rank}") if self.on_gpu() else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: bf16 when engine.precision says so (auto: on GPU), else fp32."""
        return torch.bfloat16 if self.bf16 else torch.float32

    # -- models
    def init_context(self) -> contextlib.AbstractContextManager:
        """Models constructed inside are partitioned as they are built."""
        return contextlib.nullcontext()

    @abstractmethod
    def init_weights(self, root: nn.Module, init_fn: Callable[[nn.Module], None], prefix: str = "") -> None:
        """Initialise every parameter under `root` as `init_fn(module)` does for each module, children
        before parents (as Hugging Face's initialisation does), on the full tensors, with the values
        of `initialization.initial_values` for the run's seed (cfg.seed): the same whatever the
        engine and the number of ranks, and without moving the global RNG. `prefix`: root's
        qualified name in the model (e.g. "model.layers.0.kv_gate"), which each module's draws
        are seeded with."""

    @abstractmethod
    def load_weights(self, model: nn.Module, tensors: TensorSource) -> None:
        """Fill each parameter and persistent buffer whose name is `in tensors` with `tensors(name)`
        (read on demand, e.g. a `weights.CheckpointTensors`).

        An engine may defer these writes (and init_weights') until it wraps the model (`prepare`,
        `build_frozen`; FSDP builds on the meta device and writes into each rank's shards then):
        read a model's weights only after that."""

    def frozen_init_context(self, offload_params: bool = False) -> contextlib.AbstractContextManager:
        """Like `init_context`, for a model that `build_frozen` will wrap (its parameters partitioned
        across all ranks, in CPU memory with offload_params)."""
        return self.init_context()

    def build_frozen(self, model: nn.Module, offload_params: bool = False) -> FrozenModel:
        """Wrap a frozen model (built inside `frozen_init_context`, weights loaded with `load_weights`)
        for inference only: no optimizer, no gradients (requires_grad is switched off), parameters
        kept partitioned across all ranks (offloaded to CPU memory with offload_params). DeepSpeed:
        a second engine with a ZeRO-3 inference config; FSDP2: fully_shard without optimizer."""
        raise NotImplementedError(f"engine {self.name!r} cannot hold a frozen model (needed by phase distill)")

    @abstractmethod
    def prepare(
        self,
        model: nn.Module,
        groups: list[ParamGroup],
        lr_lambda: Callable[[int], float],
        betas: tuple[float, float],
        eps: float,
    ) -> None:
        """Build the optimizer (AdamW over `groups`) and the schedule, and wrap the model."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The model itself (unwrapped), e.g. to set MELT's alpha or read its config."""

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The whole parameter's shape, however this engine partitions it (a sharded DTensor, and a
        parameter on the meta device before sharding, report it as their shape)."""
        return tuple(param.shape)

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a parameter this rank stores (the tensor itself when it is not partitioned)."""
        return tensor

    def param_partition(self, module: nn.Module) -> tuple[int, int, int]:
        """(elements of the whole model, elements held by this rank, bytes held by this rank)."""
        total = local = held_bytes = 0
        for p in module.parameters():
            held = self.local_part(p)
            total += math.prod(self.full_shape(p))
            local += held.numel()
            held_bytes += held.numel() * held.element_size()
        return total, local, held_bytes

    @abstractmethod
    def gather_full(self, param: nn.Parameter) -> torch.Tensor:
        """Collective: the whole value of a parameter of a model this engine wrapped."""

    # -- one optimizer step = grad_accum_steps x (forward, backward), then optimizer_step()
    @abstractmethod
    def forward(self, **inputs) -> Any: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def optimizer_step(self) -> StepResult: ...

    def learning_rates(self) -> dict[str, float]:
        """Current lr per parameter group name (a ParamGroup's no_decay part has the same lr)."""
        out: dict[str, float] = {}
        for name, group in zip(self._group_names, self._optimizer_param_groups()):
            out.setdefault(name, float(group["lr"]))
        return out

    @abstractmethod
    def _optimizer_param_groups(self) -> list[dict]:
        """The optimizer's torch param groups, in the order `prepare` built them."""

    # -- checkpoints (engine format), export, accounting
    @abstractmethod
    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        """Collective: every rank writes its part of <directory>/<tag>/."""

    @abstractmethod
    def load_checkpoint(self, directory: str, tag: str) -> dict:
        """Collective: restore model, optimizer and schedule; returns this rank's client state."""

    @abstractmethod
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the consolidated state dict on rank 0 (on CPU), None on other ranks."""

    @abstractmethod
    def partition_stats(self) -> PartitionStats: ...

    def memory_stats(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"max_allocated_bytes": float(torch.cuda.max_memory_allocated(self.device))}
        with open("/proc/self/statm") as statm:  # resident pages now (Linux)
            return {"rss_bytes": float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))}

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
