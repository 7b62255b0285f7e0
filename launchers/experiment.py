"""The experiment file: which stages run, in which order, fed by what, on which resources.

A stage is one job of an experiment: a data preparation, a training (which runs one of the
trainer's phases, pretrain / transition / distill, given by its run config or ``--phase``), an
evaluation. An experiment is one YAML file read by both launchers::

    python launchers/slurm.py --config configs/experiments/X.yaml [key=value ...] [--dry-run]
    python launchers/local.py --config configs/experiments/X.yaml [key=value ...]

It is typed and validated with pydantic when it is loaded: an unknown key, a bad value,
an input that no earlier stage produces, or a production time limit too short for a
checkpoint is an error that names the key (``ExperimentError``), before anything is
submitted. ``configs/experiments/smoke.yaml`` is a complete small example.

Format (every key, with its default)::

    name: ouro-1.4b-melt            # required; SLURM job names are "<name>.<stage>"
    run_dir: runs/ouro-1.4b-melt    # default runs/<name>; the command line's run_dir=DIR wins
    description: ""
    allow_short_signal_delay: false # tests / CPU only: accept signal_delay_s < 120
    seeds: 1                        # a count or a list: stages with `per_seed: true` run once per
                                    #   seed, as <stage>_seed<s> (launchers/seeds.py)

    resources:                      # defaults for every stage; a stage's `resources` overrides any key
      partition: null               # sbatch --partition (checked against `sinfo -h -o %P` first)
      account: null                 # --account
      qos: null                     # --qos
      constraint: null              # --constraint, e.g. h100
      nodes: 1                      # --nodes
      gpus_per_node: 0              # --gpus-per-node; train stages run one task per GPU
      tasks_per_node: null          # --ntasks-per-node; default gpus_per_node, or 1 when CPU-only;
                                    #   set it for CPU test runs (e.g. 2 CPU ranks on one node)
      cpus_per_task: null           # --cpus-per-task
      mem_gb: null                  # --mem, per node (0: all of the node's memory)
      gpu_memory_gb: null           # memory of one GPU (default 80): train stages on GPUs are
                                    #   planned against it before submission (launchers/memory.py)
      time: 60                      # --time: minutes, or "HH:MM:SS" / "D-HH:MM:SS"
      signal_delay_s: 120           # USR2 this long before the time limit -> the job requeues and
                                    #   resumes (>= 120 unless allow_short_signal_delay)
      max_requeues: 3               # requeues after time-outs (submitit's max_num_timeout);
                                    #   preemptions do not count
      max_failure_requeues: 3       # requeues after a lost node or rank (the step failed and no
                                    #   rank reported an error of its own; launchers/requeue.py)
      python: null                  # python in the job (default: the one running the launcher)
      setup: []                     # shell lines before srun, e.g. "module load cuda/12.4",
                                    #   "source ~/miniforge3/bin/activate melt"
      env: {}                       # exported in the job (and by launchers/local.py),
                                    #   e.g. {NCCL_DEBUG: WARN, OMP_NUM_THREADS: 8}
      sbatch: {}                    # any other sbatch option, without dashes,
                                    #   e.g. {exclusive: true, mail-type: END, reservation: melt}
      srun_args: []                 # extra arguments of the srun line, e.g. ["--cpu-bind=none"]

    local:                          # launchers/local.py only
      launcher: deepspeed           # train stages: deepspeed or torchrun (a stage whose run
                                    #   config says engine.name: fsdp always uses torchrun)
      nproc_per_node: null          # default: the stage's tasks per node
      max_tasks: 1                  # processes at once; above 1, independent stages run side
                                    #   by side (in file order, as their inputs are done)
      reference_timing: null        # {machine, probe_s, stages: {name: seconds}}: measured wall
                                    #   times; the launcher prints the expected time and an ETA
      progress_every_s: 30          # a progress line (stages running, % of steps, ETA) this often

    stages:                         # run in this order; the keys are the stage names
      data:
        kind: data_prep             # data_prep | train | evaluate
        args: [synthetic, --task, s3, --train-samples, 200000]   # after `python -m data_prep`
        resources: {cpus_per_task: 32, time: 120}
      pretrain:                     # (from-scratch LoopLMs only; Ouro starts from transition)
        kind: train
        config: configs/phases/pretrain.yaml      # the trainer's run config
        overrides: {schedule.total_steps: 20000, optimizer.lr: 1.0e-3}   # dotted.key: value
        inputs: {data.path: data/train}           # trainer key: <stage>[/path in its output]
        resources: {nodes: 4, gpus_per_node: 8, time: "2-00:00:00"}
      transition:
        kind: train
        config: configs/phases/transition.yaml
        inputs: {data.path: data/train, model.init_from: pretrain/export}
      evaluate:
        kind: evaluate
        args: [--model, "melt={transition/export}", --data, "{data/eval}"]
        resources: {gpus_per_node: 1}

Stage keys:

- ``kind``: ``train`` runs ``pipeline.train.main(argv)`` in every task (one per GPU, or
  ``tasks_per_node`` on CPU), exactly what ``deepspeed pipeline/train.py argv`` runs, with
  ``argv = --config <config> <args> <k=v for overrides> <k=path for inputs> run_dir=<output>``.
  ``data_prep`` (``python -m data_prep <args> --out <output>``) and ``evaluate``
  (``python -m pipeline.evaluate <args> --out <output>/results.json``) run one task on one
  node whatever the GPUs (they do not inherit ``nodes``/``gpus_per_node``/``tasks_per_node``
  from the defaults; give them ``cpus_per_task`` / ``gpus_per_node``), and take their
  overrides and inputs as flags (``--key value``).
- ``config``: the trainer's run config (required for train); ``args``: extra command-line
  arguments; ``overrides``: ``dotted.key: value`` (nested mappings are flattened; values
  are written as YAML, which the trainer parses back).
- ``inputs``: ``key: <stage>[/path]``, the output of an earlier stage of this
  experiment; ``{<stage>[/path]}`` in an ``args`` item is replaced the same way (also
  ``{output}``, ``{run_dir}``; ``{{`` / ``}}`` are literal braces). Anything else a stage reads
  (a hub model name, an existing dataset) is an ordinary override or argument.
- ``after``: more earlier stages to wait for (``afterok``), beyond those feeding the inputs.
- ``per_seed``: ``true`` runs the stage once per seed of ``seeds`` (``<stage>_seed<s>``, with the
  trainer's ``seed`` set to s; ``{seed}`` in its args); see ``launchers/seeds.py``.
- ``resources``: partial, merged onto the experiment's ``resources`` (``env`` and ``sbatch``
  are merged key by key).
- Rarely needed: ``entry`` (another module ``pkg.mod``, or a script ``path/to/x.py``: called
  as ``main(argv)`` when it defines ``main``, else run as ``__main__``), ``arg_style``
  (``dotted`` or ``flags``), ``output`` (directory under run_dir; default ``data`` for
  data_prep, else the stage name), ``output_arg`` (``run_dir=`` for train, ``--out`` otherwise;
  empty: not passed), ``output_file`` (``results.json`` for evaluate), ``done`` (files, relative
  to the output, that mark it complete: train ``export/config.json``, evaluate
  ``results.json``; data_prep: ``manifest.json`` beside every MDS ``index.json``).

Run layout: ``<run_dir>/<stage>/`` (train: ``tensorboard/``, ``checkpoints/``, ``export/``),
data prep in ``<run_dir>/data/``; SLURM logs and submitit files in ``<run_dir>/slurm/<stage>/``,
the job ids in ``<run_dir>/slurm/jobs.json`` (every launch: ``launches.jsonl``), local logs in ``<run_dir>/local/``, the resolved
experiment (absolute paths) in ``<run_dir>/experiment.yaml``. Relative paths in the file and
on the command line are relative to the working directory of the launcher.

``--resume-from RUN_DIR`` skips the stages whose ``done`` files exist; ``--stages a,b``
launches a subset and requires the outputs it reads from the other stages to be complete.

Command-line overrides ``key=value`` (value parsed as YAML) address this file:
``run_dir=/scratch/x``, ``resources.partition=gpu``, ``stages.pretrain.resources.nodes=2``,
``stages.pretrain.overrides.schedule.total_steps=100`` (nested keys below ``overrides`` and
``inputs`` are the same as the dotted keys they spell).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

import config_loader
from launchers.seeds import SeedError, base_name, expand_seeds

MIN_SIGNAL_DELAY_S = 120
DEFAULT_ENTRY = {"train": "pipeline.train", "evaluate": "pipeline.evaluate", "data_prep": "data_prep"}
DEFAULT_ARG_STYLE = {"train": "dotted", "evaluate": "flags", "data_prep": "flags"}
DEFAULT_OUTPUT_ARG = {"train": "run_dir=", "evaluate": "--out", "data_prep": "--out"}
DEFAULT_OUTPUT_FILE = {"train": None, "evaluate": "results.json", "data_prep": None}
SINGLE_TASK_KINDS = ("data_prep", "evaluate")  # one task on one node, whatever the GPUs
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SPECIAL_PLACEHOLDERS = ("run_dir", "output")


class ExperimentError(ValueError):
    """A problem with the experiment file or its overrides, phrased for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = Union[str, int, float, bool]


