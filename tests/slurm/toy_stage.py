"""A tiny real training stage for the launcher tests: the mechanics without the cost of the trainer.

    python tests/slurm/toy_stage.py run_dir=DIR [steps=8] [sleep=0.2] [ckpt_every=1] [input=DIR] [fail=true]

Not a mock: every rank resolves its distributed environment with `pipeline.distributed`
(as the trainer does), joins a gloo process group, and they train a linear regression
together (gradients all-reduced), checkpointing every `ckpt_every` steps and resuming from
the latest checkpoint when rerun with the same run_dir. It writes what the launchers'
contract expects of a train stage: `<run_dir>/config.yaml` (schedule.total_steps; JSON is YAML),
`<run_dir>/checkpoints/`, `<run_dir>/metrics.jsonl`, `<run_dir>/export/config.json` (with the final
loss) and, per rank, `<run_dir>/events/rank<r>.jsonl`
(start / resume / end records with the environment it saw). `input=DIR` must hold an
export (config.json). `fail=true` exits with code 3 before training.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


def _args(argv: list[str]) -> dict[str, str]:
    out = {}
    for item in argv:
        if item.startswith("--local_rank") or item.startswith("--local-rank"):
            continue  # the deepspeed launcher adds it; LOCAL_RANK is in the environment
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"toy_stage: argument {item!r} must look like key=value")
        out[key] = value
    return out


def _event(run_dir: Path, who: int, **record) -> None:
    path = run_dir / "events" / f"rank{who}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _args(list(sys.argv[1:] if argv is None else argv))
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from pipeline.distributed import resolve_distributed_env

    env = resolve_distributed_env()
    env.export()
    run_dir = Path(args["run_dir"])
    steps, sleep = int(args.get("steps", 8)), float(args.get("sleep", 0.2))
    ckpt_every = int(args.get("ckpt_every", 1))
    info = dict(
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        pid=os.getpid(),
        local_world_size=env.local_world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        launcher=env.launcher,
        job_id=os.environ.get("SLURM_JOB_ID"),
        restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        lws_env=os.environ.get("LOCAL_WORLD_SIZE"),
        cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        host=os.uname().nodename,
    )
    if env.rank == 0:  # what the trainer writes first: the resolved config (its progress is step / total_steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(json.dumps({"schedule": {"total_steps": steps}}))
    _event(run_dir, env.rank, event="start", **info)
    print(f"toy_stage: rank {env.rank} of {env.world_size} starts", flush=True)
    if "input" in args and not (Path(args["input"]) / "config.json").is_file():
        print(f"toy_stage: input {args['input']} holds no export (config.json)", file=sys.stderr)
        return 4
    if args.get("fail", "false").lower() in ("1", "true", "yes"):
        print("toy_stage: failing as asked (fail=true)", file=sys.stderr, flush=True)
        return 3

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=120))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.1 * torch.randn(
        64, generator=gen, dtype=torch.float64
    )
    xs, ys = x[env.rank :: env.world_size], y[env.rank :: env.world_size]
    w, start = torch.zeros(4, dtype=torch.float64), 0
    ckpt_dir = run_dir / "checkpoints"
    ckpts = sorted(ckpt_dir.glob("step_*.pt"))
    loss = float("nan")
    if ckpts:
        state = torch.load(ckpts[-1])
        w, start, loss = state["w"], state["step"], state["loss"]
        _event(run_dir, env.rank, event="resume", step=start)
    for step in range(start, steps):
        residual = xs @ w - ys
        grad = 2 * xs.T @ residual
        stats = torch.cat([grad, (residual**2).sum().reshape(1), torch.tensor([float(len(ys))], dtype=torch.float64)])
        dist.all_reduce(stats)
        count = stats[-1]
        loss = float(stats[-2] / count)
        w = w - 0.05 * stats[:4] / count
        if env.rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")
            if (step + 1) % ckpt_every == 0 or step + 1 == steps:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                tmp = ckpt_dir / f".step_{step + 1:06d}.pt.tmp"
                torch.save({"w": w, "step": step + 1, "loss": loss}, tmp)
                tmp.replace(ckpt_dir / f"step_{step + 1:06d}.pt")
        dist.barrier()
        time.sleep(sleep)
    export = run_dir / "export"
    if env.rank == 0 and (start < steps or not (export / "config.json").is_file()):
        export.mkdir(parents=True, exist_ok=True)
        (export / "config.json").write_text(
            json.dumps({"final_loss": loss, "steps": steps, "world_size": env.world_size})
        )
    dist.barrier()
    dist.destroy_process_group()
    _event(run_dir, env.rank, event="end", loss=loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
