"""Markdown tables of evaluation results."""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ppl(result: dict):
    """Perplexity, with MELT's scoring chunking beside it (LoopLMs have no chunks to name)."""
    ppl, chunking = result.get("perplexity"), result.get("scoring_chunking")
    if ppl is None or chunking in (None, "unchunked"):
        return ppl
    return f"{_fmt(ppl)} ({chunking})"


def markdown_table(results: dict) -> str:
    """One row per contender: accuracy (overall and per difficulty), perplexity, KV bytes, speed."""
    difficulties = sorted({int(k) for r in results.values() for k in r.get("accuracy_by_difficulty", {})})
    head = ["contender", "loops", "params", "accuracy"] + [f"k={k}" for k in difficulties] + \
        ["ppl", "KV bytes", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        by = {int(k): v for k, v in r.get("accuracy_by_difficulty", {}).items()}
        row = [name, r.get("loops"), r.get("parameters"), r.get("accuracy")] + [by.get(k) for k in difficulties] + \
            [_ppl(r), r.get("kv_cache_bytes"), r.get("decode_tokens_per_s")]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)