def parse_time_minutes(value: Union[int, str]) -> int:
    """SLURM time limit -> minutes: 90, "90", "01:30:00", "2-00:00:00", "1-12" (days-hours)."""
    if isinstance(value, bool):
        raise ValueError(f"time must be minutes or [D-]HH:MM:SS, got {value!r}")
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise ValueError(f"time must be minutes or [D-]HH:MM:SS, got {value!r}")
        days, a, b, c = match.groups()
        days = int(days or 0)
        if days and b is None:  # "D-HH"
            hours, mins, secs = int(a), 0, 0
        elif c is not None:  # "HH:MM:SS"
            hours, mins, secs = int(a), int(b), int(c)
        elif b is not None:  # "MM:SS" (SLURM's reading of two fields without days)
            hours, mins, secs = (int(a), int(b), 0) if days else (0, int(a), int(b))
        else:  # "MM"
            hours, mins, secs = 0, int(a), 0
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes <= 0:
        raise ValueError(f"time must be positive, got {value!r}")
    return minutes


class Resources(_Strict):
    """Cluster resources of one stage (see the module docstring)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: Optional[int] = Field(None, ge=1)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, ge=0)
    gpu_memory_gb: Optional[float] = Field(None, gt=0)  # one GPU's memory, for the memory plan (default 80)
    time: int = 60  # minutes (strings are converted)
    signal_delay_s: int = Field(MIN_SIGNAL_DELAY_S, ge=0)
    max_requeues: int = Field(3, ge=0)
    max_failure_requeues: int = Field(3, ge=0)
    python: Optional[str] = None
    setup: list[str] = []
    env: dict[str, Scalar] = {}
    sbatch: dict[str, Scalar] = {}
    srun_args: list[str] = []

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value):
        return parse_time_minutes(value)

    @field_validator("sbatch")
    @classmethod
    def _sbatch_keys(cls, value):
        out = {}
        for key, val in value.items():
            key = key.lstrip("-")
            if key in _MANAGED_SBATCH:
                raise ValueError(f"sbatch option {key!r} is set by the launcher; use resources.{_MANAGED_SBATCH[key]}")
            out[key] = val
        return out

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.ntasks_per_node


_MANAGED_SBATCH = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "nodes": "nodes",
    "gpus-per-node": "gpus_per_node",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem_gb",
    "time": "time",
    "signal": "signal_delay_s",
    "dependency": "stages.<name>.after / inputs",
    "output": "(the run layout)",
    "error": "(the run layout)",
    "job-name": "name",
}
_NOT_INHERITED_BY_SINGLE_TASK = ("nodes", "gpus_per_node", "tasks_per_node")


class ReferenceTiming(_Strict):
    """Each stage's wall seconds on a reference machine and launchers.progress.speed_probe()'s time
    there: the local launcher scales them to this machine for the expected time and the ETA."""

    machine: str = ""  # where they were measured (printed, for the reader)
    probe_s: float = Field(gt=0)
    stages: dict[str, float]  # stage name -> wall seconds


class LocalSettings(_Strict):
    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    nproc_per_node: Optional[int] = Field(None, ge=1)
    max_tasks: int = Field(1, ge=1)  # processes at once: independent stages side by side when > 1
    reference_timing: Optional[ReferenceTiming] = None
    progress_every_s: float = Field(30.0, gt=0)  # a progress (and ETA) line this often


def placeholders(text: str) -> list[str]:
    """The ``{...}`` references of an argument (``{{`` / ``}}`` are literal braces)."""
    return _PLACEHOLDER.findall(text.replace("{{", "").replace("}}", ""))


def ref_stage(ref: str) -> str:
    return ref.strip().strip("/").split("/", 1)[0]


class Stage(_Strict):
    kind: Literal["data_prep", "train", "evaluate"]
    config: Optional[str] = None
    args: list[Scalar] = []
    overrides: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    after: list[str] = []
    resources: dict[str, Any] = {}  # partial Resources, merged onto the experiment's defaults
    entry: Optional[str] = None
    arg_style: Optional[Literal["dotted", "flags"]] = None
    output: Optional[str] = None
    output_arg: Optional[str] = None
    output_file: Optional[str] = None
    done: Optional[list[str]] = None
    seed: Optional[int] = None  # set on the copies of a per_seed stage (launchers/seeds.py)

    @field_validator("inputs", mode="before")
    @classmethod
    def _flat_inputs(cls, value):
        return flatten_overrides(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "train" and self.config is None and self.entry is None:
            raise ValueError("a train stage needs `config` (the trainer's run config file)")
        return self

    # resolved views -----------------------------------------------------------------
    @property
    def entry_point(self) -> str:
        return self.entry or DEFAULT_ENTRY[self.kind]

    @property
    def style(self) -> str:
        return self.arg_style or DEFAULT_ARG_STYLE[self.kind]

    @property
    def output_flag(self) -> str:
        return self.output_arg if self.output_arg is not None else DEFAULT_OUTPUT_ARG[self.kind]

    @property
    def output_filename(self) -> Optional[str]:
        return self.output_file if self.output_file is not None else DEFAULT_OUTPUT_FILE[self.kind]

    @property
    def done_files(self) -> Optional[list[str]]:
        """Files marking the output complete; None: data_prep's automatic check (manifest.json at the
        top of the output, or in every subdirectory that holds an MDS index.json)."""
        if self.done is not None:
            return list(self.done)
        if self.kind == "train":
            return ["export/config.json"]
        if self.output_filename:
            return [self.output_filename]
        return None

    def references(self) -> list[tuple[str, str]]:
        """(where, reference) of every input and every ``{stage/path}`` placeholder in args."""
        refs = [(f"inputs.{key}", ref) for key, ref in self.inputs.items()]
        for i, arg in enumerate(self.args):
            if isinstance(arg, str):
                refs += [(f"args[{i}]", ref) for ref in placeholders(arg) if ref not in _SPECIAL_PLACEHOLDERS]
        return refs


class Experiment(_Strict):
    name: str
    run_dir: Optional[str] = None
    description: str = ""
    allow_short_signal_delay: bool = False
    seeds: list[int] = [0]  # per_seed stages run once per seed (launchers/seeds.py)
    resources: Resources = Resources()
    local: LocalSettings = LocalSettings()
    stages: dict[str, Stage]

    # filled by the validator below
    _resolved: dict[str, Resources] = PrivateAttr(default_factory=dict)
    _outputs: dict[str, str] = PrivateAttr(default_factory=dict)
    _short_delay: list[str] = PrivateAttr(default_factory=list)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value):
            raise ValueError(f"name {value!r}: use letters, digits and _ . + - only")
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value):
        if not value:
            raise ValueError("no stage defined")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"stage name {name!r}: use letters, digits and _ . - only")
        return value

    @model_validator(mode="after")
    def _cross_checks(self):
        order = list(self.stages)
        outputs: dict[str, str] = {}
        resolved: dict[str, Resources] = {}
        for index, (name, stage) in enumerate(self.stages.items()):
            where = f"stages.{name}"
            earlier = order[:index]
            for at, ref in stage.references():
                source = ref_stage(ref)
                if source not in self.stages:
                    raise ValueError(
                        f"{where}.{at}: {ref!r} names no stage of this experiment "
                        f"(stages: {', '.join(order)}); an input must be produced by an earlier "
                        "stage (put existing paths or hub names in `overrides` or `args`)"
                    )
                if source not in earlier:
                    raise ValueError(
                        f"{where}.{at}: {ref!r} comes from stage {source!r}, which does not "
                        f"run before {name!r} (order: {', '.join(order)})"
                    )
            for dep in stage.after:
                if dep not in earlier:
                    raise ValueError(f"{where}.after: {dep!r} is not an earlier stage (order: {', '.join(order)})")
            out = stage.output if stage.output is not None else ("data" if stage.kind == "data_prep" else name)
            out = out.strip("/")
            if not out or out.startswith("..") or out.split("/")[0] in ("slurm", "local"):
                raise ValueError(
                    f"{where}.output: {stage.output!r} must be a directory inside run_dir "
                    "(not slurm/ or local/, used for logs)"
                )
            if out in outputs.values():
                other = next(k for k, v in outputs.items() if v == out)
                raise ValueError(f"{where}: output directory {out!r} is also stage {other!r}'s; set `output`")
            outputs[name] = out
            resolved[name] = self._merge_resources(name, stage)
        self._resolved = resolved
        self._outputs = outputs
        timing = self.local.reference_timing
        known = set(self.stages) | {base_name(n) for n in self.stages}  # a per-seed stage's name: all its copies
        unknown = sorted(set(timing.stages) - known) if timing else []
        if unknown:
            raise ValueError(
                f"local.reference_timing.stages: {', '.join(map(repr, unknown))} name no stage "
                f"(stages: {', '.join(order)})"
            )
        if self._short_delay:
            self._notes.append(
                f"signal_delay_s < {MIN_SIGNAL_DELAY_S} s for stage(s) {', '.join(self._short_delay)} "
                "(allow_short_signal_delay is set: for tests on tiny models only)"
            )
            warnings.warn(self._notes[-1], stacklevel=2)
        return self

    def _merge_resources(self, name: str, stage: Stage) -> Resources:
        where = f"stages.{name}.resources"
        base = self.resources.model_dump(exclude_unset=False)
        top = dict(stage.resources)
        if stage.kind in SINGLE_TASK_KINDS:
            for key in _NOT_INHERITED_BY_SINGLE_TASK:
                base[key] = Resources.model_fields[key].default
        for key in ("env", "sbatch"):
            if key in top and isinstance(top[key], dict):
                top[key] = {**base[key], **top[key]}
        try:
            res = Resources.model_validate({**base, **top})
        except ValidationError as err:
            raise ValueError("\n  ".join(config_loader.format_validation_errors(err, prefix=where))) from None
        if stage.kind in SINGLE_TASK_KINDS:
            if res.nodes != 1 or (res.tasks_per_node or 1) != 1:
                raise ValueError(
                    f"{where}: a {stage.kind} stage runs one task on one node (got nodes={res.nodes}, "
                    f"tasks_per_node={res.tasks_per_node}); give it cpus_per_task / gpus_per_node"
                )
            res = res.model_copy(update={"tasks_per_node": 1})
        elif res.gpus_per_node and res.tasks_per_node is not None and res.tasks_per_node != res.gpus_per_node:
            raise ValueError(
                f"{where}: tasks_per_node={res.tasks_per_node} but gpus_per_node="
                f"{res.gpus_per_node}: the launcher runs one task per GPU (leave tasks_per_node unset)"
            )
        if res.signal_delay_s >= res.time * 60:
            raise ValueError(
                f"{where}: signal_delay_s={res.signal_delay_s} is not shorter than the time limit ({res.time} min)"
            )
        if res.signal_delay_s < MIN_SIGNAL_DELAY_S:
            if not self.allow_short_signal_delay:
                raise ValueError(
                    f"{where}.signal_delay_s={res.signal_delay_s}: below {MIN_SIGNAL_DELAY_S} s the "
                    "job may be killed before it requeues; set allow_short_signal_delay: true only for "
                    "tests on tiny models"
                )
            self._short_delay.append(name)
        return res

    # resolved views -----------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        """Warnings found while validating (the launchers print them)."""
        return list(self._notes)

    def resources_of(self, stage: str) -> Resources:
        return self._resolved[stage]

    def output_of(self, stage: str) -> str:
        return self._outputs[stage]

    def upstream_of(self, stage: str) -> list[str]:
        """Earlier stages this one waits for (its inputs' producers, then `after`), in stage order."""
        spec = self.stages[stage]
        names = {ref_stage(ref) for _, ref in spec.references()} | set(spec.after)
        return [p for p in self.stages if p in names]


# ----------------------------------------------------------------------------- loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` (value parsed as YAML) to the raw experiment mapping.

    The same syntax as the trainer's overrides; below ``overrides``/``inputs`` a nested key
    (``stages.a.overrides.schedule.total_steps=5``) is the same as the dotted key it spells.
    """
    for item in overrides:
        if item.startswith("-") or "=" not in item or item.startswith("="):
            raise ExperimentError(f"override {item!r} must look like dotted.key=value")
    return config_loader.apply_overrides(raw, list(overrides), error=ExperimentError)


def load_experiment(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Experiment:
    path = Path(path)
    raw = config_loader.read_yaml(path, what="experiment file", error=ExperimentError)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping")
    return experiment_from_dict(raw, overrides, source=str(path))


def experiment_from_dict(raw: dict, overrides: Optional[list[str]] = None, source: str = "<experiment>") -> Experiment:
    raw = apply_overrides(raw, list(overrides or []))
    if "phases" in raw:
        raise ExperimentError(
            f"{source}: the top-level key `phases` is now `stages`: rename it (in overrides too: stages.<name>.*)"
        )
    if "stages" in raw and not isinstance(raw["stages"], dict):
        raise ExperimentError(f"{source}: `stages` must be a mapping of stage name -> stage")
    try:
        raw = expand_seeds(raw)
    except SeedError as err:
        raise ExperimentError(f"invalid experiment {source}: {err}") from None
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        lines = config_loader.format_validation_errors(err)
        raise ExperimentError(f"invalid experiment {source}:\n  " + "\n  ".join(lines)) from None
    if exp.run_dir is None:
        exp.run_dir = f"runs/{exp.name}"
    return exp


def flatten_overrides(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2} (later keys win)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_overrides(value, full))
        else:
            out[full] = value
    return out


def render_value(value: Any) -> str:
    """A value as the trainer's YAML override parser reads it back."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()
