"""Submit an experiment's stages to SLURM through submitit: one job per stage, chained with afterok.

    python launchers/slurm.py --config configs/experiments/X.yaml [key=value ...]
        [--dry-run] [--stages a,b] [--resume-from RUN_DIR]

- One SLURM job per stage (submitit's SLURM executor), each waiting for the stages whose
  outputs it reads with ``--dependency=afterok:<ids> --kill-on-invalid-dep=yes``: when a
  stage fails, SLURM cancels every stage after it instead of leaving them pending.
- One task per GPU across all nodes (``--ntasks-per-node = gpus_per_node``); CPU-only
  stages run one task per node, or ``tasks_per_node`` (CPU test runs). Inside the job
  every task resolves its rank from SLURM and runs the trainer in-process
  (`launchers/job.py`), as ``deepspeed pipeline/train.py --config ... key=value`` would
  (or ``torchrun``, for a run config with ``engine.name: fsdp``: the engine starts its
  process group from the same exported environment).
- Outputs: ``<run_dir>/<stage>/`` (train: tensorboard/, checkpoints/, export/), data in
  ``<run_dir>/data/``; logs in ``<run_dir>/slurm/<stage>/<jobid>_<task>_log.{out,err}``;
  job ids in ``<run_dir>/slurm/jobs.json``. Each stage's inputs are resolved before
  submission.
- Preemption / time limit: USR2 ``signal_delay_s`` before the end; the job requeues and
  the trainer resumes from its latest checkpoint (at most ``max_requeues`` time-outs).
- Node failure: after srun, the batch script requeues the job when its step was lost and no
  rank failed with its own error (at most ``max_failure_requeues`` times; launchers/requeue.py).
- ``--dry-run`` prints the sbatch scripts and the dependency graph, submits nothing.
- Memory plan (`launchers/memory.py`, `python -m pipeline.plan`): every train stage on GPUs is
  planned first (one fake-tensor micro-step of its run config plus the engine's sharded state,
  per GPU of ``resources.gpu_memory_gb``, default 80, or ``--gpu-memory``); ``--dry-run`` prints
  the plans, and a launch with a stage that does not fit is refused before anything is submitted
  (``--ignore-plan`` submits anyway; ``--no-plan`` skips planning, e.g. to save its minutes).
- ``--stages transition,distill`` launches a subset: the outputs it reads from the other
  stages must already be complete in run_dir.
- ``--resume-from RUN_DIR`` continues an experiment: stages whose outputs are complete
  (e.g. ``export/config.json`` present) are skipped; ``--config`` defaults to the
  ``RUN_DIR/experiment.yaml`` saved at the first launch.

The experiment format is documented in `launchers/experiment.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: import the package (the pickled job must be launchers.job)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from launchers.experiment import ExperimentError  # noqa: E402
from launchers.plan import (  # noqa: E402
    REPO_ROOT,
    LaunchError,
    Plan,
    PlannedStage,
    add_launch_arguments,
    plan_from_args,
    save_experiment,
)

SUBMITIT_COMMAND = "{python} -u -m submitit.core._submit {folder}"


def job_env(p: PlannedStage) -> dict[str, str]:
    return {str(k): _env_str(v) for k, v in p.resources.env.items()}


def _env_str(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def sbatch_parameters(plan: Plan, p: PlannedStage, dependency: Optional[str]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) of one stage."""
    from submitit.slurm.slurm import _convert_mem

    res = p.resources
    params: dict[str, Any] = {
        "job_name": f"{plan.experiment.name}.{p.name}",
        "time": res.time,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "signal_delay_s": res.signal_delay_s,
        "wckey": None,  # submitit writes --wckey=submitit by default; clusters enforcing wckeys reject it
    }
    optional = {
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
        "cpus_per_task": res.cpus_per_task,
        "gpus_per_node": res.gpus_per_node or None,
        "mem": None if res.mem_gb is None else ("0" if res.mem_gb == 0 else _convert_mem(res.mem_gb)),
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    # the job unpickles launchers.job.StageJob before anything else: the repository must be importable
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    setup += [f"export {k}={shlex.quote(v)}" for k, v in job_env(p).items()] + list(res.setup)
    params["setup"] = setup
    if res.srun_args:
        params["srun_args"] = list(res.srun_args)
    # right after srun (its status in $?): requeue the job if a node or rank was lost (launchers/requeue.py)
    params["teardown"] = [
        f"{python_of(p)} -m launchers.requeue --srun-status $? "
        f"--max-failure-requeues {res.max_failure_requeues} {shlex.quote(str(log_folder(plan, p)))}"
    ]
    extra: dict[str, Any] = {"requeue": True}
    if dependency:
        extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
    extra.update(res.sbatch)
    params["additional_parameters"] = extra
    return params


def log_folder(plan: Plan, p: PlannedStage) -> Path:
    return plan.run_dir / "slurm" / p.name


def python_of(p: PlannedStage) -> str:
    return p.resources.python or shlex.quote(sys.executable)


def make_job(plan: Plan, p: PlannedStage):
    from launchers.job import StageJob

    return StageJob(
        experiment=plan.experiment.name,
        stage=p.name,
        kind=p.kind,
        entry=p.entry,
        argv=p.argv,
        workdir=os.getcwd(),
        repo_root=str(REPO_ROOT),
        env=job_env(p),
    )


# ----------------------------------------------------------------------------- checks


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found on PATH: run launchers/slurm.py on a SLURM login node "
            "(or use --dry-run to only print the scripts, or launchers/local.py to run here)"
        )


