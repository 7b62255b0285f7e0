"""What runs inside each SLURM task of a stage (submitit pickles a `StageJob`).

Each task (one per GPU, or per node for CPU-only stages) resolves its distributed
environment from SLURM (`pipeline.distributed.resolve_distributed_env`: ranks from
SLURM_PROCID/SLURM_LOCALID, LOCAL_WORLD_SIZE from the tasks per node, the master from
the node list) and exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT without touching CUDA_VISIBLE_DEVICES (DeepSpeed selects the device from
LOCAL_RANK). Then it calls the stage's entry point in-process, exactly as the
``deepspeed`` launcher would run it: ``pipeline.train.main(argv)``.

Preemption and time limits: SLURM sends USR2 ``signal_delay_s`` before the limit (or
on ``scancel --signal=USR2``); submitit calls `StageJob.checkpoint` on rank 0, which only
resubmits the same call, and requeues the job. The training itself saves checkpoints
periodically on all ranks, and rerunning the trainer with the same run_dir resumes
from the latest one, so the requeued job continues where the last checkpoint left it.
submitit bounds the requeues after time-outs (``max_requeues``).

Node failures: each task leaves a marker when it fails with its own error (or is being
requeued by submitit); after srun, the batch script runs `launchers.requeue`, which
requeues the job when srun failed and no task reported an error of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from launchers.requeue import FAILED, PREEMPTED, mark
from pipeline.train import EXIT_LOST_PEER  # the trainer's code when another rank is gone: requeue, not a crash


class StageFailed(RuntimeError):
    pass


# Set by StageJob.checkpoint (rank 0, inside submitit's USR2 handler) just before submitit requeues
# the job and exits with sys.exit(-1): that SystemExit must reach submitit untouched.
_requeue_requested = False


def run_entry(entry: str, argv: list[str]) -> int:
    """Run `entry` (a module name or a script path) with `argv`, in this process; its exit code.

    A module or script that defines ``main`` is called as ``main(argv)``; otherwise it runs as
    ``__main__`` (``python -m entry argv`` / ``python script argv``) with ``sys.argv`` set.
    """
    is_script = entry.endswith(".py") or "/" in entry
    main = None
    if not is_script:
        spec = importlib.util.find_spec(entry)
        if spec is None:
            raise StageFailed(f"entry point module {entry!r} not found (sys.path: {sys.path[:4]} ...)")
        if spec.submodule_search_locations is None:  # a plain module: prefer main(argv)
            main = getattr(importlib.import_module(entry), "main", None)
    saved = sys.argv
    sys.argv = [entry, *argv]
    try:
        if callable(main):
            return _exit_code(main(list(argv)))
        if is_script:
            runpy.run_path(entry, run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if _requeue_requested:
            raise
        code = done.code
        if code in (None, 0):
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr, flush=True)
        return 1
    finally:
        sys.argv = saved
    return 0


def _exit_code(value: Any) -> int:
    if value is None or value is True:
        return 0
    if isinstance(value, int):
        return value
    return 0


def export_distributed_env() -> Any:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM."""
    from pipeline.distributed import resolve_distributed_env

    if "SLURM_PROCID" in os.environ:  # ranks inherited from a torchrun/deepspeed shell: SLURM decides here
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
            os.environ.pop(key, None)
    env = resolve_distributed_env()
    env.export()
    return env


class StageJob(submitit.helpers.Checkpointable):
    """One stage of an experiment, run by every task of its SLURM job."""

    def __init__(
        self,
        experiment: str,
        stage: str,
        kind: str,
        entry: str,
        argv: list[str],
        workdir: str,
        repo_root: str,
        env: dict[str, str],
    ) -> None:
        self.experiment = experiment
        self.stage = stage
        self.kind = kind
        self.entry = entry
        self.argv = list(argv)
        self.workdir = workdir
        self.repo_root = repo_root
        self.env = dict(env)

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)
        if self.repo_root not in sys.path:
            sys.path.insert(0, self.repo_root)
        os.environ.update(self.env)
        dist = export_distributed_env()
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1
        tag = f"[launcher] {self.experiment}.{self.stage}"
        print(
            f"{tag}: rank {dist.rank}/{dist.world_size} local {dist.local_rank}/{dist.local_world_size} "
            f"master {dist.master_addr}:{dist.master_port} job {os.environ.get('SLURM_JOB_ID')} "
            f"attempt {attempt} host {os.uname().nodename}",
            flush=True,
        )
        if dist.rank == 0:
            print(f"{tag}: {self.entry} {' '.join(self.argv)}", flush=True)
        start = time.time()
        try:
            code = run_entry(self.entry, self.argv)
        except Exception as err:
            _mark(f"{FAILED}{dist.rank}", f"{type(err).__name__}: {err}")
            raise
        if code != 0 and _requeue_requested:  # the entry point caught submitit's exit: exit as submitit meant
            raise SystemExit(-1)
        if code != 0:
            if code != EXIT_LOST_PEER:
                _mark(f"{FAILED}{dist.rank}", f"exit code {code}")
            raise StageFailed(f"{tag}: {self.entry} exited with code {code} on rank {dist.rank}")
        # The stage is complete: a time-limit or preemption USR2 arriving from now on has nothing left to
        # save, and must neither requeue a finished job nor (once Python restores default handlers at
        # exit) kill the task and turn a COMPLETED job into FAILED.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        print(f"{tag}: rank {dist.rank} done in {time.time() - start:.1f}s", flush=True)
        return {"stage": self.stage, "rank": dist.rank, "attempt": attempt, "seconds": time.time() - start}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer checkpoints by itself; requeueing the same call resumes from its run_dir.
        global _requeue_requested
        _requeue_requested = True
        _mark(PREEMPTED, "USR2: submitit requeues the job")
        print(
            f"[launcher] {self.experiment}.{self.stage}: preempted or timed out, requeueing "
            "(the rerun resumes from the latest checkpoint)",
            flush=True,
        )
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _mark(what: str, why: str) -> None:
    """A marker in the job's log folder for the batch script's `launchers.requeue` (SLURM jobs only)."""
    if "SUBMITIT_FOLDER" in os.environ and "SLURM_JOB_ID" in os.environ:
        mark(Path(submitit.JobEnvironment().paths.folder), what, why)


def repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])
