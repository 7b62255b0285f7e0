"""``python -m data_prep bench --out FILE.json``: the data stage's throughput against the raw tokenizer.

On a generated English-like corpus (Zipf-distributed pseudo-words, >= 20 MB by default):
tokens/s of the full text stage (read, tokenize, pack, write MDS) with 1..K workers against
the raw batch-encoding throughput of the same tokenizer on the same text with as many
threads (the Rust tokenizer's own parallelism), each raw measure in a fresh process.
Import time is excluded (modules are imported before the clocks start). The CPU may be
shared with other work, so the figures are noisy: each measure is repeated (interleaved) and
the best run is reported, with all runs and the load average recorded.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import BenchConfig, TextConfig


def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """JSONL documents of sentences of pseudo-words; returns the number of documents."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwyz" for v in "aeiou"] + ["th", "st", "er", "an", "in", "on"]
    words = sorted({"".join(rng.choices(syllables, k=rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(20000)})
    rng.shuffle(words)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    written = documents = 0
    with open(path, "w") as handle:
        while written < size_bytes:
            sentences = []
            for _ in range(rng.randint(3, 40)):
                sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 24))
                sentence[0] = sentence[0].capitalize()
                sentences.append(" ".join(sentence) + rng.choice(".....?!"))
            line = json.dumps({"text": " ".join(sentences)}) + "\n"
            handle.write(line)
            written += len(line.encode())
            documents += 1
    return documents


def _chunks(texts: list[str], part_chars: int) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    size = 0
    for text in texts:
        chunks[-1].append(text)
        size += len(text)
        if size >= part_chars:
            chunks.append([])
            size = 0
    return [c for c in chunks if c]


def raw_throughput(corpus: str, tokenizer: str, part_chars: int) -> dict[str, float]:
    """Tokens/s of the tokenizer's batch encoding alone (run in a process whose environment
    sets the thread count); tokens counted like the stage's: ids plus one EOS per document."""
    from .tokenizer import encode_batch, load_tokenizer

    tok = load_tokenizer(tokenizer)
    with open(corpus) as handle:
        texts = [json.loads(line)["text"] for line in handle]
    chunks = _chunks(texts, part_chars)
    started, cpu = time.perf_counter(), _cpu_seconds()
    tokens = sum(len(ids) + 1 for chunk in chunks for ids in encode_batch(tok, chunk))
    return _rates(tokens, time.perf_counter() - started, _cpu_seconds() - cpu)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rates(tokens: int, seconds: float, cpu_seconds: float) -> dict[str, float]:
    # tokens per CPU-second hardly depends on other load on the machine; wall time does.
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
    }


def _raw_in_subprocess(corpus: Path, tokenizer: Path, part_chars: int, threads: int) -> dict[str, float]:
    env = {
        **os.environ,
        "RAYON_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false",
    }
    code = (
        "import json,sys; from data_prep.throughput import raw_throughput; "
        "print(json.dumps(raw_throughput(sys.argv[1], sys.argv[2], int(sys.argv[3]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(corpus), str(tokenizer), str(part_chars)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(cfg: BenchConfig) -> str:
    import streaming  # noqa: F401  (imported before the clocks start)

    from .text import prepare_text
    from .tokenizer import train_bpe

    with tempfile.TemporaryDirectory(dir=cfg.workdir) as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        documents = make_corpus(corpus, int(cfg.size_mb * 1e6))
        with open(corpus) as handle:
            sample = [json.loads(line)["text"] for line, _ in zip(handle, range(2000))]
        train_bpe(sample, cfg.vocab_size, 2, work / "tokenizer")
        part_chars = TextConfig.model_fields["part_chars"].default
        result: dict[str, Any] = {
            "corpus": {"bytes": corpus.stat().st_size, "documents": documents},
            "tokenizer": {"kind": "byte-level BPE", "vocab_size": cfg.vocab_size},
            "seq_len": cfg.seq_len,
            "cpu_count": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()),
            "raw": {},
            "stage": {},
        }
        index_hashes = set()
        for workers in cfg.workers:
            raw, stage = [], []
            for _ in range(cfg.repeats):  # interleaved, so that a busy spell hits both alike
                raw.append(_raw_in_subprocess(corpus, work / "tokenizer", part_chars, workers))
                out = work / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                started, cpu = time.perf_counter(), _cpu_seconds()
                run = prepare_text(
                    TextConfig(
                        input=[str(corpus)],
                        tokenizer=str(work / "tokenizer"),
                        seq_len=cfg.seq_len,
                        out=str(out),
                        workers=workers,
                    )
                )
                tokens = run.manifest["tokens"]
                stage.append(_rates(tokens, time.perf_counter() - started, _cpu_seconds() - cpu))
                index_hashes.add(run.manifest["index_sha256"])
            for kind, runs in (("raw", raw), ("stage", stage)):
                result[kind][str(workers)] = {
                    **max(runs, key=lambda r: float(r["tokens_per_s"])),  # type: ignore[arg-type]
                    "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
                }
        result["corpus"]["tokens"] = tokens
        result["ratio_stage_vs_raw"] = {
            w: result["stage"][w]["tokens_per_s"] / result["raw"][w]["tokens_per_s"] for w in result["stage"]
        }
        result["cpu_efficiency_stage_vs_raw"] = {
            w: result["stage"][w]["tokens_per_cpu_s"] / result["raw"][w]["tokens_per_cpu_s"] for w in result["stage"]
        }
        first = str(cfg.workers[0])
        result["scaling_vs_first"] = {
            w: {
                kind: result[kind][w]["tokens_per_s"] / result[kind][first]["tokens_per_s"] for kind in ("stage", "raw")
            }
            for w in result["stage"]
        }
        result["identical_output_across_workers"] = len(index_hashes) == 1
        result["loadavg_after"] = list(os.getloadavg())
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"workers {w}: stage {result['stage'][w]['tokens_per_s']:,.0f} tok/s, raw tokenizer "
        f"{result['raw'][w]['tokens_per_s']:,.0f} tok/s, ratio {result['ratio_stage_vs_raw'][w]:.2f}, "
        f"stage scaling {result['scaling_vs_first'][w]['stage']:.2f}x; per CPU-second: ratio "
        f"{result['cpu_efficiency_stage_vs_raw'][w]:.2f}"
        for w in result["stage"]
    ]
    return "\n".join(lines + [f"results -> {cfg.out}"])