def cluster_partitions() -> list[str]:
    """Partitions of the cluster (`sinfo -h -o %P`, the default one marked '*' is unmarked)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError("sinfo not found on PATH (SLURM client commands are needed)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError("`sinfo -h -o %P` did not answer within 60 s: is slurmctld reachable?") from None
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip()).splitlines() or ["(no output)"]
        raise LaunchError(f"`sinfo -h -o %P` failed: {lines[-1]}")
    return [line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()]


def check_partitions(plan: Plan, partitions: list[str]) -> None:
    bad = sorted(
        {
            (p.name, part)
            for p in plan.stages
            for part in (p.resources.partition or "").split(",")
            if part and part not in partitions
        }
    )
    if bad:
        lines = [f"stage {name!r}: partition {part!r} does not exist" for name, part in bad]
        raise LaunchError("; ".join(lines) + f" (partitions of this cluster: {', '.join(partitions) or 'none'})")


def active_jobs(job_ids: list[str]) -> list[str]:
    if not job_ids or shutil.which("squeue") is None:
        return []
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def previous_jobs(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "slurm" / "jobs.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("jobs", {})
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- dry run / submit


def memory_plans(plan: Plan, args) -> list:
    """The train stages' memory plans (none with --no-plan); progress on stderr."""
    if getattr(args, "no_plan", False):
        return []
    from launchers.memory import plan_memory, progress_to_stderr

    gpu_memory = getattr(args, "gpu_memory", None)
    if gpu_memory is not None:
        from pipeline.planning.report import parse_memory

        try:
            gpu_memory = parse_memory(gpu_memory)
        except ValueError as err:
            raise LaunchError(str(err)) from None
    return plan_memory(plan, gpu_memory, progress=progress_to_stderr)


def dry_run(plan: Plan, out=None, memory: Optional[list] = None) -> None:
    out = out or sys.stdout
    from submitit.slurm.slurm import _make_sbatch_string

    print(f"# experiment {plan.experiment.name}, run_dir {plan.run_dir} (dry run: nothing submitted)", file=out)
    print("# dependency graph", file=out)
    for line in plan.graph_lines():
        print(f"#   {line}", file=out)
    if memory:
        from launchers.memory import not_fitting, print_memory, summary_line

        print_memory(memory, out)
        for r in not_fitting(memory):
            print(f"warning: {summary_line(r)}", file=sys.stderr, flush=True)
    try:
        partitions: Optional[list[str]] = cluster_partitions() if shutil.which("sinfo") else None
    except LaunchError as err:
        partitions = None
        print(f"# partitions not checked: {err}", file=out)
    if partitions is not None:
        check_partitions(plan, partitions)
    for p in plan.stages:
        dependency = ":".join(f"<{u}>" for u in p.upstream)
        params = sbatch_parameters(plan, p, f"afterok:{dependency}" if dependency else None)
        folder = log_folder(plan, p)
        command = SUBMITIT_COMMAND.format(python=python_of(p), folder=shlex.quote(str(folder)))
        text = _make_sbatch_string(command=command, folder=folder, **params)
        print(f"\n# ===== stage {p.name} ({p.kind}): sbatch script =====", file=out)
        print(text.rstrip("\n"), file=out)
        print(f"# runs in each task: {p.entry} {' '.join(shlex.quote(a) for a in p.argv)}", file=out)


