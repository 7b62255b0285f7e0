"""How long a local run will take, and how far it is: the expected time at the start and a running ETA.

An experiment may carry `local.reference_timing`: each stage's wall seconds measured on a reference
machine and the time of `speed_probe()` there. At the start this machine runs the same probe; the
reference seconds scaled by the two probes' ratio, scheduled as `launchers/local.py` schedules the
stages (file order, upstream first, at most `local.max_tasks` processes), give the expected time.
While the run goes on, every running train stage reports its progress (the last step in its
metrics.jsonl out of its config's schedule.total_steps), finished stages their real time; both
correct the scale, and the ETA is the same schedule over what is left.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Callable, Optional, TextIO

import yaml

from launchers.seeds import base_name


def speed_probe(repeats: int = 3, iterations: int = 40) -> float:
    """Seconds for a fixed small PyTorch training workload on one thread (best of `repeats`): the
    kind of work the demo's stages do (small matmuls, attention, autograd, AdamW), to compare machines.
    The fastest repeat: other load on the machine only ever slows one down."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(64, 64, generator=gen, requires_grad=True) for _ in range(8)]
        optimizer = torch.optim.AdamW(weights, lr=1e-3)
        x = torch.randn(64, 12, 64, generator=gen)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iterations):
                h = x
                for layer in range(0, len(weights), 4):
                    q, k, v = (h @ weights[layer + i] for i in range(3))
                    att = F.scaled_dot_product_attention(
                        q.unflatten(-1, (4, 16)).transpose(1, 2),
                        k.unflatten(-1, (4, 16)).transpose(1, 2),
                        v.unflatten(-1, (4, 16)).transpose(1, 2),
                        is_causal=True,
                    )
                    h = h + F.gelu(att.transpose(1, 2).flatten(-2) @ weights[layer + 3])
                h.square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        return min(times)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Task:
    name: str
    seconds: float  # what is left of it
    procs: int
    upstream: list[str]
    running: bool = False


def schedule_seconds(tasks: list[Task], max_tasks: int, done: AbstractSet[str] = frozenset()) -> float:
    """When the last task ends if they run as launchers/local.run starts them: running ones go on;
    a pending one starts, in list order, once its upstream tasks ended and its processes fit (a task
    needing more than max_tasks runs alone)."""
    now, ended = 0.0, set(done)
    active = {t.name: t.seconds for t in tasks if t.running}
    pending = [t for t in tasks if not t.running]
    procs = {t.name: t.procs for t in tasks}
    while active or pending:
        busy = sum(procs[n] for n in active)
        for t in list(pending):
            if all(u in ended for u in t.upstream) and (not active or busy + t.procs <= max_tasks):
                active[t.name] = now + t.seconds
                busy += t.procs
                pending.remove(t)
        if not active:  # an upstream task that is not in this run and not done: nothing can start
            break
        name = min(active, key=lambda n: active[n])
        now = active.pop(name)
        ended.add(name)
    return now


