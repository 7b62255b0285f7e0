"""Collectives the trainer needs, independent of the engine (plain torch.distributed).

Every function is a no-op (or the identity) when no process group is running, so the
same code serves single-process tools and tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place; op is "sum", "min" or "max". Small CPU tensors (counts, flags) are fine on any
    backend: NCCL only reduces GPU tensors, so there they travel through the current GPU."""
    if active():
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=reduce_op)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_gather_object(obj: Any) -> list:
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
