"""launchers/slurm.py across two nodes of a real SLURM cluster (the `two_node_cluster` fixture:
nodes mn1 and mn2, each its own network, host name, IPC and /dev/shm; `multinode.py`).

What one machine cannot show with a single node: the job spans two hosts, each task resolves its
rank and the master from SLURM on its own node (one rank per node, MASTER_ADDR the first node's
name, resolved on the other node), and the ranks train together over the network between them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from tests.slurm.test_slurm_launcher import SMOKE, events, job_logs, jobs_of, tensorboard_scalars, toy, toy_experiment

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def launch(cluster, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """launchers/slurm.py against the two-node cluster (its SLURM_CONF, whatever os.environ holds)."""
    env = dict(cluster.env, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "slurm.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0 or not check, f"launcher failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def test_toy_stage_runs_one_rank_per_node(two_node_cluster, tmp_path):
    """toy_stage.py (2-rank gloo training) with nodes=2, tasks_per_node=1: rank 0 on mn1, rank 1 on mn2."""
    cluster = two_node_cluster
    cfg = toy_experiment(tmp_path, {"a": toy(steps=3, sleep=0)}, name="two-nodes")
    exp = yaml.safe_load(cfg.read_text())
    exp["resources"].update(nodes=2, tasks_per_node=1)
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    run_dir = tmp_path / "run"
    launch(cluster, "--config", cfg)
    job = jobs_of(run_dir)["a"]
    assert job["num_tasks"] == 2
    final = cluster.wait_jobs([job["job_id"]], timeout=120)[job["job_id"]]
    assert final["JobState"] == "COMPLETED", f"{final}\n{job_logs(job)}\n{cluster.log_tails()}"
    assert final["NodeList"] == "mn[1-2]" and final["NumNodes"] == "2", final
    script = (run_dir / "slurm" / "a" / f"{job['job_id']}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script

    starts = {r: [e for e in events(run_dir / "a", r) if e["event"] == "start"][0] for r in (0, 1)}
    assert starts[0]["host"] == "mn1" and starts[1]["host"] == "mn2", starts
    for rank, s in starts.items():
        assert (s["rank"], s["world_size"], s["local_rank"], s["local_world_size"]) == (rank, 2, 0, 1), s
        assert s["lws_env"] == "1", s
        assert s["master_addr"] == "mn1" and s["job_id"] == job["job_id"], s
    assert starts[0]["master_port"] == starts[1]["master_port"]
    for rank in (0, 1):  # both ranks trained to the end together (gloo across the two nodes)
        assert [e["event"] for e in events(run_dir / "a", rank)][-1] == "end"
    assert json.loads((run_dir / "a" / "export" / "config.json").read_text())["world_size"] == 2
    for task, host in ((0, "mn1"), (1, "mn2")):
        log = (run_dir / "slurm" / "a" / f"{job['job_id']}_{task}_log.out").read_text()
        assert f"rank {task}/2 local 0/1 master mn1:" in log and f"host {host}" in log, log[-2000:]


@pytest.fixture(scope="module")
def two_node_smoke(two_node_cluster, tmp_path_factory):
    """The whole smoke experiment, every training stage on both nodes (one rank per node)."""
    run_dir = tmp_path_factory.mktemp("smoke2n") / "run"
    launch(
        two_node_cluster,
        "--config",
        SMOKE,
        f"run_dir={run_dir}",
        "resources.nodes=2",
        "resources.tasks_per_node=1",
        "resources.mem_gb=1",
    )
    jobs = jobs_of(run_dir)
    return run_dir, jobs, two_node_cluster.wait_jobs([j["job_id"] for j in jobs.values()], timeout=600)


def launcher_line(job: dict, task: int) -> tuple:
    """(rank, world, local rank, local world, master, host) from a task's `[launcher] ...` line."""
    log = Path(job["stdout"]).with_name(f"{job['job_id']}_{task}_log.out").read_text()
    where = re.search(r"\[launcher\] \S+: rank (\d)/(\d) local (\d)/(\d) master (\S+):\d+ .* host (\S+)", log)
    assert where, f"task {task}: no launcher line\n{log[-2000:]}"
    return where.groups()


