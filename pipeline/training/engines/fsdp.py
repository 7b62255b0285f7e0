"""FSDP2 engine (docs/architecture.md#4-engines): `torch.distributed.fsdp.fully_shard` per decoder layer and at
the root, launched with torchrun (`engine.name: fsdp`).

- Models are built with their parameters on the meta device (`init_context`); the weights
  asked for by `init_weights` / `load_weights` are written when the model is sharded
  (`prepare`, `build_frozen`): each rank allocates only its shards (`to_empty`) and copies its
  rows of each full tensor in, one tensor at a time, so a model loaded from a checkpoint is
  never whole on one rank. From-scratch initialisation computes the seeded initial values
  (initialization.py: the same as DeepSpeed's, whatever the number of ranks) on every rank, one
  unit (a decoder layer, or the rest) at a time, and each rank keeps its rows.
- Mixed precision (`MixedPrecisionPolicy`): fp32 sharded parameters (the master weights),
  bf16 compute and gradient reduction on GPU (`engine.fsdp.reduce_dtype`), fp32 on CPU.
- Gradients are reduce-scattered after every micro-step and summed over ranks (divide factor
  1: the losses are global means already); clipping with `clip_grad_norm_` on the DTensors;
  a step whose gradient norm is not finite is skipped (the schedule does not advance), as
  DeepSpeed does.
- Checkpoints: `torch.distributed.checkpoint` (sharded, model + optimizer through
  `get_state_dict` / `set_state_dict`) in <tag>/, and each rank's client state and lr
  schedule in <tag>/client_rank<r>.pt.
- Export: the full state dict gathered on rank 0 (on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch
from torch import nn

from pipeline.distributed import DistEnv
from pipeline.training.config import RunConfig
from pipeline.training.engines.base import Engine, FrozenModel, ParamGroup, PartitionStats, StepResult
from pipeline.training.engines.shared import EngineFrozenModel, check_trains, optimizer_groups, share_cpu_cores
from pipeline.training.initialization import initial_values, initialize
from pipeline.training.weights import TensorSource, persistent_buffers

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.optim.lr_scheduler import LambdaLR

CLIENT_STATE = "client_rank{rank}.pt"

# Decoder layers return (hidden, attention output) and the attention output is a view; nothing
# modifies these outputs in place (tests compare FSDP gradients with the unsharded model's).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _on_gpu() -> bool:
    """CUDA unless unavailable or DS_ACCELERATOR says otherwise (the same switch as the DeepSpeed engine)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


