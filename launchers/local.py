"""Run an experiment's stages on this machine (no SLURM): one after the other, or side by side.

    python launchers/local.py --config configs/experiments/X.yaml [key=value ...]
        [--stages a,b] [--resume-from RUN_DIR] [--dry-run]

The same experiment file, run layout and command lines as `launchers/slurm.py`:

- data_prep / evaluate stages: ``python -m data_prep ...`` / ``python -m pipeline.evaluate ...``
  in a subprocess;
- train stages: ``deepspeed --num_gpus N --master_port P pipeline/train.py --config ...
  key=value ...`` (``local.launcher: torchrun`` uses ``torchrun --nproc_per_node N``, and so
  does every stage whose run config, with its overrides, says ``engine.name: fsdp``);
  N is ``local.nproc_per_node``, else the stage's tasks per node (its GPUs per node, or
  ``tasks_per_node`` on CPU: set ``DS_ACCELERATOR=cpu`` in ``resources.env``).

``local.max_tasks`` (default 1) is how many processes may run at once: above 1, independent
stages run side by side as SLURM would run them (each line of output prefixed with its stage),
starting in file order as their upstream stages finish and their processes fit. A stage that
fails stops the run: nothing more is started, stages already running finish. Each stage's output is
also written to ``<run_dir>/local/<stage>.log``. ``resources.env`` is exported;
``resources.setup`` lines (module load, ...) are for the cluster and are not run here.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

if __package__ in (None, ""):  # run as a script: import the package
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from launchers.experiment import DEFAULT_ENTRY, SINGLE_TASK_KINDS, ExperimentError  # noqa: E402
from launchers.plan import (  # noqa: E402
    REPO_ROOT,
    LaunchError,
    Plan,
    PlannedStage,
    add_launch_arguments,
    plan_from_args,
    save_experiment,
)
from launchers.progress import RunProgress  # noqa: E402


def _free_port() -> int:
    from pipeline.distributed import free_port

    return free_port()


def _target(entry: str, module_flag: str) -> list[str]:
    """How a launcher names the entry: a script path, or `module_flag module` for packages."""
    import importlib.util

    if entry.endswith(".py") or "/" in entry:
        return [entry]
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.find_spec(entry)
    if spec is not None and spec.submodule_search_locations is None and spec.origin:
        return [spec.origin]
    return [module_flag, entry]


def nproc(plan: Plan, p: PlannedStage) -> int:
    if p.kind in SINGLE_TASK_KINDS:
        return 1
    return plan.experiment.local.nproc_per_node or p.resources.ntasks_per_node


def train_engine(p: PlannedStage) -> Optional[str]:
    """`engine.name` of a train stage's run config with its overrides (None when unreadable)."""
    if p.kind != "train" or p.entry != DEFAULT_ENTRY["train"]:
        return None
    from pipeline.train import parse_args
    from pipeline.training.config import ConfigError, apply_overrides, load_yaml_with_includes, select_phase

    try:
        args = parse_args(p.argv)
        raw = apply_overrides(
            select_phase(load_yaml_with_includes(args.config), args.phase, args.config), args.overrides
        )
    except (ConfigError, SystemExit):
        return None
    engine = raw.get("engine")
    return engine.get("name") if isinstance(engine, dict) else None


def use_torchrun(plan: Plan, p: PlannedStage) -> bool:
    """torchrun for `local.launcher: torchrun`, and for the FSDP engine whatever the launcher setting."""
    return plan.experiment.local.launcher == "torchrun" or train_engine(p) == "fsdp"


def command(plan: Plan, p: PlannedStage, port: Optional[int] = None) -> list[str]:
    python = sys.executable
    if p.kind in SINGLE_TASK_KINDS:  # python -m module ... (or python script.py ...)
        is_script = p.entry.endswith(".py") or "/" in p.entry
        return [python, *([p.entry] if is_script else ["-m", p.entry]), *p.argv]
    n = str(nproc(plan, p))
    master_port = str(port or _free_port())
    if use_torchrun(plan, p):
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            n,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            master_port,
            *_target(p.entry, "-m"),
            *p.argv,
        ]
    return [
        python,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        n,
        "--master_port",
        master_port,
        *_target(p.entry, "--module"),
        *p.argv,
    ]


