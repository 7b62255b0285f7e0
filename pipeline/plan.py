"""Memory plan of a training phase per GPU, before a GPU is booked.

    python -m pipeline.plan --config configs/ouro/1.4b.yaml --phase transition \
        --nodes 1 --gpus-per-node 8 --gpu-memory 80GB [--seq-len 4096] [--json plan.json] [key=value ...]

Runs one training micro-step of the run config (the phase's model, micro-batch, sequence length,
chunk size, loss, alpha at its worst point, activation checkpointing, the teacher in distill)
with fake tensors on CPU, at 1 and 2 decoder layers, extrapolated linearly to the model's depth,
and adds the engine's sharded state (ZeRO-3 or FSDP2) for nodes x gpus-per-node ranks
(pipeline/planning/). Exit codes: 0 planned (fits or not), 2 refused (configuration),
3 does not fit with --require-fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (or an experiment of phases with --phase)")
    parser.add_argument("--phase", default=None, help="which section of a multi-phase config (as pipeline/train.py)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory", required=True, help="memory of one GPU: 80GB, 80GiB, or bytes")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: the dataset manifest at data.path)"
    )
    parser.add_argument(
        "--model-config", default=None, help="LoopLM config YAML for a checkpoint whose config.json is not on disk"
    )
    parser.add_argument("--layers", default="1,2", help="the two depths measured and extrapolated from")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the plan as JSON")
    parser.add_argument("--require-fit", action="store_true", help="exit 3 when the phase does not fit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted run-config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from pipeline.planning.planner import plan_run
    from pipeline.planning.report import format_plan, parse_memory, plan_json
    from pipeline.training.config import ConfigError, load_run_config

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[plan] {line}", file=sys.stderr, flush=True)

    try:
        gpu_memory = parse_memory(args.gpu_memory)
        layers = tuple(int(x) for x in args.layers.split(","))
        if len(layers) != 2 or not 1 <= layers[0] < layers[1]:
            raise ValueError(f"--layers {args.layers!r}: two increasing depths, e.g. 1,2")
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError("--nodes and --gpus-per-node must be at least 1")
        cfg = load_run_config(args.config, args.overrides, args.phase)
        progress(f"phase {cfg.phase.name}: measuring one micro-step with fake tensors")
        plan = plan_run(
            cfg,
            args.nodes,
            args.gpus_per_node,
            gpu_memory,
            seq_len=args.seq_len,
            model_config=args.model_config,
            layers=layers,
            progress=progress,
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(format_plan(plan, args.config), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"config": args.config, **plan_json(plan)}, indent=1))
    return 3 if args.require_fit and not plan.fits else 0


if __name__ == "__main__":
    sys.exit(main())