def submit(plan: Plan, out=None) -> dict[str, dict[str, Any]]:
    out = out or sys.stdout
    import submitit

    check_sbatch()
    check_partitions(plan, cluster_partitions())
    still = active_jobs([str(j["job_id"]) for j in previous_jobs(plan.run_dir).values()])
    if still:
        raise LaunchError(
            f"jobs {', '.join(still)} of a previous launch into {plan.run_dir} are still queued or "
            f"running; wait for them or cancel them (scancel {' '.join(still)})"
        )
    if not plan.stages:
        print("nothing to launch: every selected stage is complete", file=out)
        return {}
    save_experiment(plan.experiment, plan.run_dir)
    jobs: dict[str, dict[str, Any]] = {}
    try:
        keep = {k: os.environ[k] for k in ("SLURM_CONF",) if k in os.environ}
        with submitit.helpers.clean_env():  # no SLURM_*/RANK/... of a surrounding job leaks into the new ones
            os.environ.update(keep)  # ... but the client configuration stays
            for p in plan.stages:
                ids = [jobs[u]["job_id"] for u in p.upstream]
                dependency = f"afterok:{':'.join(ids)}" if ids else None
                executor = submitit.SlurmExecutor(
                    folder=log_folder(plan, p), max_num_timeout=p.resources.max_requeues, python=p.resources.python
                )
                executor.update_parameters(**sbatch_parameters(plan, p, dependency))
                job = executor.submit(make_job(plan, p))
                jobs[p.name] = {
                    "job_id": job.job_id,
                    "dependency": dependency,
                    "kind": p.kind,
                    "stdout": str(job.paths.stdout),
                    "stderr": str(job.paths.stderr),
                    "output_dir": str(p.output_dir),
                    "num_tasks": p.resources.num_tasks,
                }
                print(
                    f"{p.name}: job {job.job_id} ({dependency or 'no dependency'}, "
                    f"{p.resources.num_tasks} task(s)) log {job.paths.stdout}",
                    file=out,
                    flush=True,
                )
    except Exception as err:
        submitted = [j["job_id"] for j in jobs.values()]
        if submitted:
            subprocess.run(["scancel", *submitted], capture_output=True)
        raise LaunchError(
            f"submission failed ({type(err).__name__}: {err})"
            + (f"; cancelled the jobs already submitted: {', '.join(submitted)}" if submitted else "")
        ) from err
    record = {
        "experiment": plan.experiment.name,
        "run_dir": str(plan.run_dir),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "skipped": plan.skipped,
        "jobs": jobs,
    }
    path = plan.run_dir / "slurm" / "jobs.json"  # the latest launch (also appended to launches.jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    with open(path.with_name("launches.jsonl"), "a") as history:
        history.write(json.dumps(record) + "\n")
    for name, why in plan.skipped.items():
        print(f"{name}: skipped ({why})", file=out)
    print(f"job ids: {path}", file=out)
    return jobs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Submit an experiment's stages to SLURM (submitit).",
        epilog="The experiment format is documented in launchers/experiment.py.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and the dependency graph")
    parser.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="memory of one GPU for the memory plan, e.g. 80GB (default: resources.gpu_memory_gb, 80)",
    )
    parser.add_argument("--no-plan", action="store_true", help="do not plan the train stages' GPU memory")
    parser.add_argument(
        "--ignore-plan", action="store_true", help="submit even when the memory plan says a stage does not fit"
    )
    add_launch_arguments(parser)
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        plan = plan_from_args(args, strict=not args.dry_run)
        memory = memory_plans(plan, args)
        if args.dry_run:
            dry_run(plan, memory=memory)
        else:
            from launchers.memory import not_fitting, print_memory, summary_line

            print_memory(memory, sys.stdout)
            bad = not_fitting(memory)
            if bad and not args.ignore_plan:
                raise LaunchError(
                    "memory plan: "
                    + "; ".join(summary_line(r) for r in bad)
                    + ". Nothing submitted: lower data.micro_batch_size, raise phase.chunk_size or the "
                    "GPU count, or pass --ignore-plan to submit anyway"
                )
            submit(plan)
    except (ExperimentError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
