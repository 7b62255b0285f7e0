"""`make demo`: the whole pipeline on the embedded default, then one report.

    python -m drivers.demo [--run-dir runs/demo] [--seeds N] [--config configs/experiments/demo.yaml] [key=value ...]

Runs the demo experiment's stages with the local launcher (data -> MELT transition and
distillation of the shipped LoopLM on 2 ranks under DeepSpeed ZeRO-3, once per seed ->
evaluation), skipping stages already complete in the run directory (rerun to continue; a rerun
with more seeds adds the new seeds' stages), then writes <run_dir>/report.md, report.json and
plots, and prints the table.
TensorBoard: `tensorboard --logdir runs/demo`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from launchers.experiment import ExperimentError, load_experiment
from launchers.local import run
from launchers.plan import REPO_ROOT, LaunchError, build_plan
from pipeline.evaluation import demo_report


def run_then_report(
    argv, prog: str, doc: str, default_config: Path, write_report: Callable[[Path, object], dict]
) -> int:
    """Run an experiment's missing stages locally, then write and print its report."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(default_config), help="the experiment")
    parser.add_argument("--run-dir", default=None, help="default: the experiment's run_dir")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="post-train MELT with seeds 0..N-1 (default: the experiment's)",
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from a finished run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="experiment overrides")
    args = parser.parse_args(argv)

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"seeds={args.seeds}"] if args.seeds is not None else []
    start = time.time()
    try:
        experiment = load_experiment(args.config, overrides)
        plan = build_plan(experiment, resume=True, base=REPO_ROOT)
    except (ExperimentError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tag = prog.rsplit(".", 1)[-1]
    if not args.report_only:
        print(
            f"[{tag}] run directory {plan.run_dir}; stages to run: "
            f"{', '.join(p.name for p in plan.stages) or 'none (all complete)'}",
            flush=True,
        )
        try:
            if run(plan) != 0:
                return 1
        except KeyboardInterrupt:
            print(f"[{tag}] interrupted: the running stages were stopped; rerun to resume", file=sys.stderr)
            return 130
    report = write_report(plan.run_dir, experiment)
    print(report["markdown"])
    print(
        f"[{tag}] report: {plan.run_dir / 'report.md'} ({time.time() - start:.0f}s); "
        f"TensorBoard: tensorboard --logdir {plan.run_dir}"
    )
    return 0


def main(argv=None) -> int:
    return run_then_report(
        argv,
        "python -m drivers.demo",
        __doc__,
        REPO_ROOT / "configs" / "experiments" / "demo.yaml",
        demo_report.write_report,
    )


if __name__ == "__main__":
    sys.exit(main())