def stage_env(p: PlannedStage) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher of each stage sets them
    for key, value in p.resources.env.items():
        env[str(key)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


class StageProcess:
    """One stage running in a subprocess: its output goes to the console (prefixed with the
    stage name when stages run side by side) and to ``<run_dir>/local/<stage>.log``."""

    def __init__(self, plan: Plan, p: PlannedStage, out, port: Optional[int] = None, prefix: bool = False):
        self.stage, self.out = p, out
        self.tag = f"[{p.name}] " if prefix else ""
        self.cmd = command(plan, p, port)
        self.log = plan.run_dir / "local" / f"{p.name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[local] {p.name} ({p.kind}): {shlex.join(self.cmd)}", file=out, flush=True)
        self.start = time.time()
        self.sink = open(self.log, "a")
        self.sink.write(f"$ {shlex.join(self.cmd)}\n")
        self.proc = subprocess.Popen(
            self.cmd,
            env=stage_env(p),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

    def pump(self, lock: threading.Lock) -> int:
        """Copy the output until the process ends; return its exit code."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with lock:
                self.out.write(self.tag + line)
                self.out.flush()
            self.sink.write(line)
        code = self.proc.wait()
        ending = (
            f"[local] {self.stage.name}: exit {code} after {time.time() - self.start:.0f}s, "
            f"at {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        )
        self.sink.write(ending + "\n")  # the log keeps each run's outcome and wall time (the demo report reads it)
        self.sink.close()
        with lock:
            print(f"{ending} (log {self.log})", file=self.out, flush=True)
        return code

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm():
    """SIGTERM stops the run like Ctrl-C (the stages run in their own sessions: nothing else would
    stop them). Returns the previous handler (None off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _ports(used: set[int]) -> int:
    """A free port no stage of this run was given yet (a stage binds it only once it starts)."""
    while True:
        port = _free_port()
        if port not in used:
            used.add(port)
            return port


def run(plan: Plan, out=None) -> int:
    """Run the plan's stages in order. With ``local.max_tasks`` above 1, a stage whose upstream
    stages are done starts as soon as its processes fit beside the running ones (in file order);
    a stage that needs more than max_tasks runs alone."""
    out = out or sys.stdout
    if not plan.stages:
        print("nothing to run: every selected stage is complete", file=out)
        return 0
    save_experiment(plan.experiment, plan.run_dir)
    for name, why in plan.skipped.items():
        print(f"[local] {name}: skipped ({why})", file=out)
    max_tasks = plan.experiment.local.max_tasks
    pending = list(plan.stages)
    running: dict[str, StageProcess] = {}
    done: list[str] = []
    failed: list[str] = []
    finished: queue.Queue = queue.Queue()
    lock, ports = threading.Lock(), set[int]()
    progress = RunProgress(plan, nproc, out, lock, interval=plan.experiment.local.progress_every_s)
    on_sigterm = _stop_on_sigterm()
    try:
        with progress:
            while pending or running:
                busy = sum(nproc(plan, r.stage) for r in running.values())
                for p in [] if failed else list(pending):
                    if any(u not in done for u in p.upstream):
                        continue
                    need = nproc(plan, p)
                    if running and busy + need > max_tasks:
                        continue
                    port = None if p.kind in SINGLE_TASK_KINDS else _ports(ports)
                    with lock:
                        running[p.name] = proc = StageProcess(plan, p, out, port, prefix=max_tasks > 1)
                    progress.stage_started(p.name)
                    threading.Thread(
                        target=lambda proc=proc: finished.put((proc.stage.name, proc.pump(lock))), daemon=True
                    ).start()
                    pending.remove(p)
                    busy += need
                if not running:
                    break
                name, code = finished.get()
                del running[name]
                progress.stage_finished(name)
                (done if code == 0 else failed).append(name)
                if code != 0:
                    with lock:
                        print(f"error: stage {name} failed (exit {code})", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (kill, timeout, a job manager)
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.proc.wait()
        raise
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
    if failed:
        if pending:
            print(f"error: not started: {', '.join(p.name for p in pending)}", file=sys.stderr, flush=True)
        return 1
    print(f"[local] done: {', '.join(p.name for p in plan.stages)} in {plan.run_dir}", file=out)
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run an experiment's stages on this machine (no SLURM).",
        epilog="The experiment format is documented in launchers/experiment.py.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    add_launch_arguments(parser, verb="run")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        plan = plan_from_args(args, strict=not args.dry_run)
        if not args.dry_run:
            return run(plan)
        for p in plan.stages:
            after = f" (after {', '.join(p.upstream)})" if p.upstream else ""
            print(f"{p.name}{after}: {shlex.join(command(plan, p, port=29500))}")
        for name, why in plan.skipped.items():
            print(f"{name}: skipped ({why})")
        return 0
    except (ExperimentError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running stages were stopped; rerun to resume", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
