"""Evaluate exported models on an MDS eval split.

    python -m pipeline.evaluate --model runs/x/transition/export --contender melt \\
        --data runs/x/data/eval --out runs/x/eval/melt.json

Several contenders in one run (one JSON with an entry each, plus a Markdown table):

    python -m pipeline.evaluate --model standard=DIR1 --model looplm=DIR2 --model looplm_lastkv=DIR2 \\
        --model melt=DIR3 --data DIR/eval --out report.json

Math by generation (GSM8K-format and MATH-style JSONL; greedy pass@1, sampled pass@k), with or
without --data; the model directory needs its tokenizer:

    python -m pipeline.evaluate --model melt=DIR --math gsm8k=test.jsonl,math=math500.jsonl \\
        --math-samples 8 --math-k 1,8 --temperature 0.6 --top-p 0.95 --max-new-tokens 512 --out math.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.evaluation.contenders import CONTENDERS, load_contender, resolve_device
from pipeline.evaluation.data import load_eval_split
from pipeline.evaluation.math_cli import add_math_arguments, math_run
from pipeline.evaluation.metrics import SCORING_CHUNKINGS, evaluate
from pipeline.evaluation.report import markdown_table, math_table
from pipeline.training.phases.base import HUB_NAME


def parse_models(values: list[str], default_contender: str | None) -> list[tuple[str, str, str]]:
    """--model values -> (result name, contender, path). NAME is a contender, or contender:label to
    compare several models of one kind in one run (e.g. melt:step50=DIR, melt:step100=DIR)."""
    models: list[tuple[str, str, str]] = []
    for value in values:
        if "=" in value:
            name, path = value.split("=", 1)
        elif default_contender:
            name, path = default_contender, value
        else:
            raise SystemExit(f"--model {value}: say which contender it is (NAME=DIR or --contender NAME)")
        kind, _, label = name.partition(":")
        if kind not in CONTENDERS or (":" in name and not label):
            raise SystemExit(
                f"--model {value}: unknown contender {name!r}; choose from {', '.join(CONTENDERS)} "
                "(optionally with a label: melt:LABEL)"
            )
        if name in [m[0] for m in models]:
            raise SystemExit(f"--model {value}: {name!r} is given twice; label them (e.g. {kind}:a, {kind}:b)")
        local = Path(path)
        if local.exists() and not (local / "config.json").is_file():
            raise SystemExit(f"--model {value}: {path} is not an exported model (no config.json)")
        if not local.exists() and not HUB_NAME.match(path):
            raise SystemExit(f"--model {value}: {path} does not exist (and is not a hub name like org/model)")
        models.append((name, kind, path))
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="NAME=DIR (NAME: a contender, or contender:label), or DIR with --contender",
    )
    parser.add_argument("--contender", choices=CONTENDERS, help="contender of a bare --model DIR")
    parser.add_argument("--data", help="prepared eval split (directory with manifest.json); needed unless --math")
    parser.add_argument("--out", required=True, type=Path, help="JSON output; a .md table is written beside it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-samples", type=int, default=None, help="first rows of --data and of each --math file")
    parser.add_argument("--chunk-size", type=int, default=None, help="MELT / chunked-baseline prefill chunk")
    parser.add_argument("--exit-threshold", type=float, default=0.9, help="q of the Q-exit histogram")
    parser.add_argument(
        "--scoring-chunking",
        choices=SCORING_CHUNKINGS,
        default=None,
        help="MELT's teacher-forced scoring: decode (prefill + one chunk per token, as generation "
        "runs; the default where rows have prompts) or forward (the model's own chunking)",
    )
    parser.add_argument(
        "--no-perplexity",
        action="store_true",
        help="skip the teacher-forced metrics (perplexity, exit distribution): accuracy and KV bytes only",
    )
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU, float32 on the CPU",
    )
    add_math_arguments(parser)
    args = parser.parse_args(argv)
    if not args.data and not args.math:
        parser.error("give --data (an eval split), --math (problem files), or both")

    models = parse_models(args.model, args.contender)
    math = math_run(args)  # files read before any model loads: a bad row fails at once
    split = load_eval_split(args.data, args.max_samples) if args.data else None
    device, dtype = resolve_device(args.device, args.dtype)
    results: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    for name, kind, path in models:
        contender = load_contender(kind, path, args.chunk_size, device, dtype)
        results[name] = {"model_path": str(path), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        if split is not None:
            results[name].update(
                evaluate(
                    contender,
                    split,
                    args.batch_size,
                    args.exit_threshold,
                    scoring_chunking=args.scoring_chunking,
                    perplexity=not args.no_perplexity,
                )
            )
        if math is not None:
            results[name]["math"], rows = math.evaluate(contender, path)
            records += [{"contender": name, **row} for row in rows]
        scalars = [f"{k}={v:.4g}" for k, v in results[name].items() if isinstance(v, float)]
        if scalars:
            print(f"{name}: " + ", ".join(scalars), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"data": args.data, **({"math": math.files} if math else {}), "results": results}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    tables = ([markdown_table(results)] if split is not None else []) + ([math_table(results)] if math else [])
    args.out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    if records:  # each problem's greedy completion, extracted answers and verdicts
        args.out.with_suffix(".math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
