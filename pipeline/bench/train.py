"""Training cost: LoopLM pretrain step vs MELT transition steps (speed and memory), and ZeRO-3 partitioning.

    python -m pipeline.bench train --out runs/bench/train.json [--preset cpu-small] [--seq-len 512]
        [--memory-seq-lens 512,1024,2048] [--planner-seq-lens 2048,4096,8192]

1. Throughput (one process, plain PyTorch, same random model and sequence length): tokens/s of
   a LoopLM pretrain step (Ouro stage-I loss) and of MELT transition steps (chunk-wise, last-loop
   CE, alpha mid-ramp so the per-loop keys are kept as well) at each --chunks size, each timed
   as forward + loss + backward + AdamW step, the contenders in turns (median of --steps turns).
   Ratios MELT / LoopLM; target >= 1.0 at chunk 128. Each step's matrix-product FLOPs are counted
   too (FlopCounterMode): MELT's gate projections cost FLOPs the LoopLM does not spend, so the
   JSON also gives the FLOP-normalised ratio (tokens/s ratio x FLOP ratio; 1.0: equally efficient),
   and both steps' FLOPs at a real model's shape (--flops-preset, default ouro-1.4b).
2. Step memory (train_memory.py): one micro-step's bytes of both models against the sequence
   length, at alpha 1 and mid-ramp, with real tensors at the benchmark shape and (optionally)
   fake tensors at a real model's shape; targets: doubling the length at most doubles MELT's
   activation bytes (+10%); at the longest length MELT's step at most 1.5x the LoopLM's at
   alpha 1 and 3x mid-ramp. A PNG per shape beside the JSON.
3. ZeRO-3 (the trainer's DeepSpeed engine, launched with `deepspeed --num_gpus N` on CPU): bytes
   of parameters + fp32 master + optimizer state held by one rank, with 1 and 2 ranks; target:
   2 ranks at most 0.55 x 1 rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.bench import train_memory
from pipeline.bench.common import add_model_arguments, build_looplm, device_and_dtype, model_shape

if TYPE_CHECKING:
    from pipeline.models import LoopLMForCausalLM, MeltForCausalLM

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--steps",
        type=int,
        default=41,
        help="timed steps per contender, taken in turns (after 1 warm-up); the median counts (on 2 shared "
        "cores one step varies by +-25%%: medians of 41 agreed within 0.3%% between runs, of 5-15 by 20%%)",
    )
    parser.add_argument("--chunks", default="64,128", help="MELT chunk sizes")
    parser.add_argument("--alpha", type=float, default=0.5, help="MELT's alpha in the timed steps")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--flops-preset",
        default="ouro-1.4b",
        help="also count both steps' matmul FLOPs at this real shape ('' skips it)",
    )
    parser.add_argument("--zero-ranks", default="1,2", help="rank counts for the ZeRO-3 bytes ('' skips it)")
    parser.add_argument("--zero-preset", default=None, help="model shape for the ZeRO-3 part (default: --preset)")
    train_memory.add_arguments(parser)


def training_step(model, kind: str, batch: dict):
    """One training step of the trainer's kind (forward + loss + backward + AdamW step) as a closure."""
    from pipeline.training.config import LossSection
    from pipeline.training.phases.base import lm_loss

    loss_cfg = LossSection.model_validate({"kind": kind})  # the trainer's defaults (per-loop metrics on)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        out = model(input_ids=batch["input_ids"], output_loop_logits=True, use_cache=False)
        loss = lm_loss(loss_cfg, out, batch["labels"], None).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def matmul_flops(step) -> int:
    """FLOPs of one step's matrix products (torch's FlopCounterMode; the attention kernels are not
    counted: their FLOPs are the same for both models, causal attention over the same tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_flops_at_shape(preset: str, loops: int, chunk: int, alpha: float, tokens: int = 256) -> dict:
    """Matmul FLOPs of one LoopLM pretrain step and one MELT transition step at a real model's shape
    (PRESETS), counted with 1 and 2 decoder layers and extrapolated linearly to the model's depth
    (FLOPs are linear in depth; 256 tokens: the matmul FLOPs per token do not depend on the length)."""
    from pipeline.bench.common import PRESETS
    from pipeline.models import MeltForCausalLM

    shape = dict(PRESETS[preset])
    ids = torch.randint(0, shape["vocab"], (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    counted: dict[str, list[int]] = {"looplm_pretrain": [], "melt_transition": []}
    for depth in (1, 2):
        shallow = dict(shape, layers=depth)
        looplm = build_looplm(shallow, loops, tokens, 0, torch.device("cpu"), torch.float32)
        counted["looplm_pretrain"].append(matmul_flops(training_step(looplm, "ouro_stage1", batch)))
        melt = MeltForCausalLM.from_looplm(looplm, chunk_size=min(chunk, tokens), alpha=alpha)
        counted["melt_transition"].append(matmul_flops(training_step(melt, "last_loop_ce", batch)))
        del looplm, melt
    full = {name: one + (shape["layers"] - 1) * (two - one) for name, (one, two) in counted.items()}
    return {
        "preset": preset,
        "layers": shape["layers"],
        "tokens": tokens,
        "matmul_flops_per_step": full,
        "melt_vs_looplm": full["melt_transition"] / full["looplm_pretrain"],
    }


def time_interleaved(steps: dict, repeats: int, device: torch.device) -> dict:
    """Seconds per step of each contender, timed in turns (A, B, C, A, B, C, ...) so that a slow
    spell of a shared machine hits all of them alike; the median of `repeats` turns."""
    import statistics

    seconds: dict[str, list[float]] = {name: [] for name in steps}
    losses = {}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses[name] = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"step_s": statistics.median(s), "step_s_all": s, "loss": losses[name]} for name, s in seconds.items()
    }


def throughput(args) -> dict:
    from pipeline.models import MeltForCausalLM

    device, dtype = device_and_dtype(args)
    shape = model_shape(args)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    models: dict[str, tuple[LoopLMForCausalLM | MeltForCausalLM, str]] = {
        "looplm_pretrain": (build_looplm(shape, args.loops, args.seq_len, args.seed, device, dtype), "ouro_stage1")
    }
    for chunk in [int(c) for c in args.chunks.split(",") if c]:
        melt = MeltForCausalLM.from_looplm(
            build_looplm(shape, args.loops, args.seq_len, args.seed, device, dtype), chunk_size=chunk, alpha=args.alpha
        )
        models[f"melt_transition_chunk{chunk}"] = (melt, "last_loop_ce")
    steps, flops = {}, {}
    for name, (model, kind) in models.items():
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        steps[name] = training_step(model, kind, batch)
        flops[name] = matmul_flops(steps[name])  # also the warm-up step
    results = time_interleaved(steps, args.steps, device)
    del steps, models
    tokens = ids.numel()
    for name, r in results.items():
        r.update(tokens_per_s=tokens / r["step_s"], matmul_flops=flops[name])
    base = results["looplm_pretrain"]
    ratios = {k: v["tokens_per_s"] / base["tokens_per_s"] for k, v in results.items() if k != "looplm_pretrain"}
    flop_ratios = {k: v["matmul_flops"] / base["matmul_flops"] for k, v in results.items() if k != "looplm_pretrain"}
    return {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "loops": args.loops,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "alpha": args.alpha,
        "results": results,
        "ratio_to_looplm": ratios,
        "matmul_flops_ratio_to_looplm": flop_ratios,
        # tokens/s ratio x FLOP ratio: the speed of each FLOP against the LoopLM's (1.0: as efficient)
        "flop_normalised_ratio_to_looplm": {k: ratios[k] * flop_ratios[k] for k in ratios},
        "matmul_flops_at_real_shape": matmul_flops_at_shape(args.flops_preset, args.loops, 128, args.alpha)
        if args.flops_preset
        else None,
    }


# ------------------------------------------------------------------ ZeRO-3 bytes per rank


def zero_config(shape: dict, loops: int, world: int, run_dir: str) -> dict:
    from pipeline.training.config import load_yaml_with_includes

    return {
        "run_dir": run_dir,
        "seed": 0,
        "model": {
            "config": {
                "vocab_size": shape["vocab"],
                "hidden_size": shape["hidden"],
                "intermediate_size": shape["intermediate"],
                "num_hidden_layers": shape["layers"],
                "num_attention_heads": shape["heads"],
                "num_key_value_heads": shape["kv_heads"],
                "total_ut_steps": loops,
                "max_position_embeddings": 128,
            }
        },
        "data": {"path": "unused", "micro_batch_size": 1, "global_batch_size": world},
        "phase": {"name": "pretrain"},
        "schedule": {"total_steps": 2},
        "engine": {"deepspeed": load_yaml_with_includes(REPO / "configs/deepspeed/zero3_cpu.yaml")},
    }


def zero_worker(out: str, preset_args: list[str], loops: int) -> None:
    """One rank of `deepspeed --module pipeline.bench.train --zero-worker ...`: one real training step."""
    import argparse

    from pipeline.distributed import resolve_distributed_env
    from pipeline.training import comm
    from pipeline.training.config import validate_run_config
    from pipeline.training.engines import build_engine
    from pipeline.training.losses import TokenCounts
    from pipeline.training.phases.pretrain import PretrainPhase

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    shape = model_shape(parser.parse_args(preset_args))
    env = resolve_distributed_env()
    cfg = validate_run_config(zero_config(shape, loops, env.world_size, os.path.dirname(out)))
    engine = build_engine(cfg, env)
    engine.init_distributed()
    phase = PretrainPhase(cfg)
    model = phase.build_model(engine)
    engine.prepare(model, phase.parameter_groups(model, engine), lambda s: 1.0, cfg.optimizer.betas, cfg.optimizer.eps)
    ids = torch.randint(0, shape["vocab"], (1, 64), generator=torch.Generator().manual_seed(env.rank))
    batch = {"input_ids": ids, "labels": ids}
    counts = TokenCounts.of(batch)
    out_step = phase.micro_step(
        engine.forward, batch, TokenCounts(counts.labelled * env.world_size, counts.real * env.world_size)
    )
    engine.backward(out_step.losses.total)
    engine.optimizer_step()
    stats = comm.all_gather_object(engine.partition_stats().as_dict())
    if env.rank == 0:
        Path(out).write_text(json.dumps(stats))
    engine.close()


def zero_bytes(args) -> dict:
    ranks = [int(r) for r in args.zero_ranks.split(",") if r]
    if not ranks:
        return {}
    from pipeline.distributed import free_port

    preset = ["--preset", args.zero_preset or args.preset] + [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab")
        if getattr(args, k.replace("-", "_")) is not None and args.zero_preset is None
    ]
    per_rank = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in ranks:
            out = os.path.join(tmp, f"zero{n}.json")
            cmd = [
                str(Path(sys.executable).parent / "deepspeed"),
                "--num_gpus",
                str(n),
                "--master_port",
                str(free_port()),
                "--module",
                "pipeline.bench.train",
                "--zero-worker",
                out,
                str(args.loops),
                *preset,
            ]
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"ZeRO-3 worker with {n} rank(s) failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
                )
            stats = json.loads(Path(out).read_text())
            held = [s["param_bytes"] + s["master_bytes"] + s["optimizer_state_bytes"] for s in stats]
            per_rank[str(n)] = {"max_bytes_per_rank": max(held), "ranks": stats}
    result = {"accelerator": "cpu (fp32)", "per_rank": per_rank}
    if "1" in per_rank and "2" in per_rank:
        result["ratio_2_to_1"] = per_rank["2"]["max_bytes_per_rank"] / per_rank["1"]["max_bytes_per_rank"]
    return result


def step_memory(args) -> dict:
    from tqdm import tqdm

    count = len([x for x in args.memory_seq_lens.split(",") if x]) + len(
        [x for x in args.planner_seq_lens.split(",") if x]
    )
    with tqdm(total=count * len(train_memory.CONTENDERS), desc="step memory", unit="step") as bar:
        result = train_memory.run(args, model_shape(args), progress=lambda row: bar.update())
    if result["rows"]:
        train_memory.plot(result["rows"], args.out)
    return result


def run(args) -> dict:
    result = {"throughput": throughput(args), "step_memory": step_memory(args), "zero3": zero_bytes(args)}
    t, z = result["throughput"], result["zero3"]
    summary = {f"{k}_tokens_per_s": round(v["tokens_per_s"], 1) for k, v in t["results"].items()}
    summary.update({f"{k}_vs_looplm": round(v, 3) for k, v in t["ratio_to_looplm"].items()})
    summary.update({f"{k}_matmul_flops_vs_looplm": round(v, 3) for k, v in t["matmul_flops_ratio_to_looplm"].items()})
    summary.update(
        {f"{k}_flop_normalised_vs_looplm": round(v, 3) for k, v in t["flop_normalised_ratio_to_looplm"].items()}
    )
    if t["matmul_flops_at_real_shape"]:
        real = t["matmul_flops_at_real_shape"]
        summary[f"melt_transition_matmul_flops_vs_looplm_at_{real['preset']}"] = round(real["melt_vs_looplm"], 3)
    for shape, part in result["step_memory"]["summary"].items():
        summary.update({f"memory_{shape}_{k}": v for k, v in part.items()})
    if "ratio_2_to_1" in z:
        summary["zero3_bytes_per_rank_2_vs_1"] = round(z["ratio_2_to_1"], 3)
    result["summary"] = summary
    result["targets"] = {
        "melt_chunk128_vs_looplm_at_least": 1.0,
        "zero3_2_vs_1_at_most": 0.55,
        "melt_activation_growth_per_doubling_at_most": 2.2,
        "melt_alpha1_vs_looplm_step_at_most": 1.5,
        "melt_alpha0.5_vs_looplm_step_at_most": 3.0,
    }
    return result


if __name__ == "__main__":  # a ZeRO-3 worker rank (see zero_bytes)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if not argv or argv[0] != "--zero-worker":
        sys.exit("use `python -m pipeline.bench train --out FILE.json`")
    zero_worker(argv[1], argv[3:], int(argv[2]))
