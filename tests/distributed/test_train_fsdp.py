"""The trainer on 2 CPU ranks with torchrun and the FSDP2 engine (`engine.name=fsdp`, gloo).

Runs shared between assertions (module-scoped fixtures): a straight smoke pretrain
(checkpoints every 3 steps, the last 3 kept; the reference of the resumption test), a smoke
transition from a fresh tiny LoopLM (also run for 4 steps by the DeepSpeed engine, from the
same checkpoint, same seed and data: the engines must agree), and a smoke distill whose
student is that transition's export. Activation checkpointing is on in the FSDP runs (it
does not change the numbers: the DeepSpeed comparison runs without it).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .launch import REPO, losses, metrics, ok, tensorboard, train, write_tiny_looplm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRETRAIN, TRANSITION, DISTILL = (
    "configs/smoke/pretrain.yaml",
    "configs/smoke/transition.yaml",
    "configs/smoke/distill.yaml",
)
STEPS = 12
FSDP = ("engine.name=fsdp", "engine.activation_checkpointing=true")


def fsdp_train(config, run_dir, *overrides, **kwargs):
    return train(config, run_dir, *FSDP, *overrides, torchrun=True, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory, token_dataset):
    return token_dataset(tmp_path_factory.mktemp("data") / "train", num_samples=512, seq_len=32, vocab_size=64)


@pytest.fixture(scope="module")
def looplm(tmp_path_factory):
    """A fresh tiny LoopLM checkpoint (the smoke model): the transition's init and the distill teacher."""
    return write_tiny_looplm(tmp_path_factory.mktemp("looplm"), seed=3)