def train_progress(output_dir: Path) -> Optional[float]:
    """The fraction of a train stage's steps done (its metrics.jsonl against schedule.total_steps)."""
    try:
        total = yaml.safe_load((output_dir / "config.yaml").read_text())["schedule"]["total_steps"]
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue  # a line being written
        if isinstance(step, int) and total:
            return min(step / total, 1.0)
    return None


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunProgress:
    """The expected time of a local run and, every `interval` seconds while it runs, one ETA line."""

    def __init__(
        self,
        plan,
        nproc: Callable,
        out: TextIO,
        lock: threading.Lock,
        interval: float = 30.0,
        probe: Callable = speed_probe,
    ):
        self.plan, self.nproc, self.out, self.lock, self.interval = plan, nproc, out, lock, interval
        self.reference = plan.experiment.local.reference_timing
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self._first_progress: dict[str, tuple[float, float]] = {}  # stage -> (when, fraction) first seen
        self.begin = time.time()
        self.scale = 1.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.reference is not None:
            probe_s = probe()
            self.scale = probe_s / self.reference.probe_s
            expected = self.remaining()
            reference = schedule_seconds(
                self._tasks(lambda p: self._reference_s(p.name), running=set()), plan.experiment.local.max_tasks
            )
            print(
                f"[local] expected time: {format_seconds(expected)} (the reference machine took "
                f"{format_seconds(reference)}; this machine's speed probe: {probe_s:.2f}s against "
                f"{self.reference.probe_s:.2f}s, x{self.scale:.2f})",
                file=out,
                flush=True,
            )

    def _reference_s(self, name: str) -> float:
        """The stage's reference seconds; a seed's copy without its own takes its stage's (any seed)."""
        if self.reference is None:
            return 0.0
        return self.reference.stages.get(name, self.reference.stages.get(base_name(name), 0.0))

    def _tasks(self, seconds: Callable, running: set[str]) -> list[Task]:
        return [
            Task(p.name, seconds(p), self.nproc(self.plan, p), [u for u in p.upstream], p.name in running)
            for p in self.plan.stages
            if p.name not in self.finished
        ]

    def _observed_scale(self) -> float:
        """Real time over reference time of the finished stages (the probe's scale until one finished)."""
        pairs = [(s, self._reference_s(n)) for n, s in self.finished.items() if self._reference_s(n) > 0]
        return sum(s for s, _ in pairs) / sum(r for _, r in pairs) if pairs else self.scale

    def _left_s(self, p, scale: float, now: float) -> float:
        expected = self._reference_s(p.name) * scale
        if p.name not in self.started:
            return expected
        fraction = train_progress(p.output_dir) if p.kind == "train" else None
        if fraction is not None:
            # its rate since first seen (after start-up; a resumed stage starts part-way)
            first_at, first = self._first_progress.setdefault(p.name, (now, fraction))
            if fraction - first >= 0.05:
                return (now - first_at) * (1 - fraction) / (fraction - first)
        return max(expected - (now - self.started[p.name]), 0.0)

    def remaining(self) -> float:
        now, scale = time.time(), self._observed_scale()
        tasks = self._tasks(lambda p: self._left_s(p, scale, now), running=set(self.started))
        return schedule_seconds(tasks, self.plan.experiment.local.max_tasks, done=set(self.finished))

    def stage_started(self, name: str) -> None:
        self.started.setdefault(name, time.time())

    def stage_finished(self, name: str) -> None:
        self.finished[name] = time.time() - self.started.get(name, time.time())
        self.started.pop(name, None)

    def line(self) -> str:
        parts = []
        for p in self.plan.stages:
            if p.name in self.started:
                fraction = train_progress(p.output_dir) if p.kind == "train" else None
                parts.append(f"{p.name} {fraction:.0%}" if fraction is not None else f"{p.name} running")
        text = (
            f"[local] {format_seconds(time.time() - self.begin)} elapsed, {len(self.finished)}/"
            f"{len(self.plan.stages)} stages done; running: {', '.join(parts) or 'none'}"
        )
        if self.reference is not None:
            left = self.remaining()
            text += f"; ETA {format_seconds(left)} (done at {time.strftime('%H:%M:%S', time.localtime(time.time() + left))})"
        return text

    def __enter__(self) -> "RunProgress":
        def report():
            while not self._stop.wait(self.interval):
                text = self.line()
                with self.lock:  # whole lines between the stages' output
                    print(text, file=self.out, flush=True)

        self._thread = threading.Thread(target=report, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def calibrate(run_dir: Path) -> dict:
    """The `local.reference_timing` block for an experiment, from a finished local run on this machine
    (each stage's last successful wall time in <run_dir>/local/*.log) and this machine's speed probe."""
    import os

    from pipeline.evaluation.demo_report import phase_times

    measured, _ = phase_times(run_dir)
    if not measured:
        raise SystemExit(f"{run_dir}/local/ holds no finished stage's log")
    by_stage: dict[str, list[float]] = {}  # the copies of a per-seed stage: their mean, under the stage's name
    for name, s in measured.items():
        by_stage.setdefault(base_name(name), []).append(s)
    seconds = {name: round(sum(v) / len(v), 1) for name, v in by_stage.items()}
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown CPU",
        )
        if Path("/proc/cpuinfo").is_file()
        else "unknown CPU"
    )
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "probe_s": round(speed_probe(), 3),
        "stages": {name: float(s) for name, s in sorted(seconds.items())},
    }


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m launchers.progress",
        description=(
            "Print the local.reference_timing block (YAML) measured by a finished local run on this machine; "
            "run it on an idle machine."
        ),
    )
    parser.add_argument("--calibrate", type=Path, required=True, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    print(yaml.safe_dump({"reference_timing": calibrate(args.calibrate)}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
