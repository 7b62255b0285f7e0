"""A memory plan as text (a table per GPU) and as JSON; GPU memory sizes from the command line."""

from __future__ import annotations

import re

from pipeline.planning.planner import MemoryPlan

UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
ROWS = (
    ("params", "parameters"),
    ("grads", "gradients"),
    ("optimizer", "optimizer (master + Adam)"),
    ("teacher", "teacher"),
    ("gathered", "gathered parameters"),
    ("activations", "activations (step)"),
)


def parse_memory(text: str | int | float, what: str = "--gpu-memory") -> int:
    """'80GB' (10^9), '80GiB' (2^30), '141G' (GB) or a number of bytes -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match:
            raise ValueError(f"{what} {text!r}: expected a size such as 80GB, 80GiB or a number of bytes")
        value, unit = float(match.group(1)), match.group(2).lower()
        unit = {"k": "kb", "m": "mb", "g": "gb", "t": "tb"}.get(unit, unit)
    if unit not in UNITS:
        raise ValueError(f"{what} {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(value * UNITS[unit])
    if size < 2**20:
        raise ValueError(f"{what} {text!r} is {size} bytes: give a unit (e.g. 80GB)")
    return size


def human(n: int) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (GiB, MiB, KiB or B)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe_step(plan: MemoryPlan) -> str:
    i = plan.inputs
    parts = [f"{i.micro_batch} x {i.seq_len} tokens per micro-step"]
    if i.chunk_size is not None:
        parts.append(f"chunk {i.chunk_size}")
    if i.alpha is not None:
        parts.append(f"alpha {i.alpha:g}")
    parts.append(f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}")
    return ", ".join(parts)


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """The table per GPU with the verdict."""
    dtype = str(plan.inputs.dtype).removeprefix("torch.")
    engine = {"deepspeed": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}.get(plan.engine, plan.engine)
    lines = [
        f"memory plan: phase {plan.phase}{(' of ' + title) if title else ''}",
        f"  {engine}, {dtype}, {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = world size {plan.world_size}",
        f"  step: {describe_step(plan)}",
        f"  activations: {plan.method}",
        f"  the micro-step unsharded: activations {human(plan.step.activations)}, the full model's parameters "
        f"{human(plan.step.params)} and gradients {human(plan.step.grads)}"
        + (f", teacher {human(plan.step.frozen)}" if plan.step.frozen else ""),
        f"  per GPU {'':<26}{'bytes':>16}{'':>4}{'GiB':>9}",
    ]
    per = plan.per_gpu
    for key, label in ROWS:
        if key == "optimizer" and plan.engine == "fsdp":
            label = "optimizer (Adam)"  # FSDP2's fp32 shards are the master weights (under parameters)
        lines.append(f"  {label:<34}{per[key]:>16,}{'':>4}{per[key] / 2**30:>9.2f}")
    lines.append(
        f"  {'(optimizer step temporaries)':<34}{per['optimizer_step']:>16,}{'':>4}"
        f"{per['optimizer_step'] / 2**30:>9.2f}"
    )
    lines.append(f"  {'peak':<34}{per['peak']:>16,}{'':>4}{per['peak'] / 2**30:>9.2f}")
    verdict = "fits" if plan.fits else "does not fit"
    share = plan.headroom / plan.gpu_memory * 100
    lines.append(
        f"  => {verdict} in {plan.gpu_memory / 1e9:g} GB ({human(plan.gpu_memory)}): peak "
        f"{human(plan.peak)}, headroom {human(plan.headroom)} ({share:.1f}%)"
    )
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append(f"  planned in {plan.seconds:.1f} s")
    return "\n".join(lines)


def plan_json(plan: MemoryPlan) -> dict:
    i = plan.inputs
    return {
        "phase": plan.phase,
        "engine": plan.engine,
        "world_size": plan.world_size,
        "nodes": plan.nodes,
        "gpus_per_node": plan.gpus_per_node,
        "per_gpu": plan.per_gpu,
        "gpu_memory": plan.gpu_memory,
        "fits": plan.fits,
        "headroom": plan.headroom,
        "headroom_fraction": plan.headroom / plan.gpu_memory,
        "seq_len": i.seq_len,
        "micro_batch": i.micro_batch,
        "chunk": i.chunk_size,
        "alpha": i.alpha,
        "dtype": str(i.dtype).removeprefix("torch."),
        "activation_checkpointing": plan.activation_checkpointing,
        "layers_measured": [m.layers for m in plan.measured],
        "num_layers": plan.step.layers,
        "method": plan.method,
        "step": plan.step.as_dict(),
        "measured": [m.as_dict() for m in plan.measured],
        "model_source": i.model.source,
        "teacher_source": i.teacher.source if i.teacher else None,
        "notes": plan.notes,
        "seconds": plan.seconds,
    }
