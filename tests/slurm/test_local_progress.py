"""launchers/progress.py: the expected time of a local run and its running ETA (the schedule the
local launcher follows, train stages' progress), and the launcher printing both for a real run."""

from __future__ import annotations

import re
import threading
from io import StringIO
from types import SimpleNamespace

import pytest
import yaml

from launchers.progress import RunProgress, Task, schedule_seconds, speed_probe, train_progress

from .test_slurm_launcher import launch, toy, toy_experiment

# the demo's graph: data -> two pretrainings side by side -> transition -> distill -> evaluate
DEMO = [
    ("data", 1, []),
    ("pretrain", 1, ["data"]),
    ("pretrain_standard", 1, ["data"]),
    ("transition", 2, ["pretrain"]),
    ("distill", 2, ["transition", "pretrain"]),
    ("evaluate", 1, ["distill"]),
]
SECONDS = {"data": 10, "pretrain": 100, "pretrain_standard": 40, "transition": 30, "distill": 35, "evaluate": 5}


def demo_tasks(**running) -> list[Task]:
    return [Task(n, running.get(n, SECONDS[n]), procs, up, n in running) for n, procs, up in DEMO]


def test_the_schedule_is_the_launchers():
    # side by side on 2 processes: the standard transformer hides behind the LoopLM
    assert schedule_seconds(demo_tasks(), max_tasks=2) == 10 + 100 + 30 + 35 + 5
    # one process at a time: every stage in turn
    assert schedule_seconds(demo_tasks(), max_tasks=1) == sum(SECONDS.values())
    # mid-run: data done, the LoopLM has 20 s left and the standard 60 s (it holds a process until then)
    left = [t for t in demo_tasks(pretrain=20, pretrain_standard=60) if t.name != "data"]
    assert schedule_seconds(left, max_tasks=2, done={"data"}) == 60 + 30 + 35 + 5
    # an upstream stage neither done nor in the run: nothing after it can be scheduled
    assert schedule_seconds([Task("b", 5, 1, ["a"])], max_tasks=1) == 0


def test_train_progress_reads_steps_against_the_schedule(tmp_path):
    assert train_progress(tmp_path) is None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"schedule": {"total_steps": 200}}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 50, "loss": 1}\n{"ste')  # a line being written
    assert train_progress(tmp_path) == 0.25


def _plan(tmp_path, reference):
    stages = [
        SimpleNamespace(name=n, kind="train", upstream=up, output_dir=tmp_path / n, procs=procs)
        for n, procs, up in DEMO
    ]
    local = SimpleNamespace(reference_timing=reference, max_tasks=2)
    return SimpleNamespace(stages=stages, experiment=SimpleNamespace(local=local))


def test_expected_time_scales_the_reference_by_the_speed_probe_then_follows_progress(tmp_path):
    reference = SimpleNamespace(probe_s=0.5, stages=SECONDS, machine="ref")
    out = StringIO()
    progress = RunProgress(
        _plan(tmp_path, reference), lambda plan, p: p.procs, out, threading.Lock(), probe=lambda: 1.5
    )  # this machine: 3x slower than the reference
    assert "expected time: 9m00s (the reference machine took 3m00s" in out.getvalue()
    assert progress.remaining() == pytest.approx(3 * 180, rel=1e-3)
    # data took 20 s (2x its reference): the observed scale replaces the probe's
    progress.stage_started("data")
    progress.started["data"] -= 20
    progress.stage_finished("data")
    assert progress.remaining() == pytest.approx(2 * (180 - 10), rel=1e-3)
    # the LoopLM's rate once it runs: 25% -> 50% of its steps in 30 s: 60 s left
    progress.stage_started("pretrain")
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"schedule": {"total_steps": 100}}))
    (run / "metrics.jsonl").write_text('{"step": 25}\n')
    progress.remaining()  # first seen at 25%
    first_at, _ = progress._first_progress["pretrain"]
    progress._first_progress["pretrain"] = (first_at - 30, 0.25)
    (run / "metrics.jsonl").write_text('{"step": 25}\n{"step": 50}\n')
    # the standard transformer (80 s at 2x) holds a process until 80 s: the 2-process transition waits for it
    assert progress.remaining() == pytest.approx(80 + 2 * (30 + 35 + 5), abs=1.0)
    assert re.search(r"running: pretrain 50%; ETA 3m\d\ds", progress.line()), progress.line()


def test_the_copies_of_a_per_seed_stage_take_its_reference_time(tmp_path):
    """reference_timing names a per-seed stage once (calibrate writes its seeds' mean): every copy takes it."""
    seeded = [
        SimpleNamespace(name=f"distill_seed{s}", kind="train", upstream=[], output_dir=tmp_path / str(s), procs=2)
        for s in range(3)
    ]
    local = SimpleNamespace(reference_timing=SimpleNamespace(probe_s=1.0, stages={"distill": 40.0}), max_tasks=2)
    plan = SimpleNamespace(stages=seeded, experiment=SimpleNamespace(local=local))
    progress = RunProgress(plan, lambda plan, p: p.procs, StringIO(), threading.Lock(), probe=lambda: 1.0)
    assert progress.remaining() == pytest.approx(3 * 40.0, rel=1e-3)


def test_the_speed_probe_measures_seconds():
    first = speed_probe(repeats=1, iterations=5)
    assert 0 < first < 30


def test_the_local_launcher_prints_the_expected_time_and_an_eta(tmp_path):
    stages = {"a": toy(steps=12, sleep=0.25)}
    stages["a"]["resources"] = {"tasks_per_node": 1}
    cfg = toy_experiment(tmp_path, stages)
    raw = yaml.safe_load(cfg.read_text())
    raw["local"].update(
        progress_every_s=0.5, reference_timing={"machine": "test", "probe_s": 1.0, "stages": {"a": 9.0}}
    )
    cfg.write_text(yaml.safe_dump(raw))
    out = launch("--config", cfg, launcher="local.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\[local\] expected time: [\dm]+s \(the reference machine took 9s", out.stdout), out.stdout
    etas = re.findall(r"running: a (\d+)%; ETA", out.stdout)
    assert etas and int(etas[-1]) > 0, out.stdout  # a's progress read from its metrics against its steps


def test_reference_timing_must_name_stages(tmp_path):
    cfg = toy_experiment(tmp_path, {"a": toy()})
    out = launch(
        "--config", cfg, "local.reference_timing={probe_s: 1, stages: {z: 3}}", "--dry-run", launcher="local.py"
    )
    assert out.returncode == 2 and "local.reference_timing.stages: 'z' name no stage" in out.stderr, out.stderr