@contextlib.contextmanager
def meta_parameters():
    """Parameters registered inside live on the meta device (no memory, no initialisation, no RNG
    draws); buffers stay real, so computed ones (rotary frequencies) keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def write_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full value `full` into `param` (sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shape {list(full.shape)} given for a parameter of shape {list(param.shape)}")
    with torch.no_grad():
        if isinstance(param, DTensor):  # every rank holds `full`: cut locally, no communication
            full = distribute_tensor(
                full.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
            )
            param.to_local().copy_(full.to_local())
        else:
            param.copy_(full)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those of a class named in the model's `_no_split_modules`
    (also subclasses: MELT's layers are DecoderLayers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if m is not model and any(c.__name__ in names for c in type(m).__mro__)]


@dataclass
class PendingWrite:
    """An init_weights / load_weights call on a model still on the meta device, run once it is sharded."""

    target: nn.Module
    run: Callable[[], set[int]]  # writes the values; returns the ids of the parameters it wrote


class FSDPEngine(Engine):
    name = "fsdp"
    on_gpu = staticmethod(_on_gpu)  # the sharded parameters stay fp32; `dtype` is the compute dtype

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self.options = cfg.engine.fsdp
        self.mesh: Optional[DeviceMesh] = None
        self._model: Optional[nn.Module] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._scheduler: Optional[LambdaLR] = None
        self._params: list[nn.Parameter] = []
        self._micro_steps = 0
        self._pending: list[PendingWrite] = []

    # -- process group and placement
    def init_distributed(self) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.env.export()
        if _on_gpu():
            torch.cuda.set_device(self.env.local_rank)
        else:
            share_cpu_cores(self.env)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if _on_gpu() else "gloo", timeout=timedelta(seconds=self.cfg.engine.collective_timeout_s)
            )
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not self.bf16:
            return MixedPrecisionPolicy()
        reduce = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce[self.options.reduce_dtype])

    # -- models
    def init_context(self):
        return meta_parameters()

    def init_weights(self, root: nn.Module, init_fn: Callable[[nn.Module], None], prefix: str = "") -> None:
        if not is_meta(root):  # a model built outside init_context: its own tensors, not sharded yet
            initialize(root, init_fn, self.cfg.seed, prefix)
            return
        self._pending.append(PendingWrite(root, lambda: self._init_full(root, init_fn, prefix)))

    def _init_full(self, root: nn.Module, init_fn, prefix: str) -> set[int]:
        """The seeded initial values of every parameter under `root`, computed by every rank (no
        communication), one unit at a time; each rank keeps its shards."""
        written = set()
        for unit, values in initial_values(root, init_fn, self.cfg.seed, prefix):
            for name, param in unit.params.items():
                write_full(param, values[name].to(self.device))
                written.add(id(param))
        return written

    def load_weights(self, model: nn.Module, tensors: TensorSource) -> None:
        def load() -> set[int]:
            written = set()
            for name, param in model.named_parameters():
                if name in tensors:
                    write_full(param, tensors(name).to(self.device))
                    written.add(id(param))
            for name, buf in persistent_buffers(model):
                if name in tensors:
                    with torch.no_grad():
                        buf.copy_(tensors(name))
            return written

        if is_meta(model):
            self._pending.append(PendingWrite(model, load))
        else:
            load()

    def shard(
        self, model: nn.Module, mp_policy, reshard_after_forward: bool, frozen: bool = False, offload: bool = False
    ) -> None:
        """fully_shard each decoder layer, then the root (embeddings, final norm, exit gate, lm_head);
        gradients summed over ranks, not averaged. A trained root stays gathered from its forward to
        its backward (FSDP's default); a frozen one (no backward) is resharded after its forward."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

        kwargs = dict(
            mesh=self.mesh,
            mp_policy=mp_policy,
            offload_policy=CPUOffloadPolicy(pin_memory=_on_gpu()) if offload else OffloadPolicy(),
        )
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=True if frozen else None, **kwargs)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM

    def materialize(self, model: nn.Module, device: Optional[torch.device] = None) -> None:
        """Allocate this rank's shards of a (sharded) meta model and run the writes asked for it."""
        if not is_meta(model):
            return
        device = device or self.device
        buffers = dict(model.named_buffers())  # real already: to_empty would overwrite them
        model.to_empty(device=device)
        for name, buf in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(self.device)
        members = set(model.modules())
        mine = [p for p in self._pending if p.target in members]
        self._pending = [p for p in self._pending if p.target not in members]
        written: set[int] = set()
        for pending in mine:
            written |= pending.run()
        missing = [n for n, p in model.named_parameters() if id(p) not in written]
        if missing:
            raise RuntimeError(f"parameters neither initialised nor loaded: {missing}")

    def frozen_init_context(self, offload_params: bool = False):
        return meta_parameters()

    def build_frozen(self, model: nn.Module, offload_params: bool = False) -> FrozenModel:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        model.requires_grad_(False)
        model.eval()
        for module in model.modules():  # held in the compute dtype: no master copy to keep
            for name, param in module._parameters.items():
                if param is not None and param.is_floating_point() and param.dtype != self.dtype:
                    module._parameters[name] = nn.Parameter(param.to(self.dtype), requires_grad=False)
        offload = offload_params and _on_gpu()
        self.shard(model, MixedPrecisionPolicy(), reshard_after_forward=True, frozen=True, offload=offload)
        self.materialize(model, torch.device("cpu") if offload else None)
        return EngineFrozenModel(self, model, model)

    def prepare(self, model, groups: list[ParamGroup], lr_lambda, betas, eps) -> None:
        # fully_shard replaces the parameters: the groups are remembered by name
        names = {id(p): n for n, p in model.named_parameters()}
        self._group_names, torch_groups = optimizer_groups(groups)
        param_names = [[names[id(p)] for p in group["params"]] for group in torch_groups]
        self.shard(model, self.mp_policy(), self.options.reshard_after_forward)
        self.materialize(model)
        by_name = dict(model.named_parameters())
        for group, params in zip(torch_groups, param_names):
            group["params"] = [by_name[n] for n in params]
        self._params = [p for g in torch_groups for p in g["params"]]
        self._optimizer = torch.optim.AdamW(torch_groups, betas=betas, eps=eps)
        self.init_optimizer_state()
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, lr_lambda)
        self._model = model
        model.train()

    def init_optimizer_state(self) -> None:
        """AdamW's state for every trainable parameter now, as a fresh one (zero moments, step 0), not
        at its first gradient: a parameter the loss never reaches (the exit gate under a plain CE) then
        still has state in every checkpoint, which resuming requires. One step at lr 0 on zero
        gradients creates it without moving anything."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for param in self._params:
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        for state in self.optimizer.state.values():
            state["step"].zero_()

    # -- what prepare() builds: the steps, checkpoints and statistics come after it
    @property
    def module(self) -> nn.Module:
        assert self._model is not None, "prepare() first"
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "prepare() first"
        return self._optimizer

    @property
    def scheduler(self) -> LambdaLR:
        assert self._scheduler is not None, "prepare() first"
        return self._scheduler

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        return local_part(tensor)

    def gather_full(self, param: nn.Parameter) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return param.full_tensor() if isinstance(param, DTensor) else param.detach()

    # -- steps
    def forward(self, **inputs) -> Any:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        check_trains(loss)
        loss.backward()  # each micro-step's gradients are reduce-scattered (summed) into the sharded .grad
        self._micro_steps += 1

    def optimizer_step(self) -> StepResult:
        from torch.distributed.tensor import DTensor

        if self._micro_steps != self.grad_accum_steps:
            raise RuntimeError(
                f"optimizer_step() after {self._micro_steps} micro-step(s); the step has "
                f"{self.grad_accum_steps} (gradient_accumulation_steps)"
            )
        self._micro_steps = 0
        total_norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.engine.grad_clip or float("inf"))
        norm = float(total_norm.full_tensor() if isinstance(total_norm, DTensor) else total_norm)
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied=applied, grad_norm=norm)

    def _optimizer_param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # -- checkpoints
    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(directory) / tag
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
        with open(path / CLIENT_STATE.format(rank=self.rank), "wb") as handle:
            torch.save(
                {"client": client_state, "scheduler": self.scheduler.state_dict(), "world_size": self.world_size},
                handle,
            )
            handle.flush()
            os.fsync(handle.fileno())

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(directory) / tag
        client_file = path / CLIENT_STATE.format(rank=self.rank)
        if not client_file.is_file():
            raise RuntimeError(f"{path} is not an FSDP checkpoint of {self.world_size} ranks (no {client_file.name})")
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        saved = torch.load(client_file, weights_only=False)
        self.scheduler.load_state_dict(saved["scheduler"])
        return saved["client"]

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # torch types the values as any state-dict value; a full state dict's are (CPU) tensors
        return cast(dict[str, torch.Tensor], state) if self.rank == 0 else None

    def partition_stats(self) -> PartitionStats:
        total, local, param_bytes = self.param_partition(self.module)
        state_bytes = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                held = self.local_part(value) if torch.is_tensor(value) else None
                if held is not None and value.dim() > 0:
                    state_bytes += held.numel() * held.element_size()
        # the sharded fp32 parameters are the master weights (bf16 copies exist only while gathered)
        return PartitionStats(self.rank, self.world_size, total, local, param_bytes, 0, state_bytes)
