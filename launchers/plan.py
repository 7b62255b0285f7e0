"""From an experiment to the list of stages to launch: paths, command lines, dependencies.

Shared by `launchers/slurm.py` and `launchers/local.py`, so both run the same stages with
the same arguments. Everything is resolved here, before anything is submitted: output
directories, the inputs each stage reads (from stages of this launch, or already on disk),
the stages a ``--stages`` subset or ``--resume-from`` skips.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launchers.experiment import Experiment, ExperimentError, Resources, Stage, flatten_overrides, render_value
from launchers.seeds import select_with_seeds

REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """A problem found before launching (or while submitting), phrased for the user."""


@dataclass
class PlannedStage:
    name: str
    spec: Stage
    resources: Resources
    output_dir: Path
    entry: str  # module name, or absolute script path
    argv: list[str]
    inputs: dict[str, Path]  # where (inputs.<key> / args[i]) -> resolved path
    upstream: list[str] = field(default_factory=list)  # stages of this launch that must succeed first

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class Plan:
    experiment: Experiment
    run_dir: Path
    stages: list[PlannedStage]
    skipped: dict[str, str]  # stage -> why it is not launched
    notes: list[str] = field(default_factory=list)  # warnings (a dry run's missing files)

    def stage(self, name: str) -> PlannedStage:
        return next(p for p in self.stages if p.name == name)

    def graph_lines(self) -> list[str]:
        lines = []
        for p in self.stages:
            after = ", ".join(p.upstream) if p.upstream else "-"
            lines.append(
                f"{p.name}: afterok [{after}]  ({p.kind}, {p.resources.nodes} node(s) x "
                f"{p.resources.ntasks_per_node} task(s), {p.resources.gpus_per_node} GPU(s)/node)"
            )
        for name, why in self.skipped.items():
            lines.append(f"{name}: skipped ({why})")
        return lines


def _abs(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (base / p)


def resolve_entry(entry: str, base: Path) -> str:
    """A script path becomes absolute; a module name stays as it is."""
    if entry.endswith(".py") or "/" in entry:
        return str(_abs(entry, base).resolve())
    return entry


def entry_exists(entry: str) -> bool:
    if entry.endswith(".py") or "/" in entry:
        return Path(entry).is_file()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.util.find_spec(entry) is not None
    except (ImportError, ValueError):
        return False


def output_dir(exp: Experiment, run_dir: Path, stage: str) -> Path:
    return run_dir / exp.output_of(stage)


def input_path(exp: Experiment, run_dir: Path, ref: str) -> tuple[str, Path]:
    source, _, sub = ref.strip().strip("/").partition("/")
    out = output_dir(exp, run_dir, source)
    return source, (out / sub if sub else out)


def missing_done_files(exp: Experiment, run_dir: Path, stage: str) -> list[Path]:
    """What is missing for `stage`'s output to be complete (empty: complete)."""
    out = output_dir(exp, run_dir, stage)
    done = exp.stages[stage].done_files
    if done is not None:
        return [out / f for f in done if not (out / f).exists()]
    # data_prep default: manifest.json (written last) at the top, or beside every MDS index.json below
    if (out / "manifest.json").is_file():
        return []
    indexed = [p.parent for p in out.rglob("index.json")] if out.is_dir() else []
    missing = [d / "manifest.json" for d in indexed if not (d / "manifest.json").is_file()]
    return missing if indexed else [out / "manifest.json"]


def is_complete(exp: Experiment, run_dir: Path, stage: str) -> bool:
    return not missing_done_files(exp, run_dir, stage)


def stage_output_path(exp: Experiment, run_dir: Path, name: str) -> Path:
    """What the stage is told to write: its output directory, or a file in it (evaluate)."""
    out = output_dir(exp, run_dir, name)
    filename = exp.stages[name].output_filename
    return out / filename if filename else out


