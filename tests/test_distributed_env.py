"""pipeline.distributed.resolve_distributed_env: one answer per launcher, from environment dicts."""

import pytest

from pipeline.distributed import resolve_distributed_env, slurm_tasks_on_node


def no_scontrol(nodelist):
    raise AssertionError("scontrol must not be called")


def test_deepspeed_launcher_local_size_becomes_local_world_size():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    d = resolve_distributed_env(env, first_host=no_scontrol)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 4, 1, 2)
    assert (d.master_addr, d.master_port, d.launcher, d.num_nodes) == ("node0", 29500, "deepspeed", 2)
    out = dict(env)
    d.export(out)
    assert out["LOCAL_WORLD_SIZE"] == "2" and out["RANK"] == "3" and out["MASTER_PORT"] == "29500"
    assert out["CUDA_VISIBLE_DEVICES"] == "0,1"  # never restricted


def test_torchrun():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RUN_ID": "x",
    }
    d = resolve_distributed_env(env, first_host=no_scontrol)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (1, 2, 1, 2, "torchrun")


def test_launcher_variables_win_inside_a_slurm_allocation():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "2",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    d = resolve_distributed_env(env, first_host=no_scontrol)
    assert (d.rank, d.world_size, d.local_world_size, d.launcher) == (5, 8, 4, "deepspeed")


def test_slurm_srun_with_ntasks_per_node_and_scontrol_master():
    seen = []

    def first_host(nodelist):
        seen.append(nodelist)
        return "gpu-017"

    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu-[017-018]",
        "SLURM_JOB_ID": "123456",
    }
    d = resolve_distributed_env(env, first_host=first_host)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (9, 16, 1, 8, "slurm")
    assert d.master_addr == "gpu-017" and seen == ["gpu-[017-018]"]
    assert d.master_port == 20000 + 123456 % 20000
    out = {}
    d.export(out)
    assert out == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu-017",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_slurm_tasks_per_node_format_and_explicit_master():
    env = {
        "SLURM_PROCID": "8",
        "SLURM_NTASKS": "11",
        "SLURM_LOCALID": "0",
        "SLURM_TASKS_PER_NODE": "4(x2),3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "4000",
    }
    d = resolve_distributed_env(env, first_host=no_scontrol)
    assert (d.local_world_size, d.master_addr, d.master_port) == (3, "n1", 4000)
    assert slurm_tasks_on_node("2", 0) == 2 and slurm_tasks_on_node("4(x2),3", 1) == 4
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        slurm_tasks_on_node("four", 0)


def test_single_process_default():
    d = resolve_distributed_env({}, first_host=no_scontrol)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (0, 1, 0, 1, "single")
    assert d.master_addr == "127.0.0.1" and d.master_port > 0


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 outside"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": "3",
                "SLURM_NTASKS_PER_NODE": "2",
                "MASTER_ADDR": "a",
            },
            "local rank 3 outside",
        ),
    ],
)
def test_inconsistent_environments_are_errors(env, match):
    with pytest.raises(ValueError, match=match):
        resolve_distributed_env(env, first_host=no_scontrol)
