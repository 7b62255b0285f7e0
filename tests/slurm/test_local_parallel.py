"""launchers/local.py with `local.max_tasks` > 1: independent stages side by side, dependents after
their inputs, a failure stopping what has not started (real processes: tests/slurm/toy_stage.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .test_slurm_launcher import REPO, events, launch, toy, toy_experiment, wait_for


def _span(run_dir: Path, stage: str) -> tuple[float, float]:
    rank0 = events(run_dir / stage, 0)
    return rank0[0]["time"], rank0[-1]["time"]


def _launch_side_by_side(tmp_path: Path, stages: dict):
    for stage in stages.values():
        stage["resources"] = {"tasks_per_node": 1}
    return launch("--config", str(toy_experiment(tmp_path, stages)), "local.max_tasks=2", launcher="local.py")


def test_independent_stages_run_side_by_side(tmp_path):
    stages = {
        "a": toy(steps=6, sleep=0.5),
        "b": toy(steps=6, sleep=0.5),
        "c": toy(steps=1, sleep=0, input="{a/export}", other="{b/export}"),
    }
    out = _launch_side_by_side(tmp_path, stages)
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "run"
    (a0, a1), (b0, b1), (c0, _) = (_span(run, n) for n in "abc")
    assert b0 < a1 and a0 < b1, "a and b should overlap"
    assert c0 > max(a1, b1), "c reads both exports: it starts after them"
    ports = {events(run / n, 0)[0]["master_port"] for n in "abc"}
    assert len(ports) == 3, ports
    assert "[a] " in out.stdout and "[b] " in out.stdout  # interleaved output says whose it is
    for n in "abc":
        assert "exit 0 after" in (run / "local" / f"{n}.log").read_text()


def test_a_failure_starts_nothing_more_and_lets_running_stages_finish(tmp_path):
    stages = {
        "a": toy(steps=1, sleep=0, fail="true"),
        "b": toy(steps=6, sleep=0.5),
        "c": toy(steps=1, sleep=0, input="{a/export}"),
        "d": toy(steps=1, sleep=0, input="{b/export}"),
    }
    out = _launch_side_by_side(tmp_path, stages)
    assert out.returncode == 1
    assert "stage a failed (exit " in out.stderr and "not started: c, d" in out.stderr, out.stderr
    run = tmp_path / "run"
    assert json.loads((run / "b" / "export" / "config.json").read_text())["steps"] == 6  # b finished
    assert not (run / "c").exists() and not (run / "d").exists()


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_stops_every_running_stage(tmp_path, signum):
    stages = {"a": toy(steps=200, sleep=0.5), "b": toy(steps=200, sleep=0.5)}
    for stage in stages.values():
        stage["resources"] = {"tasks_per_node": 1}
    cfg = toy_experiment(tmp_path, stages)
    # SIGINT back to its default: a shell ignores it in background jobs, and Python then keeps it ignored
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "launchers" / "local.py"), "--config", str(cfg), "local.max_tasks=2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run = tmp_path / "run"
    starts = [run / n / "events" / "rank0.jsonl" for n in stages]
    wait_for(lambda: all(p.is_file() for p in starts), 120, "both stages to start")
    pids = [events(run / n, 0)[0]["pid"] for n in stages]
    launcher.send_signal(signum)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and "interrupted: the running stages were stopped" in err, err
    wait_for(lambda: not any(_alive(pid) for pid in pids), 30, "the stages' processes to stop")
    assert not (run / "a" / "export").exists() and not (run / "b" / "export").exists()
