"""Shared pieces of the model benchmarks: model shape options, building contenders on the
same random weights, device/dtype, memory readings and plotting."""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path

import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltForCausalLM

# Ouro-1.4B's shapes (random weights) for GPU runs: --preset ouro-1.4b
PRESETS = {
    "cpu-small": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512, vocab=1024),
    "ouro-1.4b": dict(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5632, vocab=49152),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu-small",
        help="model shape (explicit --hidden etc. override it)",
    )
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--prefill-chunk", type=int, default=256, help="MELT prefill chunk size")
    parser.add_argument("--seed", type=int, default=0)


def model_shape(args) -> dict:
    shape = dict(PRESETS[args.preset])
    for key in shape:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            shape[key] = value
    return shape


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def build_looplm(shape: dict, loops: int, max_positions: int, seed: int, device, dtype) -> LoopLMForCausalLM:
    config = LoopLMConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        total_ut_steps=loops,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LoopLMForCausalLM(config)
    return model.to(dtype).eval()


def build_contender(
    kind: str, shape: dict, loops: int, max_positions: int, seed: int, device, dtype, prefill_chunk: int
):
    """kind: standard (LoopLM, T = 1), looplm (T loops, per-loop cache) or melt (T loops, one slot)."""
    if kind == "standard":
        return build_looplm(shape, 1, max_positions, seed, device, dtype)
    looplm = build_looplm(shape, loops, max_positions, seed, device, dtype)
    if kind == "looplm":
        return looplm
    if kind == "melt":
        return MeltForCausalLM.from_looplm(looplm, chunk_size=prefill_chunk, alpha=1.0).eval()
    raise ValueError(f"unknown contender {kind!r}")


def generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy generation of exactly new_tokens tokens; returns the output with its cache."""
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            return_dict_in_generate=True,
        )


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def plot_lines(
    path: Path, title: str, xlabel: str, ylabel: str, series: dict, log2x: bool = True, hlines: dict | None = None
) -> None:
    """series: label -> (xs, ys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", label=label)
    if log2x:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
