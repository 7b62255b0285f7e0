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


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def markdown_table(results: dict) -> str:
    """One row per contender: accuracy (overall and per difficulty), perplexity, KV bytes, speed."""
    difficulties = sorted({int(k) for r in results.values() for k in r.get("accuracy_by_difficulty", {})})
    head = (
        ["contender", "loops", "params", "accuracy"]
        + [f"k={k}" for k in difficulties]
        + ["ppl", "KV bytes", "decode tok/s"]
    )
    rows = []
    for name, r in results.items():
        by = {int(k): v for k, v in r.get("accuracy_by_difficulty", {}).items()}
        rows.append(
            [name, r.get("loops"), r.get("parameters"), r.get("accuracy")]
            + [by.get(k) for k in difficulties]
            + [_ppl(r), r.get("kv_cache_bytes"), r.get("decode_tokens_per_s")]
        )
    return _table(head, rows)


def math_table(results: dict) -> str:
    """One row per contender, math task and answer extraction: greedy pass@1 and sampled pass@k."""
    tasks = [(name, task, r) for name, c in results.items() for task, r in c.get("math", {}).items()]
    ks = sorted({int(k) for *_, r in tasks for k in r.get("sampled", {}).get("pass@k", {})})
    head = ["contender", "task", "answer", "problems", "prompt", "pass@1 greedy"] + [f"pass@{k} sampled" for k in ks]
    rows = []
    for name, task, r in tasks:
        sampled = r.get("sampled", {}).get("pass@k", {})
        rows += [
            [name, task, mode, r["problems"], r["prompt"]["format"], greedy]
            + [sampled.get(str(k), {}).get(mode) for k in ks]
            for mode, greedy in r["pass@1"].items()
        ]
    return _table(head, rows)
