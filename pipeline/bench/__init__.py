"""Benchmarks: each writes JSON (and a PNG where a person would rather look) and compares
contenders side by side in one run, as ratios. Never timed assertions in tests.

    python -m pipeline.bench memory --out runs/bench/memory.json
    python -m pipeline.bench decode --out runs/bench/decode.json
    python -m pipeline.bench train  --out runs/bench/train.json
"""

# name -> module with add_arguments(parser) and run(args) -> dict (the JSON written to --out)
BENCHMARKS = {
    "memory": "pipeline.bench.memory",
    "decode": "pipeline.bench.decode",
    "train": "pipeline.bench.train",
}
