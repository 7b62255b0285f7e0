"""Running the trainer as users do (`deepspeed --num_gpus N pipeline/train.py ...`, or `torchrun
--nproc_per_node N pipeline/train.py ...`) and reading what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def train(
    config: str,
    run_dir: Path,
    *overrides: str,
    ranks: int = 2,
    env: dict | None = None,
    timeout: float = 300,
    launcher: bool = True,
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """Run one training invocation; its own process group, so a SIGKILL from inside ends only it.
    torchrun: launch with torchrun instead of the deepspeed launcher."""
    from pipeline.distributed import free_port

    args = ["--config", str(REPO / config), f"run_dir={run_dir}", *overrides]
    if launcher and torchrun:
        cmd = [
            str(TORCHRUN),
            "--nproc_per_node",
            str(ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(REPO / "pipeline/train.py"),
            *args,
        ]
    elif launcher:
        cmd = [
            str(DEEPSPEED),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            str(REPO / "pipeline/train.py"),
            *args,
        ]
    else:  # one plain process (the trainer's refusals happen before any process group)
        cmd = [sys.executable, str(REPO / "pipeline/train.py"), *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"training timed out after {timeout}s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir)}


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def write_tiny_looplm(path: Path, seed: int = 0) -> Path:
    """A fresh LoopLM checkpoint of the smoke model (configs/model/looplm-tiny.yaml), seeded."""
    import torch
    import yaml

    from pipeline.models import LoopLMConfig, LoopLMForCausalLM

    torch.manual_seed(seed)
    config = LoopLMConfig(**yaml.safe_load((REPO / "configs/model/looplm-tiny.yaml").read_text()))
    LoopLMForCausalLM(config).save_pretrained(path)
    return path
