"""The planner's ZeRO-3 state per rank against a real 2-rank DeepSpeed ZeRO-3 run on CPU (fp32, gloo):
the trainer's engine takes one training step of a tiny LoopLM and builds a frozen teacher as the
distill phase does; each rank reports the bytes DeepSpeed holds (tests/distributed/zero_state_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from .launch import DEEPSPEED, REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    total_ut_steps=2,
    max_position_embeddings=64,
)


def tiny_run_config(run_dir: str) -> dict:
    from pipeline.training.config import load_yaml_with_includes

    ds = load_yaml_with_includes(REPO / "configs/deepspeed/zero3_cpu.yaml")
    # small buckets so that the partitions, not the buckets, dominate; norms (64 elements) persistent
    ds["zero_optimization"].update(
        reduce_bucket_size=20000, stage3_prefetch_bucket_size=20000, stage3_param_persistence_threshold=64
    )
    return {
        "run_dir": run_dir,
        "seed": 0,
        "model": {"config": MODEL},
        "data": {"path": "unused", "micro_batch_size": 2, "global_batch_size": 4},
        "phase": {"name": "pretrain"},
        "schedule": {"total_steps": 2},
        "engine": {"precision": "fp32", "deepspeed": ds},
    }


def run_workers(tmp_path, raw: dict, ranks: int = 2) -> list[dict]:
    from pipeline.distributed import free_port

    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    out = tmp_path / "held.json"
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "tests.distributed.zero_state_worker",
        str(out),
        str(config),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_planned_zero3_state_matches_two_real_ranks(tmp_path):
    from pipeline.models import LoopLMConfig, LoopLMForCausalLM
    from pipeline.planning.inputs import step_inputs
    from pipeline.planning.planner import count_models
    from pipeline.planning.state import ZeroSettings, count_model, zero3_state
    from pipeline.training.config import validate_run_config

    raw = tiny_run_config(str(tmp_path / "run"))
    held = run_workers(tmp_path, raw)
    assert [h["rank"] for h in held] == [0, 1]

    cfg = validate_run_config(raw)
    student, _ = count_models(cfg, step_inputs(cfg, seq_len=32))
    with torch.device("meta"):
        teacher = count_model(LoopLMForCausalLM(LoopLMConfig(**MODEL)))
    planned = zero3_state(student, teacher, 2, torch.float32, ZeroSettings.from_ds_config(cfg.engine.deepspeed))
    assert planned.params < student.total * 4 * 0.6  # really sharded (plus the persistent norms)
    for key in ("params", "grads", "optimizer", "teacher"):
        real = max(h[key] for h in held)
        assert abs(getattr(planned, key) - real) <= 0.10 * real, (key, getattr(planned, key), held)
    # DeepSpeed keeps a separate fp32 master partition even in an fp32 run; Adam's moments are twice it
    for h in held:
        assert h["master"] == h["grad_partitions"] and h["optimizer"] == 3 * h["master"], h
        assert h["partition_stats"]["master_bytes"] == h["master"]