def test_smoke_experiment_across_two_nodes(two_node_cluster, two_node_smoke):
    """data -> pretrain -> transition -> distill (teacher and student in ZeRO-3 across mn1 and mn2) ->
    evaluate: each training job on both nodes, rank 0 on mn1 (the master), rank 1 on mn2."""
    cluster = two_node_cluster
    run_dir, jobs, final = two_node_smoke
    for name, job in jobs.items():
        assert final[job["job_id"]]["JobState"] == "COMPLETED", (
            f"{name}: {final[job['job_id']]}\n{job_logs(job)}\n{cluster.log_tails()}"
        )
    trained = [name for name, job in jobs.items() if job["kind"] == "train"]
    assert trained == ["pretrain", "transition", "distill"], list(jobs)
    order = sorted(jobs, key=lambda n: final[jobs[n]["job_id"]]["StartTime"])
    assert order == list(jobs), order  # each after its inputs (afterok chains)
    for name, job in jobs.items():
        record = final[job["job_id"]]
        if job["kind"] != "train":
            assert record["NumNodes"] == "1", (name, record)
            continue
        assert job["num_tasks"] == 2 and record["NodeList"] == "mn[1-2]", (name, record)
        for task, host in ((0, "mn1"), (1, "mn2")):
            assert launcher_line(job, task) == (str(task), "2", "0", "1", "mn1", host), (name, task)
        assert (run_dir / name / "export" / "config.json").is_file(), name
        assert list((run_dir / name / "checkpoints").iterdir()), name
        scalars = tensorboard_scalars(run_dir / name / "tensorboard")
        assert scalars.get("train/loss"), f"{name}: no train/loss in {sorted(scalars)}"
    assert json.loads((run_dir / "evaluate" / "results.json").read_text())


def test_fsdp_stage_across_two_nodes(two_node_cluster, two_node_smoke, tmp_path):
    """The FSDP2 engine under SLURM across both nodes (srun tasks, no torchrun): the smoke transition
    from the smoke LoopLM, one rank per node, its TensorBoard loss, an export that loads as MELT."""
    from pipeline.models import MeltForCausalLM

    smoke_dir, jobs, final = two_node_smoke
    assert final[jobs["pretrain"]["job_id"]]["JobState"] == "COMPLETED"
    stage = {
        "kind": "train",
        "config": str(REPO / "configs/smoke/fsdp/transition.yaml"),
        "overrides": {
            "data.path": str(smoke_dir / "data" / "train"),
            "model.init_from": str(smoke_dir / "pretrain" / "export"),
        },
    }
    exp = yaml.safe_load(SMOKE.read_text())
    exp.update(name="fsdp-two-nodes", run_dir=str(tmp_path / "run"), stages={"transition": stage})
    exp["resources"].update(nodes=2, tasks_per_node=1, mem_gb=1)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    launch(two_node_cluster, "--config", cfg)
    job = jobs_of(tmp_path / "run")["transition"]
    done = two_node_cluster.wait_jobs([job["job_id"]], timeout=600)[job["job_id"]]
    assert done["JobState"] == "COMPLETED", f"{done}\n{job_logs(job)}\n{two_node_cluster.log_tails()}"
    assert done["NodeList"] == "mn[1-2]", done
    for task, host in ((0, "mn1"), (1, "mn2")):
        assert launcher_line(job, task) == (str(task), "2", "0", "1", "mn1", host), task
    stage_dir = tmp_path / "run" / "transition"
    assert tensorboard_scalars(stage_dir / "tensorboard").get("train/loss")
    log = Path(job["stdout"]).read_text() + Path(job["stderr"]).read_text()
    assert "fsdp" in log.lower(), log[-2000:]
    melt = MeltForCausalLM.from_pretrained(stage_dir / "export")
    assert melt.config.model_type == "melt" and melt.config.alpha == 1.0


def rerun_smoke_stage(
    tmp_path: Path, smoke_dir: Path, name: str, env: dict[str, str], then: Optional[dict] = None
) -> Path:
    """An experiment of one smoke stage, its inputs from the `two_node_smoke` run, on both nodes (and the
    stages `then`, after it)."""
    exp = yaml.safe_load(SMOKE.read_text())
    inputs = exp["stages"][name].pop("inputs")
    stage = dict(exp["stages"][name], overrides={key: str(smoke_dir / path) for key, path in inputs.items()})
    exp.update(name=f"rerun-{name}", run_dir=str(tmp_path / "run"), stages={name: stage, **(then or {})})
    exp["resources"].update(nodes=2, tasks_per_node=1, mem_gb=1)
    exp["resources"]["env"].update(env)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    return cfg


