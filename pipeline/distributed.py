"""Where this process sits in the job: one function for every launcher (docs/architecture.md#5-distributed-environment).

`resolve_distributed_env()` reads the environment that the `deepspeed` launcher,
`torchrun` or SLURM (srun / submitit) set up and returns a `DistEnv`;
`DistEnv.export()` writes the variables torch.distributed and DeepSpeed read
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

- deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*, and LOCAL_SIZE (not
  LOCAL_WORLD_SIZE, which mosaicml-streaming needs: we derive it).
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*.
- SLURM / submitit: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE or
  SLURM_TASKS_PER_NODE (+ SLURM_NODEID), the master is the first host of
  `scontrol show hostnames $SLURM_JOB_NODELIST`, the port is derived from the job id.
- nothing: a single process on 127.0.0.1.

CUDA_VISIBLE_DEVICES is never touched: DeepSpeed selects the device from LOCAL_RANK.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed", "torchrun", "slurm" or "single"

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environ(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self, environ: Optional[dict] = None) -> None:
        (os.environ if environ is None else environ).update(self.as_environ())


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Parse SLURM_TASKS_PER_NODE ("4(x2),3" means 4, 4, 3) and return node `node_id`'s count."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def scontrol_first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    hosts = out.stdout.split()
    if not hosts:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed no host")
    return hosts[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_distributed_env(
    environ: Optional[Mapping[str, str]] = None, first_host: Callable[[str], str] = scontrol_first_host
) -> DistEnv:
    """Rank, world size, local rank/world size and master address of this process.

    `environ` defaults to os.environ; `first_host` maps a SLURM nodelist to its first
    host (tests pass a stub instead of calling scontrol).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher or torchrun (also inside SLURM)
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        if "LOCAL_WORLD_SIZE" in env:
            local_world, launcher = _int(env, "LOCAL_WORLD_SIZE"), "torchrun"
        elif "LOCAL_SIZE" in env:
            local_world, launcher = _int(env, "LOCAL_SIZE"), "deepspeed"
        else:
            local_world, launcher = world, "torchrun"
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    elif "SLURM_PROCID" in env:
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "SLURM_NTASKS_PER_NODE" in env:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE")
        elif "SLURM_TASKS_PER_NODE" in env:
            node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            local_world = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], node_id)
        else:
            local_world = world
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            master_addr = first_host(nodelist) if nodelist else "127.0.0.1"
        if "MASTER_PORT" in env:
            master_port = _int(env, "MASTER_PORT")
        else:  # the same on every task of the job, different between concurrent jobs
            master_port = 20000 + (_int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 0)
    else:
        launcher, rank, world, local_rank, local_world = "single", 0, 1, 0, 1
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()

    problems = []
    if world < 1:
        problems.append(f"world size {world} < 1")
    if not 0 <= rank < world:
        problems.append(f"rank {rank} outside [0, {world})")
    if not 0 <= local_rank < max(local_world, 1):
        problems.append(f"local rank {local_rank} outside [0, {local_world})")
    if problems:
        raise ValueError(f"inconsistent distributed environment ({launcher}): " + "; ".join(problems))
    return DistEnv(rank, world, local_rank, local_world, master_addr, master_port, launcher)
