"""launchers/slurm.py on a real single-node SLURM cluster (started by the `slurm_cluster` fixture).

The mechanics (dependency order, the distributed environment of each task, a failing stage
cancelling its dependents, preemption -> requeue -> resume) use `toy_stage.py`, a tiny real
2-rank gloo training with checkpoints; the real data prep and trainer run as SLURM jobs here
(data, a preempted pretrain) and, the whole smoke experiment, across two nodes in test_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "tests" / "slurm" / "toy_stage.py")
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"

pytestmark = pytest.mark.slurm


# ----------------------------------------------------------------------------- helpers


def launch(*args: str, launcher: str = "slurm.py", timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(REPO / "launchers" / launcher), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def toy(**args) -> dict:
    return {"kind": "train", "entry": TOY, "args": [f"{k}={v}" for k, v in args.items()]}


def toy_experiment(tmp_path: Path, stages: dict, name: str = "toy") -> Path:
    exp = {
        "name": name,
        "run_dir": str(tmp_path / "run"),
        "allow_short_signal_delay": True,
        "resources": {
            "partition": "debug",
            "tasks_per_node": 2,
            "cpus_per_task": 1,
            "mem_gb": 1,
            "time": 10,
            "signal_delay_s": 30,
            "max_requeues": 2,
            "env": {"OMP_NUM_THREADS": 1},
        },
        "local": {"launcher": "torchrun"},
        "stages": stages,
    }
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def jobs_of(run_dir: Path) -> dict[str, dict]:
    return json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]


def events(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "events" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def job_logs(job: dict) -> str:
    out = []
    for key in ("stdout", "stderr"):
        path = Path(job[key])
        if path.is_file():
            out.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def assert_launched(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"launcher failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- mechanics


def test_chain_runs_in_dependency_order_with_slurm_ranks(slurm_cluster, tmp_path):
    cfg = toy_experiment(
        tmp_path,
        {"a": toy(steps=2, sleep=0.5), "b": toy(steps=2, input="{a/export}"), "c": toy(steps=2, input="{b/export}")},
    )
    run_dir = tmp_path / "run"
    out = launch("--config", cfg)
    assert_launched(out)
    jobs = jobs_of(run_dir)
    ids = {name: job["job_id"] for name, job in jobs.items()}
    for name, job in jobs.items():  # each job id and its log path are printed
        assert f"{name}: job {job['job_id']}" in out.stdout and job["stdout"] in out.stdout
    assert jobs["a"]["dependency"] is None
    assert jobs["b"]["dependency"] == f"afterok:{ids['a']}" and jobs["c"]["dependency"] == f"afterok:{ids['b']}"
    script = (run_dir / "slurm" / "b" / f"{ids['b']}_submission.sh").read_text()
    assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --ntasks-per-node=2" in script

    final = slurm_cluster.wait_jobs(list(ids.values()), timeout=240)
    for name, job_id in ids.items():
        assert final[job_id]["JobState"] == "COMPLETED", f"{name}: {final[job_id]}\n{job_logs(jobs[name])}"
        assert final[job_id]["Dependency"] == "(null)"
    for earlier, later in (("a", "b"), ("b", "c")):
        end = max(e["time"] for r in (0, 1) for e in events(run_dir / earlier, r) if e["event"] == "end")
        start = min(e["time"] for r in (0, 1) for e in events(run_dir / later, r) if e["event"] == "start")
        assert start > end, f"{later} started before {earlier} ended"
    for name in ids:
        starts = [events(run_dir / name, r)[0] for r in (0, 1)]
        assert sorted(s["rank"] for s in starts) == [0, 1]
        assert {s["local_rank"] for s in starts} == {0, 1}
        for s in starts:
            assert (s["world_size"], s["local_world_size"], s["lws_env"]) == (2, 2, "2")
            assert s["master_addr"] == slurm_cluster.node and s["job_id"] == ids[name]
            assert s["cuda_visible"] is None  # not restricted per task
        assert json.loads((run_dir / name / "export" / "config.json").read_text())["world_size"] == 2
    assert (run_dir / "experiment.yaml").is_file()

    # --resume-from: everything is complete, nothing is submitted
    out = launch("--resume-from", run_dir)
    assert_launched(out)
    assert "nothing to launch" in out.stdout
    # ... and after c's output is removed, only c runs again, with no dependency
    for sub in ("export", "checkpoints"):
        subprocess.run(["rm", "-rf", str(run_dir / "c" / sub)], check=True)
    out = launch("--resume-from", run_dir)
    assert_launched(out)
    jobs = jobs_of(run_dir)
    assert list(jobs) == ["c"] and jobs["c"]["dependency"] is None
    assert "a: skipped (complete (--resume-from))" in out.stdout
    final = slurm_cluster.wait_jobs([jobs["c"]["job_id"]], timeout=120)
    assert final[jobs["c"]["job_id"]]["JobState"] == "COMPLETED", job_logs(jobs["c"])
    assert (run_dir / "c" / "export" / "config.json").is_file()
    assert len((run_dir / "slurm" / "launches.jsonl").read_text().splitlines()) == 2


def test_failing_stage_cancels_its_dependents(slurm_cluster, tmp_path):
    cfg = toy_experiment(
        tmp_path, {"a": toy(fail="true"), "b": toy(input="{a/export}"), "c": toy(input="{b/export}")}, name="failing"
    )
    out = launch("--config", cfg)
    assert_launched(out)
    jobs = jobs_of(tmp_path / "run")
    ids = [jobs[n]["job_id"] for n in ("a", "b", "c")]
    final = slurm_cluster.wait_jobs(ids, timeout=120)  # nothing left pending
    assert final[ids[0]]["JobState"] == "FAILED", final[ids[0]]
    assert final[ids[0]]["Restarts"] == "0", final[ids[0]]  # its own error: not requeued as a node failure
    assert "not requeued: rank(s) 0, 1 failed with their own error" in Path(jobs["a"]["stderr"]).read_text()
    for job_id in ids[1:]:
        assert final[job_id]["JobState"] == "CANCELLED", final[job_id]
        assert final[job_id]["Reason"] == "DependencyNeverSatisfied", final[job_id]
    assert "exited with code 3" in Path(jobs["a"]["stderr"]).read_text()
    assert not slurm_cluster.queued_jobs(ids)


def test_clear_errors_before_submission(slurm_cluster, tmp_path):
    cfg = toy_experiment(tmp_path, {"a": toy(), "b": toy(input="{a/export}")}, name="errors")
    out = launch("--config", cfg, "resources.partition=nope")
    assert out.returncode == 2
    assert "partition 'nope' does not exist" in out.stderr and "debug" in out.stderr
    out = launch("--config", cfg, "--stages", "b")
    assert out.returncode == 2
    assert "stage 'b', args[0] = a/export: stage 'a' is not launched" in out.stderr
    out = launch("--config", cfg, "stages.b.resources.gpus_per_nodes=1")
    assert out.returncode == 2 and "stages.b.resources.gpus_per_nodes: unknown key" in out.stderr
    assert not (tmp_path / "run" / "slurm" / "jobs.json").exists()


# ----------------------------------------------------------------------------- helpers of the real-pipeline tests


def tensorboard_scalars(directory: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
