"""Step memory of the LoopLM's pretrain step and MELT's transition step against the sequence length.

One training micro-step (forward + loss + backward, activation checkpointing as the trainer runs
it) of each contender, counted with the memory planner's step (pipeline/planning/step.py):
- at the CPU benchmark's shape with real tensors (float32), several sequence lengths;
- at a real model's shape (e.g. Ouro-1.4B, bf16) with fake tensors, measured at 1 and 2 layers
  and extrapolated linearly in depth, as `python -m pipeline.plan` does (slow: about a minute
  per contender and length; off unless --planner-seq-lens is given).
Bytes per contender: `activations` (peak live bytes of the step above the parameters, gradients
released as they are produced, as ZeRO-3 / FSDP2 do) and `step` = parameters + gradients +
activations of one unsharded device (the figure of issue 13's table).
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.bench.common import PRESETS

CONTENDERS = (("looplm_pretrain", None), ("melt_transition", 1.0), ("melt_transition", 0.5))


def looplm_config(shape: dict, loops: int, max_positions: int) -> dict:
    return {
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "total_ut_steps": loops,
        "max_position_embeddings": max_positions,
    }


def contender_step(
    kind: str, alpha: Optional[float], arch: dict, seq_len: int, batch: int, chunk: int, dtype: torch.dtype
):
    """(run config, step inputs) of one contender's micro-step."""
    from pipeline.planning.inputs import Architecture, StepInputs
    from pipeline.training.config import validate_run_config

    common = {
        "run_dir": "unused",
        "data": {"path": "unused", "micro_batch_size": batch, "global_batch_size": batch},
        "schedule": {"total_steps": 1},
        "engine": {"activation_checkpointing": True},
    }
    if kind == "looplm_pretrain":
        cfg = validate_run_config({**common, "model": {"config": arch}, "phase": {"name": "pretrain"}})
    else:
        cfg = validate_run_config(
            {**common, "model": {"init_from": "bench/looplm"}, "phase": {"name": "transition", "chunk_size": chunk}}
        )
    inputs = StepInputs(
        phase=cfg.phase.name,
        seq_len=seq_len,
        micro_batch=batch,
        dtype=dtype,
        model=Architecture(arch, "benchmark shape"),
        alpha=alpha,
        chunk_size=chunk if alpha is not None else None,
    )
    return cfg, inputs


def measure(
    shape_name: str, shape: dict, loops: int, seq_lens: list[int], batch: int, chunk: int, fake: bool, progress=None
) -> list[dict]:
    from pipeline.planning.step import measure_depth, measure_step

    dtype = torch.bfloat16 if fake else torch.float32
    rows = []
    for seq_len in seq_lens:
        arch = looplm_config(shape, loops, seq_len)
        for kind, alpha in CONTENDERS:
            cfg, inputs = contender_step(kind, alpha, arch, seq_len, batch, chunk, dtype)
            if fake:
                step = measure_depth(cfg, inputs, fake=True).step
                method = "fake tensors at 1 and 2 layers, extrapolated linearly in depth"
            else:
                step = measure_step(cfg, inputs=inputs, fake=False)
                method = "real tensors"
            rows.append(
                {
                    "shape": shape_name,
                    "contender": kind,
                    "alpha": alpha,
                    "seq_len": seq_len,
                    "batch": batch,
                    "chunk": chunk if alpha is not None else None,
                    "dtype": str(dtype).removeprefix("torch."),
                    "method": method,
                    "activations": step.activations,
                    "params": step.params,
                    "grads": step.grads,
                    "step": step.params + step.grads + step.activations,
                }
            )
            if progress:
                progress(rows[-1])
    return rows


def label(row: dict) -> str:
    return row["contender"] if row["alpha"] is None else f"{row['contender']}_alpha{row['alpha']:g}"


def summarize(rows: list[dict]) -> dict:
    """Per shape: the growth of activation bytes per doubling of the length (at the longest pair)
    and MELT / LoopLM at the longest length, for activations and the whole step."""
    summary = {}
    for shape in sorted({r["shape"] for r in rows}):
        mine = [r for r in rows if r["shape"] == shape]
        lengths = sorted({r["seq_len"] for r in mine})
        at = {(label(r), r["seq_len"]): r for r in mine}
        longest = lengths[-1]
        part = {"longest_seq_len": longest}
        if len(lengths) > 1 and lengths[-1] == 2 * lengths[-2]:
            for name in sorted({label(r) for r in mine}):
                part[f"{name}_activation_growth_per_doubling"] = round(
                    at[(name, longest)]["activations"] / at[(name, lengths[-2])]["activations"], 3
                )
        base = at[("looplm_pretrain", longest)]
        for name in ("melt_transition_alpha1", "melt_transition_alpha0.5"):
            row = at[(name, longest)]
            part[f"{name}_vs_looplm_step"] = round(row["step"] / base["step"], 3)
            part[f"{name}_vs_looplm_activations"] = round(row["activations"] / base["activations"], 3)
        summary[shape] = part
    return summary


def plot(rows: list[dict], path) -> None:
    from pipeline.bench.common import plot_lines

    for shape in sorted({r["shape"] for r in rows}):
        series = {}
        for name in sorted({label(r) for r in rows if r["shape"] == shape}):
            mine = sorted((r for r in rows if r["shape"] == shape and label(r) == name), key=lambda r: r["seq_len"])
            series[name] = ([r["seq_len"] for r in mine], [r["step"] / 2**30 for r in mine])
        plot_lines(
            path.with_name(f"{path.stem}_memory_{shape}.png"),
            f"training step memory, {shape} (1 sequence)",
            "sequence length (tokens)",
            "GiB (parameters + gradients + activations)",
            series,
        )


def add_arguments(parser) -> None:
    parser.add_argument(
        "--memory-seq-lens",
        default="2048,4096,8192",
        help="sequence lengths of the step-memory rows at the benchmark shape ('' skips them)",
    )
    parser.add_argument("--memory-chunk", type=int, default=128, help="MELT chunk size of the step-memory rows")
    parser.add_argument(
        "--planner-preset",
        default="ouro-1.4b",
        choices=sorted(PRESETS),
        help="real model shape of the fake-tensor rows",
    )
    parser.add_argument(
        "--planner-seq-lens",
        default="",
        help="sequence lengths of the fake-tensor rows at --planner-preset, e.g. 2048,4096,8192 "
        "(about a minute per contender and length on 2 cores; '' skips them)",
    )


def run(args, shape: dict, progress=None) -> dict:
    lengths = [int(x) for x in args.memory_seq_lens.split(",") if x]
    planner_lengths = [int(x) for x in args.planner_seq_lens.split(",") if x]
    rows = (
        measure(
            args.preset if args.hidden is None else "custom",
            shape,
            args.loops,
            lengths,
            1,
            args.memory_chunk,
            fake=False,
            progress=progress,
        )
        if lengths
        else []
    )
    if planner_lengths:
        rows += measure(
            args.planner_preset,
            PRESETS[args.planner_preset],
            args.loops,
            planner_lengths,
            1,
            args.memory_chunk,
            fake=True,
            progress=progress,
        )
    return {"rows": rows, "summary": summarize(rows) if rows else {}}