def substitute(text: str, exp: Experiment, run_dir: Path, name: str) -> str:
    """Replace ``{stage/path}``, ``{output}`` and ``{run_dir}`` in an argument."""
    from launchers.experiment import _PLACEHOLDER

    def one(match) -> str:
        ref = match.group(1).strip()
        if ref == "run_dir":
            return str(run_dir)
        if ref == "output":
            return str(output_dir(exp, run_dir, name))
        return str(input_path(exp, run_dir, ref)[1])

    text = text.replace("{{", "\0").replace("}}", "\1")
    return _PLACEHOLDER.sub(one, text).replace("\0", "{").replace("\1", "}")


def stage_inputs(exp: Experiment, run_dir: Path, name: str) -> list[tuple[str, str, Path]]:
    """(where, reference, resolved path) of every input of a stage (inputs and args placeholders)."""
    return [(at, ref, input_path(exp, run_dir, ref)[1]) for at, ref in exp.stages[name].references()]


def stage_argv(exp: Experiment, name: str, run_dir: Path, base: Path) -> list[str]:
    spec = exp.stages[name]
    argv: list[str] = []
    if spec.config is not None:
        argv += ["--config", str(_abs(spec.config, base).resolve())]
    argv += [substitute(render_value(a), exp, run_dir, name) for a in spec.args]
    pairs = list(flatten_overrides(spec.overrides).items())
    pairs += [(key, str(input_path(exp, run_dir, ref)[1])) for key, ref in spec.inputs.items()]
    if spec.style == "flags":  # a CLI with flags: --key value
        for key, value in pairs:
            argv += [key if key.startswith("-") else "--" + key.replace("_", "-"), render_value(value)]
    else:  # the trainer's dotted.key=value overrides
        argv += [f"{key}={render_value(value)}" for key, value in pairs]
    flag, out = spec.output_flag, stage_output_path(exp, run_dir, name)
    if flag:
        argv += [f"{flag}{out}"] if flag.endswith("=") else [flag, str(out)]
    return argv


def parse_stage_list(text: Optional[str], exp: Experiment) -> Optional[list[str]]:
    if text is None:
        return None
    names = select_with_seeds([n.strip() for n in text.split(",") if n.strip()], exp.stages)
    unknown = [n for n in names if n not in exp.stages]
    if unknown or not names:
        raise LaunchError(f"--stages {text!r}: unknown stage(s) {unknown}; this experiment has {', '.join(exp.stages)}")
    return names


def build_plan(
    exp: Experiment,
    run_dir: Optional[Path] = None,
    select: Optional[list[str]] = None,
    resume: bool = False,
    base: Optional[Path] = None,
    strict: bool = True,
) -> Plan:
    """The stages to launch, in experiment order, with their inputs resolved and checked.

    `select`: launch only these stages (the outputs of the others they read must be complete on
    disk). `resume`: also skip selected stages whose outputs are complete. Relative paths are
    relative to `base` (default: the working directory). `strict=False` (dry runs) reports a
    missing run config or entry point as a note instead of an error.
    """
    base = Path(base or os.getcwd())
    run_dir = _abs(str(run_dir or exp.run_dir), base).resolve()
    wanted = list(exp.stages) if select is None else [p for p in exp.stages if p in select]
    skipped: dict[str, str] = {}
    if select is not None:
        for name in exp.stages:
            if name not in wanted:
                skipped[name] = "not selected by --stages"
    launch = []
    for name in wanted:
        if resume and is_complete(exp, run_dir, name):
            skipped[name] = "complete (--resume-from)"
        else:
            launch.append(name)

    problems: list[str] = []
    missing_files: list[str] = []
    planned = []
    for name in launch:
        spec = exp.stages[name]
        inputs: dict[str, Path] = {}
        for at, ref, path in stage_inputs(exp, run_dir, name):
            inputs[at] = path
            source = ref.strip().strip("/").split("/", 1)[0]
            if source in launch:
                continue
            missing = missing_done_files(exp, run_dir, source)
            if missing or not path.exists():
                what = f"missing {', '.join(str(m) for m in missing)}" if missing else f"{path} does not exist"
                problems.append(
                    f"stage {name!r}, {at} = {ref}: stage {source!r} is not launched "
                    f"({skipped.get(source, 'not selected')}) and its output is not complete on disk ({what}); "
                    f"launch it too (--stages {source},{name}) or run it first"
                )
        if spec.config is not None and not _abs(spec.config, base).is_file():
            missing_files.append(f"stage {name!r}: run config {spec.config} not found (relative to {base})")
        entry = resolve_entry(spec.entry_point, base)
        if not entry_exists(entry):
            missing_files.append(f"stage {name!r} ({spec.kind}): entry point {entry!r} not found")
        planned.append(
            PlannedStage(
                name=name,
                spec=spec,
                resources=exp.resources_of(name),
                output_dir=output_dir(exp, run_dir, name),
                entry=resolve_entry(spec.entry_point, base),
                argv=stage_argv(exp, name, run_dir, base),
                inputs=inputs,
                upstream=[u for u in exp.upstream_of(name) if u in launch],
            )
        )
    if strict:
        problems += missing_files
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))
    return Plan(
        experiment=exp,
        run_dir=run_dir,
        stages=planned,
        skipped=skipped,
        notes=exp.notes + ([] if strict else missing_files),
    )