def wait_for_file(path: Path, cluster, job: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert cluster.queued_jobs([job["job_id"]]), f"the job ended before {path.name} appeared\n{job_logs(job)}"
        assert time.time() < deadline, f"no {path} after {timeout:.0f}s\n{job_logs(job)}"
        time.sleep(0.2)


def train_losses(stage_dir: Path) -> dict[int, float]:
    """Step -> loss from TensorBoard (a rerun's records of a step replace the earlier attempt's)."""
    return {s.step: s.value for s in tensorboard_scalars(stage_dir / "tensorboard")["train/loss"]}


def assert_resumed_like_the_uninterrupted_run(cluster, job: dict, stage_dir: Path, reference_dir: Path) -> str:
    """The job completed on mn[1-2] after one requeue, its rerun resumed from the step-4 checkpoint, and
    its losses equal the uninterrupted run's at every step. Rank 0's log of both attempts."""
    done = cluster.wait_jobs([job["job_id"]], timeout=300)[job["job_id"]]
    assert done["JobState"] == "COMPLETED", f"{done}\n{job_logs(job)}\n{cluster.log_tails()}"
    assert done["Restarts"] == "1" and done["NodeList"] == "mn[1-2]", done
    rank0 = Path(job["stdout"]).read_text() + Path(job["stderr"]).read_text()  # both attempts (append mode)
    assert "attempt 2 host mn1" in rank0, job_logs(job)
    assert re.search(r"resumed from \S+step_00000004 at step 4", rank0), job_logs(job)
    resumed, reference = train_losses(stage_dir), train_losses(reference_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, 13)), (sorted(resumed), sorted(reference))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)
    return rank0


def test_preempted_transition_requeues_and_resumes_across_two_nodes(two_node_cluster, two_node_smoke, tmp_path):
    """USR2 (a time limit or a preemption) while rank 0 holds after step 5: submitit requeues the job, the
    rerun on mn[1-2] resumes from the step-4 checkpoint, the loss curve is the uninterrupted one's, and
    the stage after it waits for the requeued job and runs (its afterok dependency survives the requeue)."""
    cluster = two_node_cluster
    smoke_dir, jobs, final = two_node_smoke
    assert final[jobs["transition"]["job_id"]]["JobState"] == "COMPLETED"
    held = tmp_path / "held"
    cfg = rerun_smoke_stage(
        tmp_path,
        smoke_dir,
        "transition",
        {"MELT_DEBUG_KILL": "hold@5", "MELT_DEBUG_KILL_ONCE": str(held)},
        then={"after": toy(steps=1, input="{transition/export}")},
    )
    launch(cluster, "--config", cfg)
    run = jobs_of(tmp_path / "run")
    job = run["transition"]
    again = launch(cluster, "--resume-from", tmp_path / "run", check=False)  # a run still going is not relaunched
    assert again.returncode == 2 and "still queued or running" in again.stderr, again.stderr
    wait_for_file(held, cluster, job)
    cluster.call("scancel", "--signal=USR2", job["job_id"], check=True)
    rank0 = assert_resumed_like_the_uninterrupted_run(
        cluster, job, tmp_path / "run" / "transition", smoke_dir / "transition"
    )
    assert "preempted or timed out, requeueing" in rank0, job_logs(job)
    assert not list(Path(job["stdout"]).parent.glob("*_requeued_node_failure"))  # submitit's requeue only
    after = cluster.wait_jobs([run["after"]["job_id"]], timeout=120)[run["after"]["job_id"]]
    assert after["JobState"] == "COMPLETED", f"{after}\n{job_logs(run['after'])}"
    started = min(e["time"] for e in events(tmp_path / "run" / "after", 0) if e["event"] == "start")
    assert started > (tmp_path / "run" / "transition" / "export" / "config.json").stat().st_mtime


def test_node_failure_mid_distill_requeues_and_resumes(two_node_cluster, two_node_smoke, tmp_path):
    """Node mn2 dies mid-distill (slurmd, slurmstepd and its rank SIGKILLed by pid) and is back before SLURM
    marks it DOWN: srun loses the step, the batch script requeues the job (launchers/requeue.py), the
    rerun on mn[1-2] resumes from the step-4 checkpoint, and its loss curve equals the uninterrupted one's."""
    cluster = two_node_cluster
    smoke_dir, jobs, final = two_node_smoke
    assert final[jobs["distill"]["job_id"]]["JobState"] == "COMPLETED"
    fired = tmp_path / "node-failure-fired"
    # rank 1 (on mn2) stops answering after step 5, once: step 4's checkpoint is complete by then
    cfg = rerun_smoke_stage(
        tmp_path, smoke_dir, "distill", {"MELT_DEBUG_KILL": "lose_rank@5", "MELT_DEBUG_KILL_ONCE": str(fired)}
    )
    launch(cluster, "--config", cfg)
    job = jobs_of(tmp_path / "run")["distill"]
    wait_for_file(fired, cluster, job)
    assert cluster.kill_node("mn2"), "no process of mn2 to kill"
    cluster.start_node("mn2")  # back long before SlurmdTimeout: SLURM never marks it DOWN
    rank0 = assert_resumed_like_the_uninterrupted_run(cluster, job, tmp_path / "run" / "distill", smoke_dir / "distill")
    assert "requeued: the step ended with status" in rank0, job_logs(job)
    folder = Path(job["stdout"]).parent
    assert [p.name for p in folder.glob("*_requeued_node_failure")] == [f"{job['job_id']}_0_requeued_node_failure"]
    assert (tmp_path / "run" / "distill" / "export" / "config.json").is_file()
