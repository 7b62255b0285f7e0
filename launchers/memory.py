"""Memory plans of an experiment's training stages before anything is submitted (pipeline/planning).

For each launched stage of kind ``train`` on GPUs (``resources.gpus_per_node`` > 0), the stage's
run config with its arguments, overrides and inputs is planned with ``pipeline.planning.plan_run``
for ``nodes x gpus_per_node`` GPUs of ``resources.gpu_memory_gb`` (default 80) GB each:

- the sequence length comes from the ``--seq-len`` argument of the data_prep stage that produces
  the train stage's ``data.path`` (else from the dataset's manifest when it exists already);
- a checkpoint that an earlier train stage of the experiment will export (``<stage>/export``) has
  that stage's architecture (pretrain: its model.config; transition/distill: its model's, as MELT).

CPU stages (gpus_per_node 0) are not planned. A stage that cannot be planned (no sequence
length, an unknown architecture) is reported with the reason and does not stop a launch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TextIO

from launchers.plan import Plan, PlannedStage, output_dir, stage_argv

if TYPE_CHECKING:
    from pipeline.planning.inputs import Architecture

DEFAULT_GPU_MEMORY_GB = 80.0


@dataclass
class StageMemory:
    name: str
    plan: Any = None  # pipeline.planning.planner.MemoryPlan when planned
    skipped: Optional[str] = None  # why it was not planned

    @property
    def fits(self) -> Optional[bool]:
        return None if self.plan is None else self.plan.fits


def data_prep_seq_len(plan: Plan, stage: PlannedStage) -> tuple[Optional[int], str]:
    """(--seq-len N of the data_prep stage whose output feeds this stage's data.path, where from)."""
    ref = stage.spec.inputs.get("data.path")
    if ref is None:
        return None, ""
    name = ref.strip().strip("/").split("/", 1)[0]
    source = plan.experiment.stages.get(name)
    if source is None or source.kind != "data_prep":
        return None, ""
    args = [str(a) for a in source.args]
    where = f"stage {name}'s --seq-len argument"
    for i, arg in enumerate(args):
        if arg == "--seq-len" and i + 1 < len(args):
            return int(args[i + 1]), where
        if arg.startswith("--seq-len="):
            return int(arg.split("=", 1)[1]), where
    return None, ""


def run_config_of(argv: list[str]):
    from pipeline.train import parse_args
    from pipeline.training.config import load_run_config

    args = parse_args(argv)
    return load_run_config(args.config, args.overrides, args.phase)


def export_architectures(plan: Plan, base: Path) -> dict:
    """The architecture of every train stage's export (by path), in experiment order."""
    from pipeline.planning.inputs import resolve_architectures

    exp = plan.experiment
    known: dict[str, Architecture] = {}
    for name, spec in exp.stages.items():
        if spec.kind != "train" or spec.config is None:
            continue
        try:
            cfg = run_config_of(stage_argv(exp, name, plan.run_dir, base))
            model, _ = resolve_architectures(cfg, known=known)
        except Exception:  # noqa: BLE001 - unknown here: a later stage reading it reports why
            continue
        if cfg.phase.name != "pretrain":  # the export is a MELT model with its training phase's gate
            gate = getattr(cfg.phase, "gate", None) or model.config.get("gate", "elementwise")
            model = type(model)(
                {**model.config, "model_type": "melt", "gate": gate}, f"stage {name}'s export ({model.source})"
            )
        else:
            model = type(model)(model.config, f"stage {name}'s export (its model.config)")
        export = output_dir(exp, plan.run_dir, name) / "export"
        known[str(export)] = model
        known[str(export.resolve())] = model
    return known


def plan_memory(
    plan: Plan,
    gpu_memory: Optional[int] = None,
    base: Optional[Path] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[StageMemory]:
    """Plan every launched GPU train stage (gpu_memory: bytes of one GPU for every stage, else each
    stage's resources.gpu_memory_gb)."""
    trains = [p for p in plan.stages if p.kind == "train" and p.resources.gpus_per_node > 0]
    if not trains:
        return []
    from pipeline.planning.planner import plan_run

    base = Path(base or Path.cwd())
    known = export_architectures(plan, base)
    results = []
    for p in trains:
        res = p.resources
        try:
            memory = gpu_memory or int((res.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB) * 10**9)
            if progress:
                progress(
                    f"planning the memory of stage {p.name} ({res.nodes} x {res.gpus_per_node} GPUs, "
                    f"{memory / 1e9:g} GB each)"
                )
            cfg = run_config_of(p.argv)
            seq_len, seq_len_source = data_prep_seq_len(plan, p)
            result = plan_run(
                cfg,
                res.nodes,
                res.gpus_per_node,
                memory,
                seq_len=seq_len,
                known=known,
                progress=progress,
                seq_len_source=seq_len_source or "--seq-len",
            )
            results.append(StageMemory(p.name, plan=result))
        except Exception as err:  # noqa: BLE001 - reported, the launch decides
            why = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"  # ConfigError too
            results.append(StageMemory(p.name, skipped=why))
    return results


def print_memory(results: list[StageMemory], out: TextIO, prefix: str = "# ") -> None:
    from pipeline.planning.report import format_plan

    for r in results:
        print(f"{prefix}===== stage {r.name}: memory plan =====", file=out)
        if r.plan is None:
            print(f"{prefix}not planned: {r.skipped}", file=out)
            continue
        for line in format_plan(r.plan).splitlines():
            print(f"{prefix}{line}", file=out)


def not_fitting(results: list[StageMemory]) -> list[StageMemory]:
    return [r for r in results if r.fits is False]


def summary_line(r: StageMemory) -> str:
    from pipeline.planning.report import human

    p = r.plan
    return (
        f"stage {r.name} does not fit: {human(p.peak)} per GPU planned, {p.gpu_memory / 1e9:g} GB "
        f"available ({p.world_size} GPUs)"
    )


def progress_to_stderr(line: str) -> None:
    print(f"[plan] {line}", file=sys.stderr, flush=True)


__all__ = [
    "DEFAULT_GPU_MEMORY_GB",
    "StageMemory",
    "plan_memory",
    "print_memory",
    "not_fitting",
    "summary_line",
    "progress_to_stderr",
]