@pytest.fixture(scope="module")
def pretrain(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    proc = ok(fsdp_train(PRETRAIN, run_dir, f"data.path={data}", "checkpointing.every=3", "checkpointing.keep_last=3"))
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def deepspeed_first_step(data, tmp_path_factory):
    """The same smoke pretrain, one step under DeepSpeed ZeRO-3 on 1 rank (a plain process) with a
    learning rate of 1e-12: its export holds the initial weights."""
    run_dir = tmp_path_factory.mktemp("deepspeed_first_step") / "run"
    ok(
        train(
            PRETRAIN,
            run_dir,
            f"data.path={data}",
            "schedule.total_steps=1",
            "schedule.warmup_steps=0",
            "schedule.min_lr=0",
            "optimizer.lr=1e-12",
            "logging.tensorboard=false",
            launcher=False,
        )
    )
    return run_dir


@pytest.fixture(scope="module")
def transition(data, looplm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("transition") / "run"
    proc = ok(fsdp_train(TRANSITION, run_dir, f"data.path={data}", f"model.init_from={looplm}"))
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def transition_deepspeed(data, looplm, tmp_path_factory):
    """The DeepSpeed engine on the same transition (also under torchrun), 4 steps."""
    run_dir = tmp_path_factory.mktemp("transition_ds") / "run"
    ok(
        train(
            TRANSITION,
            run_dir,
            f"data.path={data}",
            f"model.init_from={looplm}",
            "schedule.stop_at_step=4",
            torchrun=True,
        )
    )
    return run_dir


@pytest.fixture(scope="module")
def distill(data, looplm, transition, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    proc = ok(
        fsdp_train(
            DISTILL,
            run_dir,
            f"data.path={data}",
            f"model.init_from={transition[0] / 'export'}",
            f"teacher.init_from={looplm}",
        )
    )
    return run_dir, proc.stdout


def assert_decreasing(run_dir):
    loss = [r["train/loss"] for r in metrics(run_dir)]
    assert len(loss) == STEPS
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.05, loss


def assert_halved(stats: list[dict], optimizer: bool = True):
    """Each rank holds about half of the parameters (and the Adam moments of its half only)."""
    total = stats[0]["total_numel"]
    assert total > 20_000 and all(s["total_numel"] == total for s in stats)
    for s in stats:
        assert s["world_size"] == 2 and abs(s["local_numel"] - total / 2) <= 0.02 * total, s
        assert s["param_bytes"] == 4 * s["local_numel"] and s["master_bytes"] == 0
        assert s["optimizer_state_bytes"] == (2 * 4 * s["local_numel"] if optimizer else 0)
    assert sum(s["local_numel"] for s in stats) == total


def rank_stats(run_dir):
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def dcp_model_state(checkpoint, tmp_path) -> dict[str, torch.Tensor]:
    """The model tensors of a torch.distributed.checkpoint directory, consolidated offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(tmp_path / "full.pt"))
    return torch.load(tmp_path / "full.pt", weights_only=False)["model"]


def test_pretrain_trains_logs_and_shards(pretrain):
    run_dir, stdout = pretrain
    assert_decreasing(run_dir)
    assert "engine fsdp" in stdout and "[pretrain] step 12/12 loss" in stdout and " eta " in stdout
    tb = tensorboard(run_dir)
    tags = set(tb.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ce_loop1",
        "train/ce_loop2",
        "train/exit_entropy",
        "lr/all",
        "train/grad_norm",
        "train/step_applied",
        "perf/tokens_per_s",
        "train/samples_seen",
        "memory/rss_bytes",
    ):
        assert tag in tags, tag
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert "config/text_summary" in tb.Tags()["tensors"]
    assert_halved(rank_stats(run_dir))


def test_same_seed_same_start_whatever_the_engine_and_the_ranks(pretrain, deepspeed_first_step):
    """From scratch, DeepSpeed on 1 rank starts from the weights the seed alone defines (computed here
    without any engine), and FSDP2 on 2 ranks from the same: equal first-step loss and gradient norm.
    (DeepSpeed 1 vs 2 ranks: test_train_deepspeed.py; FSDP2's initial weights: test_fsdp_engine.py.)"""
    from pipeline.models import LoopLMConfig, LoopLMForCausalLM
    from pipeline.training.config import load_run_config
    from pipeline.training.initialization import initialize

    cfg = load_run_config(REPO / PRETRAIN, ["run_dir=/unused", "data.path=/unused"])
    reference = LoopLMForCausalLM(LoopLMConfig(**cfg.model.config))
    initialize(reference, reference._init_weights, cfg.seed)
    exported = load_file(deepspeed_first_step / "export" / "model.safetensors")
    assert set(exported) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-9, msg=key)
    fsdp, deepspeed = metrics(pretrain[0])[0], metrics(deepspeed_first_step)[0]
    assert fsdp["step"] == deepspeed["step"] == 1
    assert fsdp["train/loss"] == pytest.approx(deepspeed["train/loss"], rel=1e-6)
    assert fsdp["train/grad_norm"] == pytest.approx(deepspeed["train/grad_norm"], rel=1e-5)


def test_checkpoints_are_sharded_dcp_complete_and_rotated(pretrain):
    run_dir, _ = pretrain
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000006", "step_00000009", "step_00000012"]
    assert (root / "latest").read_text() == "step_00000012"
    files = {p.name for p in (root / "step_00000012").iterdir()}
    assert {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "client_rank0.pt",
        "client_rank1.pt",
        "COMPLETE",
        "trainer_state.json",
    } <= files
    state = json.loads((root / "step_00000012" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["engine"] == "fsdp"
    assert state["data"]["streaming"]["sample_in_epoch"] == 12 * 16
    saved = [torch.load(root / "step_00000012" / f"client_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r, client in enumerate(c["client"]["trainer"] for c in saved):
        assert client["step"] == 12 and set(client["rng"]) >= {"python", "numpy", "torch"}
        assert client["data"] == state["data"] and client["fingerprint"] == state["fingerprint"]
    assert saved[0]["scheduler"]["last_epoch"] == 12


def test_export_equals_the_checkpoint_and_loads(pretrain, tmp_path):
    from pipeline.models import LoopLMForCausalLM

    run_dir, _ = pretrain
    exported = load_file(run_dir / "export" / "model.safetensors")
    held = dcp_model_state(run_dir / "checkpoints" / "step_00000012", tmp_path)
    assert set(exported) == set(held)
    for name, tensor in held.items():
        assert torch.equal(exported[name], tensor), name
    model = LoopLMForCausalLM.from_pretrained(run_dir / "export").eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], prompt)


def test_half_then_rerun_gives_identical_losses_and_weights(pretrain, data, tmp_path):
    """The straight run's directory cut back to its step-6 checkpoint (`latest` names a tag that is
    gone): the rerun resumes there and reproduces the straight run bit for bit."""
    reference, _ = pretrain
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for tag in ("step_00000009", "step_00000012"):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    shutil.rmtree(run_dir / "export")
    rerun = ok(fsdp_train(PRETRAIN, run_dir, f"data.path={data}", "checkpointing.every=3", "checkpointing.keep_last=3"))
    assert "resumed from" in rerun.stdout and "at step 6" in rerun.stdout
    assert losses(run_dir) == losses(reference)
    assert [e.step for e in tensorboard(run_dir).Scalars("train/loss")] == list(range(1, STEPS + 1))
    got, want = (load_file(d / "export" / "model.safetensors") for d in (run_dir, reference))
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_transition_trains_logs_gates_and_shards(transition):
    from pipeline.models import MeltForCausalLM

    run_dir, stdout = transition
    assert_decreasing(run_dir)
    assert "[transition] step 12/12" in stdout and "alpha 1.000" in stdout
    tags = set(tensorboard(run_dir).Tags()["scalars"])
    assert {"train/alpha", "gates/layer1/mean", "lr/gates", "lr/attention", "lr/other"} <= tags
    assert_halved(rank_stats(run_dir))
    model = MeltForCausalLM.from_pretrained(run_dir / "export")
    assert model.config.alpha == 1.0 and model.config.chunk_size == 8


def test_fsdp_agrees_with_deepspeed(transition, transition_deepspeed):
    """The same transition (same LoopLM checkpoint, seed and data): the first loss is the same up to
    float summation order, the next steps stay close; both log the same TensorBoard scalars."""
    fsdp_run, deepspeed_run = transition[0], transition_deepspeed
    fsdp, deepspeed = metrics(fsdp_run)[:4], metrics(deepspeed_run)
    assert len(deepspeed) == 4
    assert fsdp[0]["train/loss"] == pytest.approx(deepspeed[0]["train/loss"], rel=1e-6)
    for ours, theirs in zip(fsdp, deepspeed):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-4)
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-3)
        assert ours["lr/gates"] == pytest.approx(theirs["lr/gates"], rel=1e-9)
    assert set(tensorboard(fsdp_run).Tags()["scalars"]) == set(tensorboard(deepspeed_run).Tags()["scalars"])


def test_distill_trains_with_a_sharded_frozen_teacher(distill, looplm):
    run_dir, stdout = distill
    assert_decreasing(run_dir)
    assert "[distill] step 12/12" in stdout
    tags = set(tensorboard(run_dir).Tags()["scalars"])
    assert {"train/align", "train/kl", "perf/teacher_tokens_per_s", "gates/layer0/mean"} <= tags
    stats = rank_stats(run_dir)
    assert_halved([{k: v for k, v in s.items() if k != "teacher"} for s in stats])
    assert_halved([s["teacher"] for s in stats], optimizer=False)
    check = json.loads((run_dir / "teacher_check.json").read_text())
    assert check["unchanged"] and len(check["tensors"]) == len(load_file(looplm / "model.safetensors"))
