"""After a stage's srun ends: requeue the SLURM job when its step was lost to a node failure.

SLURM requeues a ``--requeue`` job by itself only once it marks a failed node DOWN
(SlurmdTimeout, often minutes). A node whose slurmd is back before that leaves srun with a
lost step ("io error and missing step on node N"): srun kills the tasks left and the job
ends FAILED, its dependents cancelled. So the batch script runs this module after srun
(submitit's ``teardown`` lines; `launchers/slurm.py`):

    python -m launchers.requeue --srun-status $? --max-failure-requeues N LOG_FOLDER

It requeues the job (``scontrol requeue``) when srun failed and no task reported an error
of its own; the rerun resumes from the latest complete checkpoint. The tasks leave markers
in the job's log folder (a filesystem the nodes share), named ``<job>_<attempt>_<what>``:

- ``failed_rank<R>``: the entry point failed on rank R with its own error (an exception, or
  an exit code other than the trainer's lost-peer code 4): rerunning it would fail again;
- ``preempted``: submitit is already requeueing after USR2 (time limit, preemption);
- ``requeued_node_failure``: written here, one per requeue; they bound the requeues.

A task killed from outside (its node died, srun aborted the step, the kernel's OOM killer)
and a rank that lost its peer (exit 4) leave no ``failed`` marker: the job is requeued, at
most ``max_failure_requeues`` times. When the first node (the batch script's) dies, this
script dies with it, and SLURM requeues the job once it marks that node DOWN.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

FAILED = "failed_rank"
PREEMPTED = "preempted"
REQUEUED = "requeued_node_failure"


def marker(folder: Path, what: str, job_id: Optional[str] = None, attempt: Optional[str] = None) -> Path:
    """`<folder>/<job>_<attempt>_<what>` for this job's current attempt (SLURM_RESTART_COUNT) by default."""
    job_id = job_id or os.environ["SLURM_JOB_ID"]
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0") if attempt is None else attempt
    return folder / f"{job_id}_{attempt}_{what}"


def mark(folder: Path, what: str, why: str) -> None:
    """Leave a marker for the batch script's teardown (advice: a failure to write it is not an error)."""
    try:
        marker(folder, what).write_text(f"{why}\nhost {os.uname().nodename} at {time.time():.3f}\n")
    except (OSError, KeyError):
        pass


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def decide(folder: Path, srun_status: int, max_failure_requeues: int, state: str) -> tuple[bool, str]:
    """(requeue?, why) for this job's attempt, from the markers and the job's state."""
    if srun_status == 0:
        return False, "the step succeeded"
    if state != "RUNNING":
        return False, f"the job is {state} (cancelled, or already requeued)"
    if marker(folder, PREEMPTED).exists():
        return False, "submitit is requeueing it after a time limit or preemption"
    failed = sorted(folder.glob(marker(folder, FAILED + "*").name))
    if failed:
        ranks = ", ".join(p.name.rsplit(FAILED, 1)[1] for p in failed)
        return False, f"rank(s) {ranks} failed with their own error (see their logs); rerunning would not help"
    earlier = sorted(folder.glob(marker(folder, REQUEUED, attempt="*").name))
    if len(earlier) >= max_failure_requeues:
        return False, (
            f"it was already requeued {len(earlier)} time(s) after a lost node or rank "
            f"(resources.max_failure_requeues={max_failure_requeues})"
        )
    return True, (
        f"the step ended with status {srun_status} and no rank reported an error of its own (a node or "
        f"a rank was lost): requeue {len(earlier) + 1} of at most {max_failure_requeues}; the rerun resumes "
        "from the latest complete checkpoint"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the stage's submitit log folder")
    parser.add_argument("--srun-status", type=int, required=True, help="srun's exit status ($?)")
    parser.add_argument("--max-failure-requeues", type=int, required=True)
    args = parser.parse_args(argv)
    job_id = os.environ.get("SLURM_JOB_ID")
    if args.srun_status == 0 or job_id is None:
        return args.srun_status
    requeue, why = decide(args.folder, args.srun_status, args.max_failure_requeues, job_state(job_id))
    tag = f"[launcher] job {job_id}"
    if not requeue:
        print(f"{tag}: not requeued: {why}", file=sys.stderr, flush=True)
        return args.srun_status
    try:
        with open(marker(args.folder, REQUEUED), "x") as record:
            record.write(why + "\n")
    except FileExistsError:  # this attempt was requeued already
        return args.srun_status
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        marker(args.folder, REQUEUED).unlink(missing_ok=True)
        print(
            f"{tag}: `scontrol requeue {job_id}` failed: {(done.stderr or done.stdout).strip()}",
            file=sys.stderr,
            flush=True,
        )
        return args.srun_status
    print(f"{tag}: requeued: {why}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
