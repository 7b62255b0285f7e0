"""`make reproduce`: the demo at a larger scale, for loop counts T = 2, 4, 8 and several seeds, then one report.

    python -m drivers.reproduce [--run-dir runs/reproduce] [--seeds N] [key=value ...]

Runs configs/experiments/reproduce.yaml with the local launcher (independent stages side by side
on 2 processes), skipping stages already complete (rerun to continue), then writes
<run_dir>/report.md and report.json (MELT on every seed vs zero-shot last-loop KV sharing vs the
LoopLM per T, the standard transformer, MELT against the distillation steps) with plots.
`--config configs/experiments/reproduce-from-scratch.yaml` pretrains the starting points too
(`make reproduce-from-scratch`). docs/reproduce.md gives the time it takes.
"""

from __future__ import annotations

import sys

from drivers.demo import run_then_report
from launchers.plan import REPO_ROOT
from pipeline.evaluation import reproduce_report


def main(argv=None) -> int:
    return run_then_report(
        argv,
        "python -m drivers.reproduce",
        __doc__,
        REPO_ROOT / "configs" / "experiments" / "reproduce.yaml",
        reproduce_report.write_report,
    )


if __name__ == "__main__":
    sys.exit(main())
