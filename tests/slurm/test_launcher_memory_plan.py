"""The launcher's memory plan (launchers/memory.py): `--dry-run` prints each GPU train stage's plan,
and a launch with a stage that does not fit is refused before anything is submitted (no cluster
needed: the refusal comes before sbatch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launchers import slurm

REPO = Path(__file__).resolve().parents[2]


def experiment(run_dir: Path, distill_gpu_memory_gb: float = 80) -> dict:
    """data (4096 -> 64-token sequences) -> pretrain on CPU -> transition and distill on 2 GPUs."""
    return {
        "name": "plan-test",
        "run_dir": str(run_dir),
        "resources": {"nodes": 1, "gpus_per_node": 2, "time": 30},
        "stages": {
            "data": {"kind": "data_prep", "args": ["text", "--dataset", "/nowhere", "--seq-len", 64]},
            "pretrain": {
                "kind": "train",
                "config": "configs/smoke/pretrain.yaml",
                "inputs": {"data.path": "data"},
                "resources": {"gpus_per_node": 0, "tasks_per_node": 2},
            },
            "transition": {
                "kind": "train",
                "config": "configs/smoke/transition.yaml",
                "overrides": {"data.micro_batch_size": 2},
                "inputs": {"data.path": "data", "model.init_from": "pretrain/export"},
            },
            "distill": {
                "kind": "train",
                "config": "configs/smoke/distill.yaml",
                "overrides": {"data.micro_batch_size": 2},
                "inputs": {
                    "data.path": "data",
                    "model.init_from": "transition/export",
                    "teacher.init_from": "pretrain/export",
                },
                "resources": {"gpu_memory_gb": distill_gpu_memory_gb},
            },
        },
    }


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.chdir(REPO)


def write(tmp_path: Path, **kwargs) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "run", **kwargs), sort_keys=False))
    return path


def test_dry_run_prints_the_memory_plan_of_each_gpu_train_stage(tmp_path, in_repo, capsys):
    cfg = write(tmp_path, distill_gpu_memory_gb=0.0011)
    assert slurm.main(["--config", str(cfg), "--dry-run"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "# ===== stage transition: memory plan =====" in out
    assert "# ===== stage distill: memory plan =====" in out
    assert "stage pretrain: memory plan" not in out  # a CPU stage is not planned
    transition = out.split("stage transition: memory plan")[1].split("=====")[1]
    assert "world size 2" in transition and "2 x 64 tokens per micro-step, chunk 8, alpha 0.5" in transition
    assert "stage pretrain's export" in transition  # the architecture of the upstream stage
    assert "sequence length 64 from stage data's --seq-len argument" in transition
    assert "=> fits in 80 GB" in transition
    distill = out.split("stage distill: memory plan")[1].split("=====")[1]
    assert "teacher" in distill and "=> does not fit in 0.0011 GB" in distill
    assert "warning: stage distill does not fit" in captured.err
    assert "#SBATCH --gpus-per-node=2" in out  # the scripts are still printed
    assert not (tmp_path / "run").exists()


def test_launch_refuses_a_stage_that_does_not_fit(tmp_path, in_repo, monkeypatch, capsys):
    cfg = write(tmp_path, distill_gpu_memory_gb=0.0011)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: nothing could be submitted
    assert slurm.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stage distill does not fit" in err and "--ignore-plan" in err and "sbatch" not in err
    assert slurm.main(["--config", str(cfg), "--no-plan"]) == 2  # no plan: on to submission
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "[plan]" not in err
    assert not (tmp_path / "run").exists()


def test_dry_run_says_why_a_stage_is_not_planned(tmp_path, in_repo, capsys):
    raw = experiment(tmp_path / "run")
    raw["stages"]["data"]["args"] = ["text", "--dataset", "/nowhere"]  # no --seq-len, no dataset on disk
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert slurm.main(["--config", str(path), "--dry-run", "--gpu-memory", "40GB"]) == 0
    out = capsys.readouterr().out
    assert "not planned: the sequence length is not in the run config: pass --seq-len" in out
