"""The engine's sharded state per GPU: parameters, gradients, optimizer and the frozen teacher,
for DeepSpeed ZeRO-3 (engine.name deepspeed) and FSDP2 (engine.name fsdp), by arithmetic on
the models' parameter shapes (counted on the meta device at full depth; nothing allocated).

ZeRO-3 (DeepSpeed 0.19, stage3.py / partition_parameters.py), per rank, world size W:
  params     each parameter's partition, ceil(numel / W) elements in the model dtype (bf16), plus
             the whole of every "persistent" parameter (numel <= stage3_param_persistence_threshold,
             up to stage3_model_persistence_threshold in all), which every rank keeps gathered
  grads      the gradient partitions of the trainable parameters (grad_partitions_flat_buffer,
             data_types.grad_accum_dtype, default the model dtype) + the reduce bucket
             (reduce_bucket_size elements, when contiguous_gradients)
  optimizer  fp32 master partition (a copy, even in fp32 runs) + Adam's two fp32 moments, of the
             trainable parameters' partitions
  gathered   working set of gathered parameters: the largest module (ZeRO-3 gathers per module)
             + stage3_prefetch_bucket_size elements prefetched, or the whole decoder stack when
             one loop's parameters fit in stage3_max_reuse_distance (then nothing is released
             between loops), capped by stage3_max_live_parameters; the teacher's likewise
  step       optimizer-step temporaries (activations are freed by then): the fp32 copy of the
             gradient partition (one sub group, sub_group_size) and Adam's sqrt temporary
FSDP2 (pipeline/training/engines/fsdp.py): fp32 sharded parameters (they are the master
weights), fp32 sharded gradients and Adam moments; the root's parameters (embeddings, lm_head,
final norm, exit gate) stay unsharded in the compute dtype from forward to backward, plus the
current and the prefetched decoder layer (every layer with fsdp.reshard_after_forward false);
the frozen teacher is sharded in the compute dtype.
Offloading (zero_optimization.offload_param / offload_optimizer, teacher.offload_params) moves
the corresponding partitions to CPU memory: 0 bytes on the GPU.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from torch import nn

from pipeline.training.config import RunConfig


@dataclass(frozen=True)
class ModelCounts:
    """Parameter shapes of a model at full depth, and which are trained."""

    shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]
    in_layers: tuple[bool, ...]  # parameter belongs to a decoder layer
    module_numels: tuple[int, ...]  # each module's own parameters (ZeRO-3 gathers module by module)
    layer_numel: int  # one decoder layer
    num_layers: int

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def trained(self) -> int:
        return sum(n for n, t in zip(self.numels, self.trainable) if t)

    @property
    def root(self) -> int:
        """Parameters outside the decoder layers (embeddings, lm_head, final norm, exit gate)."""
        return sum(n for n, inside in zip(self.numels, self.in_layers) if not inside)


def count_model(model: nn.Module) -> ModelCounts:
    # nn.Module types its submodules Tensor | Module: the backbone's decoder layers, as built
    layers = cast(nn.ModuleList, cast(nn.Module, model.model).layers)
    in_layer = {id(p) for p in layers.parameters()}
    params = list(model.named_parameters())
    modules = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ModelCounts(
        shapes=tuple(tuple(p.shape) for _, p in params),
        trainable=tuple(p.requires_grad for _, p in params),
        in_layers=tuple(id(p) in in_layer for _, p in params),
        module_numels=tuple(n for n in modules if n),
        layer_numel=sum(p.numel() for p in layers[0].parameters()) if len(layers) else 0,
        num_layers=len(layers),
    )


@dataclass(frozen=True)
class ZeroSettings:
    """The zero_optimization keys that size ZeRO-3's memory (DeepSpeed's defaults)."""

    param_persistence_threshold: int = int(1e5)
    model_persistence_threshold: int = sys.maxsize
    prefetch_bucket_size: int = int(5e7)
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)
    reduce_bucket_size: int = int(5e8)
    contiguous_gradients: bool = True
    sub_group_size: int = int(1e9)
    offload_param: bool = False
    offload_optimizer: bool = False
    grad_accum_fp32: bool = False

    @classmethod
    def from_ds_config(cls, ds: dict) -> "ZeroSettings":
        zero = ds.get("zero_optimization", {}) or {}

        def get(key: str, *aliases: str, default):
            for k in (key, *aliases):
                if k in zero:
                    return zero[k]
            return default

        def device(key: str) -> bool:
            section = zero.get(key) or {}
            return isinstance(section, dict) and section.get("device", "none") not in ("none", None)

        d = cls()
        accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
        return cls(
            param_persistence_threshold=int(
                get(
                    "stage3_param_persistence_threshold",
                    "param_persistence_threshold",
                    default=d.param_persistence_threshold,
                )
            ),
            model_persistence_threshold=int(
                get(
                    "stage3_model_persistence_threshold",
                    "model_persistence_threshold",
                    default=d.model_persistence_threshold,
                )
            ),
            prefetch_bucket_size=int(
                get("stage3_prefetch_bucket_size", "prefetch_bucket_size", default=d.prefetch_bucket_size)
            ),
            max_live_parameters=int(
                get("stage3_max_live_parameters", "max_live_parameters", default=d.max_live_parameters)
            ),
            max_reuse_distance=int(
                get("stage3_max_reuse_distance", "max_reuse_distance", default=d.max_reuse_distance)
            ),
            reduce_bucket_size=int(get("reduce_bucket_size", default=d.reduce_bucket_size)),
            contiguous_gradients=bool(get("contiguous_gradients", default=True)),
            sub_group_size=int(get("sub_group_size", default=d.sub_group_size)),
            offload_param=device("offload_param"),
            offload_optimizer=device("offload_optimizer"),
            grad_accum_fp32=str(accum).lower() in ("fp32", "float32", "torch.float32"),
        )


@dataclass
class EngineState:
    """Bytes per GPU held by the engine besides the step's activations."""

    engine: str
    params: int
    grads: int
    optimizer: int
    teacher: int
    gathered: int  # parameters gathered for compute at once (student + teacher)
    step: int  # optimizer-step temporaries (when the activations are gone)
    notes: list[str] = field(default_factory=list)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _persistent(numels: list[int], zero: ZeroSettings) -> list[bool]:
    out, total = [], 0
    for n in numels:
        keep = n <= zero.param_persistence_threshold and total + n <= zero.model_persistence_threshold
        total += n if keep else 0
        out.append(keep)
    return out


