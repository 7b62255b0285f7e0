"""DeepSpeed ZeRO-3 engine (docs/architecture.md#4-engines): partitioned construction and loading, bf16 on
GPU / fp32 on CPU, gradient accumulation, clipping, our own lr schedule, DeepSpeed's
checkpoint format."""

from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
from torch import nn

from pipeline.distributed import DistEnv
from pipeline.training.config import RunConfig
from pipeline.training.engines.base import Engine, FrozenModel, ParamGroup, PartitionStats, StepResult
from pipeline.training.engines.shared import EngineFrozenModel, check_trains, optimizer_groups, share_cpu_cores
from pipeline.training.initialization import init_units, unit_values
from pipeline.training.weights import TensorSource, persistent_buffers


def _on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def gathered(param: nn.Parameter) -> torch.Tensor:
    """A copy of a (possibly ZeRO-3 partitioned) parameter's full value (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.data.detach().clone()


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    on_gpu = staticmethod(_on_gpu)

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self._engine: Any = None  # the deepspeed.DeepSpeedEngine prepare() builds (deepspeed ships no types)
        self._model: Optional[nn.Module] = None
        self._last: Optional[StepResult] = None
        self.ds_config = self.build_ds_config()

    def build_ds_config(self) -> dict:
        ds = copy.deepcopy(self.cfg.engine.deepspeed)
        ds.setdefault("zero_optimization", {})["stage"] = 3
        ds["train_micro_batch_size_per_gpu"] = self.cfg.data.micro_batch_size
        ds["gradient_accumulation_steps"] = self.grad_accum_steps
        ds["train_batch_size"] = self.cfg.data.global_batch_size
        ds["gradient_clipping"] = float(self.cfg.engine.grad_clip)
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": self.bf16}
        ds["fp16"] = {"enabled": False}
        ds.setdefault("steps_per_print", 2**31 - 1)
        ds.setdefault("wall_clock_breakdown", False)
        return ds

    def build_frozen_ds_config(self, offload_params: bool) -> dict:
        """ZeRO-3 for inference: the run's ZeRO-3 settings without optimizer-side options; parameters
        partitioned across all ranks, their partitions in CPU memory with offload_params."""
        ds = copy.deepcopy(self.ds_config)
        zero = ds["zero_optimization"]
        zero.pop("offload_optimizer", None)
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": _on_gpu()}
        else:
            zero.pop("offload_param", None)
        return ds

    # -- process group and placement
    def init_distributed(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.env.export()
        backend = "nccl" if _on_gpu() else "gloo"
        if _on_gpu():
            get_accelerator().set_device(self.env.local_rank)
        else:
            share_cpu_cores(self.env)
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=self.cfg.engine.collective_timeout_s),
        )
        if not _on_gpu():
            self._unlink_shm_buffer()

    def _unlink_shm_buffer(self) -> None:
        """DeepSpeed's CPU all-reduce maps a ~70 MB POSIX shared-memory segment per rank and never
        unlinks it: every run with a new master port would leave its segments in /dev/shm (RAM).
        Once every rank has mapped every segment (init_distributed returned everywhere), each rank
        unlinks its own; the mappings stay valid until the processes exit, even by SIGKILL."""
        import torch.distributed as dist

        dist.barrier()
        name = (
            f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{self.rank}"
        )
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass

    # -- models
    def init_context(self):
        # dtype from the config (bf16 or fp32): deepspeed 0.19's Init(dtype=...) picks bf16 on CPU whatever is asked
        return self._zero_init(self.ds_config)

    @contextlib.contextmanager
    def _zero_init(self, ds_config: dict):
        """zero.Init, without moving the run's RNG: the modules' constructors draw their (discarded)
        default initialisation from it, which FSDP's meta construction does not."""
        import deepspeed

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield

    def init_weights(self, root: nn.Module, init_fn: Callable[[nn.Module], None], prefix: str = "") -> None:
        # One unit (a decoder layer, or the rest) at a time: its parameters are gathered on every
        # rank, rank 0 computes their seeded values (initialization.py) and fills them, and
        # GatheredParameters re-partitions them; no rank holds more than one unit whole.
        import deepspeed

        for unit in init_units(root, prefix):
            with deepspeed.zero.GatheredParameters(list(unit.params.values()), modifier_rank=0):
                if self.rank == 0:
                    values = unit_values(unit, init_fn, self.cfg.seed, self.full_shape)
                    with torch.no_grad():
                        for name, param in unit.params.items():
                            param.data.copy_(values[name])

    def load_weights(self, model: nn.Module, tensors: TensorSource) -> None:
        # One parameter at a time: rank 0 reads it and fills the gathered tensor, which is then
        # re-partitioned; no rank ever holds more than one full parameter.
        import deepspeed

        for name, param in model.named_parameters():
            if name not in tensors:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    with torch.no_grad():
                        param.data.copy_(tensors(name))
        for name, buf in persistent_buffers(model):
            if name in tensors:
                with torch.no_grad():
                    buf.copy_(tensors(name))

    def frozen_init_context(self, offload_params: bool = False):
        return self._zero_init(self.build_frozen_ds_config(offload_params))

    def build_frozen(self, model: nn.Module, offload_params: bool = False) -> FrozenModel:
        # ZeRO-3 without an optimizer: DeepSpeed's parameter-offload hooks only (ZeRO-Inference)
        import deepspeed

        model.requires_grad_(False)
        model.eval()
        inference, _, _, _ = deepspeed.initialize(model=model, config=self.build_frozen_ds_config(offload_params))
        inference.eval()
        return EngineFrozenModel(self, inference, inference.module)

    def prepare(self, model, groups: list[ParamGroup], lr_lambda, betas, eps) -> None:
        import deepspeed

        self._group_names, torch_groups = optimizer_groups(groups)
        optimizer = torch.optim.AdamW(torch_groups, betas=betas, eps=eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self._model = model
        self._engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )

    @property
    def module(self) -> nn.Module:
        if self._engine is not None:
            return self._engine.module
        assert self._model is not None, "prepare() first"
        return self._model

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        # a ZeRO-3 partitioned parameter's own shape is its (empty) local storage's
        return tuple(getattr(param, "ds_shape", param.shape))

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        return getattr(tensor, "ds_tensor", tensor)

    def gather_full(self, param: nn.Parameter) -> torch.Tensor:
        return gathered(param)

    # -- steps
    def forward(self, **inputs) -> Any:
        return self._engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks; our losses are already global means -> undo it.
        # scale_wrt_gas=False: the losses are normalised over accumulation steps already.
        check_trains(loss)
        boundary = self._engine.is_gradient_accumulation_boundary()
        self._engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self._engine.step()
        if boundary:
            norm = self._engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            self._last = StepResult(applied=bool(getattr(self._engine, "_step_applied", True)), grad_norm=norm)

    def optimizer_step(self) -> StepResult:
        if self._last is None:
            raise RuntimeError(
                "optimizer_step() before the last micro-step of the step was backpropagated "
                "(the number of micro-steps must equal gradient_accumulation_steps)"
            )
        result, self._last = self._last, None
        return result

    def _optimizer_param_groups(self) -> list[dict]:
        return self._engine.optimizer.param_groups

    # -- checkpoints
    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        self._engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        path, client_state = self._engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
        return client_state

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        # The fp32 master weights of trainable parameters (what zero_to_fp32 recovers from a
        # checkpoint, whatever the training precision); frozen ones as they are.
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, torch.Tensor] = {}  # kept by rank 0; the gathering is collective
        seen: dict[int, str] = {}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) in seen:  # tied weights: same tensor under both names
                if self.rank == 0:
                    state[name] = state[seen[id(param)]]
                continue
            seen[id(param)] = name
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:
                full = gathered(param)
            if self.rank == 0:
                state[name] = full.cpu()
        for name, buf in persistent_buffers(self.module):
            state[name] = buf.detach().cpu()
        return state if self.rank == 0 else None

    def partition_stats(self) -> PartitionStats:
        total, local, param_bytes = self.param_partition(self.module)
        opt = self._engine.optimizer
        master_bytes = state_bytes = 0
        params_storage = {id(p.ds_tensor) for p in self.module.parameters() if hasattr(p, "ds_tensor")}
        for flat in getattr(opt, "fp32_partitioned_groups_flat", []) or []:
            if flat is not None and id(flat) not in params_storage:
                master_bytes += flat.numel() * flat.element_size()
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    state_bytes += value.numel() * value.element_size()
        return PartitionStats(self.rank, self.world_size, total, local, param_bytes, master_bytes, state_bytes)
