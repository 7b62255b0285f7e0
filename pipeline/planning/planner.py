"""The memory plan of one training phase per GPU: the measured micro-step (step.py) plus the
engine's sharded state (state.py), against the GPU's memory.

    peak = params + grads + optimizer + teacher + max(activations + gathered, optimizer step)

(the step's activations and the gathered parameters live during forward/backward; the optimizer
step's temporaries only once they are gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from pipeline.planning.inputs import Architecture, StepInputs, step_inputs
from pipeline.planning.state import EngineState, ModelCounts, count_model, engine_state
from pipeline.planning.step import StepBytes, build_models, default_dtype, measure_depth
from pipeline.training.config import RunConfig

NOT_COUNTED = (
    "not counted: CUDA context and NCCL buffers, allocator rounding and fragmentation, kernel "
    "workspaces; keep some headroom (10% or more)"
)


@dataclass
class MemoryPlan:
    phase: str
    engine: str
    world_size: int
    nodes: int
    gpus_per_node: int
    gpu_memory: int
    inputs: StepInputs
    step: StepBytes  # the micro-step at full depth (unsharded parameters, grads separate)
    measured: list[StepBytes]  # the runs it was derived from
    method: str
    state: EngineState
    activation_checkpointing: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def per_gpu(self) -> dict[str, int]:
        s = self.state
        during_step = self.step.activations + s.gathered
        peak = s.params + s.grads + s.optimizer + s.teacher + max(during_step, s.step)
        return {
            "params": s.params,
            "grads": s.grads,
            "optimizer": s.optimizer,
            "teacher": s.teacher,
            "activations": self.step.activations,
            "gathered": s.gathered,
            "optimizer_step": s.step,
            "peak": peak,
        }

    @property
    def peak(self) -> int:
        return self.per_gpu["peak"]

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory

    @property
    def headroom(self) -> int:
        return self.gpu_memory - self.peak


def count_models(cfg: RunConfig, inputs: StepInputs) -> tuple[ModelCounts, Optional[ModelCounts]]:
    """Parameter shapes of the trained model (with the phase's trainable selection) and the
    teacher, at full depth, built on the meta device."""
    with torch.device("meta"), default_dtype(inputs.dtype):
        phase, model, teacher = build_models(cfg, inputs, None)
    phase.parameter_groups(model)
    return count_model(model), (count_model(teacher) if teacher is not None else None)


def plan_run(
    cfg: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: int,
    seq_len: Optional[int] = None,
    model_config: Optional[str] = None,
    known: Optional[Mapping[str, Architecture]] = None,
    layers: tuple[int, int] = (1, 2),
    fake: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    seq_len_source: str = "--seq-len",
) -> MemoryPlan:
    """Measure one micro-step of `cfg` (fake tensors, at `layers` depths, extrapolated) and add the
    engine's state for `nodes` x `gpus_per_node` GPUs of `gpu_memory` bytes."""
    started = time.perf_counter()
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and GPUs per node ({gpus_per_node}) must be at least 1")
    world = nodes * gpus_per_node
    inputs = step_inputs(cfg, seq_len=seq_len, model_config=model_config, known=known, seq_len_source=seq_len_source)
    student, teacher = count_models(cfg, inputs)
    state = engine_state(cfg, student, teacher, world, inputs.dtype)
    estimate = measure_depth(cfg, inputs, fake=fake, layers=layers, progress=progress)
    notes = list(inputs.notes) + state.notes
    step = estimate.step
    if step.params != student.total * _size(inputs.dtype):
        notes.append(
            f"warning: the extrapolated parameter bytes ({step.params}) differ from the full-depth count "
            f"({student.total * _size(inputs.dtype)})"
        )
    per_step = cfg.data.micro_batch_size * world
    if cfg.data.global_batch_size % per_step:
        notes.append(
            f"warning: data.global_batch_size {cfg.data.global_batch_size} is not a multiple of "
            f"micro_batch_size x world size = {per_step} (the trainer refuses this)"
        )
    else:
        notes.append(f"{cfg.data.global_batch_size // per_step} micro-step(s) per step (gradient accumulation)")
    notes.append(NOT_COUNTED)
    return MemoryPlan(
        phase=cfg.phase.name,
        engine=cfg.engine.name,
        world_size=world,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_memory=gpu_memory,
        inputs=inputs,
        step=step,
        measured=estimate.measured,
        method=estimate.method,
        state=state,
        activation_checkpointing=cfg.engine.activation_checkpointing,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