def zero3_gathered(counts: ModelCounts, zero: ZeroSettings) -> tuple[int, str]:
    """Elements gathered at once by ZeRO-3 for this model, and why."""
    largest = max(counts.module_numels, default=0)
    stack = counts.layer_numel * counts.num_layers
    if 0 < stack <= zero.max_reuse_distance:
        kept, why = stack + largest, "the decoder stack stays gathered between loops (<= stage3_max_reuse_distance)"
    else:
        kept, why = largest + zero.prefetch_bucket_size, "largest module + stage3_prefetch_bucket_size"
    cap = max(zero.max_live_parameters, largest)
    return min(kept, cap), why if kept <= cap else "stage3_max_live_parameters"


def zero3_state(
    student: ModelCounts,
    teacher: Optional[ModelCounts],
    world: int,
    dtype: torch.dtype,
    zero: ZeroSettings,
    teacher_offload: bool = False,
) -> EngineState:
    low = torch.tensor([], dtype=dtype).element_size()
    numels = student.numels
    parts = [ceil_div(n, world) for n in numels]
    persist = _persistent(numels, zero)
    trained_part = sum(p for p, t in zip(parts, student.trainable) if t)
    notes = []
    params = 0 if zero.offload_param else sum(parts) * low
    params += sum(n for n, keep in zip(numels, persist) if keep) * low
    grad_bytes = 4 if zero.grad_accum_fp32 else low
    bucket = zero.reduce_bucket_size * low if zero.contiguous_gradients else 0
    grads = (0 if zero.offload_optimizer else trained_part * grad_bytes) + bucket
    # DeepSpeed 0.19 clones the fp32 master partition even when the model is fp32 (its "no copy needed"
    # check compares a torch.device with the accelerator's device name string, never equal)
    master = trained_part * 4
    optimizer = 0 if zero.offload_optimizer else master + trained_part * 8
    gathered, why = zero3_gathered(student, zero)
    notes.append(f"ZeRO-3 gathered parameters: {why}")
    gathered *= low
    teacher_bytes = 0
    if teacher is not None:
        t_numels = teacher.numels
        t_persist = _persistent(t_numels, zero)
        teacher_bytes = 0 if teacher_offload or zero.offload_param else sum(ceil_div(n, world) for n in t_numels) * low
        teacher_bytes += sum(n for n, keep in zip(t_numels, t_persist) if keep) * low
        gathered += zero3_gathered(teacher, zero)[0] * low
    step = 0 if zero.offload_optimizer else 8 * min(trained_part, zero.sub_group_size)
    if zero.offload_param or zero.offload_optimizer:
        notes.append("offloaded partitions are in CPU memory (0 bytes on the GPU)")
    return EngineState("deepspeed", params, grads, optimizer, teacher_bytes, gathered, step, notes)


def fsdp2_shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's dim-0 shard (padded)."""
    if not shape:
        return 1
    return ceil_div(shape[0], world) * math.prod(shape[1:])


def fsdp2_state(
    student: ModelCounts,
    teacher: Optional[ModelCounts],
    world: int,
    dtype: torch.dtype,
    reshard_after_forward: bool = True,
    teacher_offload: bool = False,
) -> EngineState:
    low = torch.tensor([], dtype=dtype).element_size()
    shards = [fsdp2_shard(s, world) for s in student.shapes]
    trained = sum(s for s, t in zip(shards, student.trainable) if t)
    params = sum(shards) * 4  # fp32 shards: the master weights
    grads = trained * 4
    optimizer = trained * 8
    layers = student.layer_numel * (student.num_layers if not reshard_after_forward else min(2, student.num_layers))
    gathered = (student.root + layers) * low
    notes = [
        "FSDP2 gathered parameters: the root (embeddings, lm_head, norms) from forward to backward + "
        + (
            "every layer (reshard_after_forward false)"
            if not reshard_after_forward
            else "the current and the prefetched layer"
        )
    ]
    teacher_bytes = 0
    if teacher is not None:
        teacher_bytes = 0 if teacher_offload else sum(fsdp2_shard(s, world) for s in teacher.shapes) * low
        # the teacher runs (and reshards) before the student's forward: the larger working set counts
        gathered = max(gathered, (teacher.root + teacher.layer_numel * min(2, teacher.num_layers)) * low)
    step = trained * 4  # Adam's foreach sqrt temporary
    return EngineState("fsdp", params, grads, optimizer, teacher_bytes, gathered, step, notes)


def engine_state(
    cfg: RunConfig, student: ModelCounts, teacher: Optional[ModelCounts], world: int, dtype: torch.dtype
) -> EngineState:
    offload = bool(cfg.teacher and cfg.teacher.offload_params)
    if cfg.engine.name == "fsdp":
        return fsdp2_state(student, teacher, world, dtype, cfg.engine.fsdp.reshard_after_forward, offload)
    return zero3_state(student, teacher, world, dtype, ZeroSettings.from_ds_config(cfg.engine.deepspeed), offload)
