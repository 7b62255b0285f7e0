"""KV-cache bytes and peak memory of standard / LoopLM / MELT against the loop count T.

Each (model, T) runs in a fresh process so that its peak memory is its own: on CUDA the
peak allocated bytes, on CPU the process's peak RSS (and the rise above the RSS before
generation, which is what the cache and activations add). The cache bytes are read from
the cache object after generation (`nbytes`), not computed from a formula.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.bench.common import add_model_arguments, model_shape, plot_lines


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--loops", default="1,2,4,8,16", help="comma-separated loop counts")
    parser.add_argument("--context", type=int, default=4096, help="prompt length (the long context)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)


def run_one(args, kind: str, loops: int) -> dict:
    spec = dict(
        kind=kind,
        loops=loops,
        shape=model_shape(args),
        context=args.context,
        new_tokens=args.new_tokens,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        prefill_chunk=args.prefill_chunk,
        seed=args.seed,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.memory_worker", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {kind} T={loops} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    loops = [int(t) for t in args.loops.split(",")]
    jobs = [("standard", 1)] + [(kind, t) for t in loops for kind in ("looplm", "melt")]
    rows = [run_one(args, kind, t) for kind, t in tqdm(jobs, desc="memory benchmark", unit="run")]
    by = {(r["model"], r["loops"]): r for r in rows}
    standard = by[("standard", 1)]
    summary = {
        "melt_kv_over_standard": {t: by[("melt", t)]["kv_cache_bytes"] / standard["kv_cache_bytes"] for t in loops},
        "melt_kv_over_looplm": {
            t: by[("melt", t)]["kv_cache_bytes"] / by[("looplm", t)]["kv_cache_bytes"] for t in loops
        },
        "melt_peak_tmax_over_t1": by[("melt", max(loops))]["peak_bytes"] / by[("melt", min(loops))]["peak_bytes"],
        "melt_rise_tmax_over_t1": by[("melt", max(loops))]["peak_rise_bytes"]
        / max(by[("melt", min(loops))]["peak_rise_bytes"], 1),
        "looplm_peak_tmax_over_t1": by[("looplm", max(loops))]["peak_bytes"] / by[("looplm", min(loops))]["peak_bytes"],
    }
    summary["targets"] = {
        "melt_kv_equals_standard": all(abs(v - 1.0) < 1e-9 for v in summary["melt_kv_over_standard"].values()),
        "melt_kv_is_1_over_T_of_looplm": all(
            abs(v * t - 1.0) < 1e-9 for t, v in summary["melt_kv_over_looplm"].items()
        ),
        "melt_peak_tmax_within_5pct_of_t1": summary["melt_peak_tmax_over_t1"] <= 1.05,
    }
    out = Path(args.out)
    series = {m: ([t for t in loops], [by[(m, t)]["kv_cache_bytes"] for t in loops]) for m in ("looplm", "melt")}
    plot_lines(
        out.with_suffix(".png"),
        f"KV cache after {args.context}+{args.new_tokens} tokens",
        "loops T",
        "KV cache bytes",
        series,
        hlines={"standard (T=1)": standard["kv_cache_bytes"]},
    )
    peaks = {m: ([t for t in loops], [by[(m, t)]["peak_bytes"] for t in loops]) for m in ("looplm", "melt")}
    plot_lines(
        out.with_name(out.stem + "_peak.png"),
        "peak memory",
        "loops T",
        "bytes",
        peaks,
        hlines={"standard (T=1)": standard["peak_bytes"]},
    )
    return {
        "benchmark": "memory",
        "shape": model_shape(args),
        "device": rows[0]["device"],
        "dtype": rows[0]["dtype"],
        "rows": rows,
        "summary": summary,
    }
