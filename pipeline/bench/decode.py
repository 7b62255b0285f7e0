"""Decode tokens/s of MELT and the LoopLM at equal T on the same weights, in one run.

Two settings: batch 1, and a fixed KV-cache memory budget (the LoopLM's cache at
--budget-batch sequences): MELT's cache is T times smaller, so it fits T times more
sequences in the same bytes. Runs are interleaved and repeated; the median is kept.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.bench.common import add_model_arguments, build_contender, device_and_dtype, generate, model_shape


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--context", type=int, default=512, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--budget-batch", type=int, default=2, help="the memory budget is the LoopLM's KV cache at this batch size"
    )
    parser.add_argument("--repeats", type=int, default=3)


def timed_decode(model, prompt, new_tokens, device) -> tuple[float, int]:
    """Seconds spent on the new tokens only (a prefill-only run is subtracted) and the cache bytes."""

    def clock(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompt, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    prefill_s, _ = clock(1)
    total_s, out = clock(new_tokens + 1)
    return max(total_s - prefill_s, 1e-9), out.past_key_values.nbytes


def run(args) -> dict:
    device, dtype = device_and_dtype(args)
    shape = model_shape(args)
    T = args.loops
    max_positions = args.context + args.new_tokens + 8
    models = {
        kind: build_contender(kind, shape, T, max_positions, args.seed, device, dtype, args.prefill_chunk)
        for kind in ("looplm", "melt")
    }
    settings = [("looplm", 1), ("melt", 1), ("looplm", args.budget_batch), ("melt", args.budget_batch * T)]
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {
        b: torch.randint(3, shape["vocab"], (b, args.context), generator=generator).to(device)
        for b in {b for _, b in settings}
    }
    for kind, batch in settings:  # warm-up
        generate(models[kind], prompts[batch][:, :16], 2)
    times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    cache_bytes = {}
    for _ in tqdm(range(args.repeats), desc="decode benchmark", unit="round"):
        for kind, batch in settings:
            seconds, nbytes = timed_decode(models[kind], prompts[batch], args.new_tokens, device)
            times[(kind, batch)].append(seconds)
            cache_bytes[(kind, batch)] = nbytes
    rows = []
    for kind, batch in settings:
        seconds = statistics.median(times[(kind, batch)])
        rows.append(
            {
                "model": kind,
                "loops": T,
                "batch": batch,
                "context": args.context,
                "new_tokens": args.new_tokens,
                "tokens_per_s": batch * args.new_tokens / seconds,
                "kv_cache_bytes": cache_bytes[(kind, batch)],
                "seconds": seconds,
            }
        )
    by = {(r["model"], r["batch"]): r for r in rows}
    budget = by[("looplm", args.budget_batch)]["kv_cache_bytes"]
    summary = {
        "melt_over_looplm_batch1": by[("melt", 1)]["tokens_per_s"] / by[("looplm", 1)]["tokens_per_s"],
        "melt_over_looplm_at_budget": by[("melt", args.budget_batch * T)]["tokens_per_s"]
        / by[("looplm", args.budget_batch)]["tokens_per_s"],
        "budget_bytes": budget,
        "melt_bytes_at_budget": by[("melt", args.budget_batch * T)]["kv_cache_bytes"],
    }
    summary["targets"] = {
        "melt_batch1_at_least_0.9x": summary["melt_over_looplm_batch1"] >= 0.9,
        "melt_budget_at_least_0.8T_x": summary["melt_over_looplm_at_budget"] >= 0.8 * T,
        "melt_fits_budget": summary["melt_bytes_at_budget"] <= budget,
    }
    plot_bars(Path(args.out).with_suffix(".png"), rows, T)
    return {
        "benchmark": "decode",
        "shape": shape,
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "rows": rows,
        "summary": summary,
    }


def plot_bars(path: Path, rows: list, loops: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], color=["C0" if r["model"] == "looplm" else "C1" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput, T = {loops} (right pair: same KV-cache bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