def resolved_experiment(exp: Experiment, run_dir: Path, base: Optional[Path] = None) -> dict[str, Any]:
    """The experiment as a mapping with absolute paths (what `--resume-from` reloads)."""
    base = Path(base or os.getcwd())
    data = exp.model_dump(mode="json", exclude_defaults=False)
    data["run_dir"] = str(run_dir)
    for name, stage in data["stages"].items():
        if stage.get("seed") is None:  # per-seed copies keep theirs (reloaded as they are)
            stage.pop("seed", None)
        if stage.get("config"):
            stage["config"] = str(_abs(stage["config"], base).resolve())
        if stage.get("entry"):
            stage["entry"] = resolve_entry(stage["entry"], base)
    return data


def save_experiment(exp: Experiment, run_dir: Path, base: Optional[Path] = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "experiment.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved_experiment(exp, run_dir, base), sort_keys=False))
    tmp.replace(path)
    return path


def experiment_for_launch(config: Optional[str], overrides: list[str], resume_from: Optional[str]):
    """Load the experiment named by --config (or the one saved in --resume-from) and the run dir."""
    from launchers.experiment import load_experiment

    if resume_from is not None:
        resume_dir = Path(resume_from).expanduser().resolve()
        if not resume_dir.is_dir():
            raise LaunchError(f"--resume-from {resume_from}: no such directory")
        if config is None:
            config = str(resume_dir / "experiment.yaml")
            if not Path(config).is_file():
                raise LaunchError(f"--resume-from {resume_from}: no experiment.yaml in it; pass --config too")
        exp = load_experiment(config, overrides)
        given = [o for o in overrides if o.startswith("run_dir=")]
        if given and Path(given[-1].partition("=")[2]).expanduser().resolve() != resume_dir:
            raise LaunchError(f"--resume-from {resume_from} and {given[-1]} disagree")
        exp.run_dir = str(resume_dir)
        return exp
    if config is None:
        raise LaunchError("--config is required (unless --resume-from names a run directory)")
    return load_experiment(config, overrides)


def add_launch_arguments(parser, verb: str = "launch") -> None:
    """The command line both launchers share."""
    parser.add_argument("--config", help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--stages", help=f"comma-separated subset of the stages to {verb}")
    parser.add_argument("--resume-from", metavar="RUN_DIR", help="continue this run: skip complete stages")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="experiment overrides, e.g. run_dir=DIR resources.partition=gpu",
    )


def plan_from_args(args, strict: bool) -> Plan:
    """Experiment + overrides + --stages/--resume-from -> the plan; its warnings go to stderr."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exp.notes are printed below
        exp = experiment_for_launch(args.config, args.overrides, args.resume_from)
    plan = build_plan(
        exp, select=parse_stage_list(args.stages, exp), resume=args.resume_from is not None, strict=strict
    )
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    return plan


__all__ = [
    "ExperimentError",
    "LaunchError",
    "Plan",
    "PlannedStage",
    "build_plan",
    "experiment_for_launch",
    "is_complete",
    "save_experiment",
    "REPO_ROOT",
]
