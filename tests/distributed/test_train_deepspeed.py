"""The trainer on 2 CPU ranks with the real `deepspeed` launcher and ZeRO-3 (gloo).

Runs are shared between assertions: one straight smoke pretrain (the reference for
the resumption tests) and one smoke transition, each a module-scoped fixture.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from .launch import losses, metrics, ok, snapshot, tensorboard, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRETRAIN, TRANSITION = "configs/smoke/pretrain.yaml", "configs/smoke/transition.yaml"
STEPS = 12  # smoke configs: 12 steps, a checkpoint every 4, the last 2 kept


@pytest.fixture(scope="module")
def data(tmp_path_factory, token_dataset):
    return token_dataset(tmp_path_factory.mktemp("data") / "train", num_samples=512, seq_len=32, vocab_size=64)


@pytest.fixture(scope="module")
def pretrain(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    proc = ok(train(PRETRAIN, run_dir, f"data.path={data}", "checkpointing.export_every=4"))
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def looplm_init(tmp_path_factory):
    """A fresh tiny LoopLM checkpoint (the smoke model), the transition's model.init_from."""
    import yaml

    from pipeline.models import LoopLMConfig, LoopLMForCausalLM

    from .launch import REPO

    torch.manual_seed(0)
    config = LoopLMConfig(**yaml.safe_load((REPO / "configs/model/looplm-tiny.yaml").read_text()))
    path = tmp_path_factory.mktemp("looplm")
    LoopLMForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def transition(data, looplm_init, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("transition") / "run"
    proc = ok(train(TRANSITION, run_dir, f"data.path={data}", f"model.init_from={looplm_init}"))
    return run_dir, proc.stdout


def assert_decreasing(run_dir):
    loss = [r["train/loss"] for r in metrics(run_dir)]
    assert len(loss) == STEPS
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.05, loss


def test_pretrain_trains_logs_and_partitions(pretrain):
    run_dir, stdout = pretrain
    assert_decreasing(run_dir)
    assert "[pretrain] step 12/12 loss" in stdout and " eta " in stdout and "tok/s" in stdout
    tb = tensorboard(run_dir)
    tags = set(tb.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ce_loop1",
        "train/ce_loop2",
        "train/exit_entropy",
        "lr/all",
        "train/grad_norm",
        "perf/tokens_per_s",
        "train/samples_seen",
        "memory/rss_bytes",
    ):
        assert tag in tags, tag
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in tb.Scalars("train/samples_seen")][-1] == STEPS * 16
    assert "config/text_summary" in tb.Tags()["tensors"]
    # parameters really partitioned: each rank holds about half of every tensor
    stats = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = stats[0]["total_numel"]
    assert total > 20_000 and stats[1]["total_numel"] == total
    for s in stats:
        assert s["world_size"] == 2 and abs(s["local_numel"] - total / 2) <= 0.02 * total, s
        assert s["optimizer_state_bytes"] >= 2 * 4 * s["local_numel"]  # Adam moments of the partition only
    assert sum(s["local_numel"] for s in stats) >= total


def test_checkpoints_are_complete_rotated_and_latest_is_atomic(pretrain):
    run_dir, _ = pretrain
    root = run_dir / "checkpoints"
    tags = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tags == ["step_00000008", "step_00000012"]
    assert (root / "latest").read_text() == "step_00000012"
    for tag in tags:
        files = {p.name for p in (root / tag).iterdir()}
        assert {
            "COMPLETE",
            "trainer_state.json",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        } <= files
    state = json.loads((root / "step_00000012" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["fingerprint"]["global_batch_size"] == 16
    assert state["data"]["streaming"]["sample_in_epoch"] == 12 * 16
    assert state["data"]["fingerprint"] == state["fingerprint"]
    client = torch.load(root / "step_00000012" / "zero_pp_rank_1_mp_rank_00_model_states.pt", weights_only=False)[
        "trainer"
    ]
    assert client["step"] == 12 and set(client["rng"]) >= {"python", "numpy", "torch"}
    assert client["data"] == state["data"] and client["fingerprint"] == state["fingerprint"]


def test_intermediate_exports_hold_the_weights_of_their_step(pretrain):
    """checkpointing.export_every=4: exports/step_4 and step_8 (the end's is export/), each the
    step's consolidated weights, saying its step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import LoopLMForCausalLM

    run_dir, _ = pretrain
    exports = run_dir / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["step_00000004", "step_00000008"]
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000008")
    exported = load_file(exports / "step_00000008" / "model.safetensors")
    assert set(exported) == set(recovered) and all(torch.equal(exported[n], t) for n, t in recovered.items())
    assert json.loads((exports / "step_00000004" / "export_info.json").read_text())["step"] == 4
    early = load_file(exports / "step_00000004" / "model.safetensors")
    assert not all(torch.equal(early[n], t) for n, t in recovered.items())  # another step's weights
    LoopLMForCausalLM.from_pretrained(exports / "step_00000004")  # a complete export


@pytest.mark.parametrize("which", ["pretrain", "transition"])
def test_export_equals_zero_to_fp32_and_generates(which, request):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import LoopLMForCausalLM, MeltForCausalLM

    run_dir, _ = request.getfixturevalue(which)
    export = run_dir / "export"
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000012")
    exported = load_file(export / "model.safetensors")
    assert set(exported) == set(recovered)
    for name, tensor in recovered.items():
        assert torch.equal(exported[name], tensor), name
    cls = LoopLMForCausalLM if which == "pretrain" else MeltForCausalLM
    model = cls.from_pretrained(export).eval()
    assert json.loads((export / "export_info.json").read_text())["step"] == STEPS
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], prompt)
    if which == "transition":
        assert model.config.alpha == 1.0 and model.config.chunk_size == 8


def test_kill_mid_save_then_rerun_gives_identical_losses(pretrain, data, tmp_path):
    """SIGKILLed (the whole process group, as a lost node) while saving step 8, then rerun: the rerun
    resumes from the last complete checkpoint and the loss curve is the uninterrupted run's, bit for bit.
    (A clean stop at schedule.stop_at_step and its rerun: test_train_distill.py.)"""
    reference = losses(pretrain[0])
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    # 1. killed in the middle of saving step 8: files written, never marked complete
    killed = train(PRETRAIN, run_dir, f"data.path={data}", env={"MELT_DEBUG_KILL": "mid_save@8"})
    assert killed.returncode != 0 and "resumed from" not in killed.stdout
    assert (root / "step_00000008").is_dir() and not (root / "step_00000008" / "COMPLETE").exists()
    assert (root / "latest").read_text() == "step_00000004"
    # 2. rerun: ignores the incomplete step 8, resumes from 4, runs to the end
    final = ok(train(PRETRAIN, run_dir, f"data.path={data}"))
    assert "at step 4" in final.stdout
    assert losses(run_dir) == reference
    assert (root / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000008", "step_00000012"]
    assert (root / "step_00000008" / "COMPLETE").is_file()  # the rerun saved step 8 again, completely
    tb_steps = [e.step for e in tensorboard(run_dir).Scalars("train/loss")]
    assert tb_steps == list(range(1, STEPS + 1))  # the redone steps replace the killed run's records
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_data_fingerprint_mismatch_is_refused_and_nothing_is_written(pretrain, data, token_dataset, tmp_path):
    run_dir, _ = pretrain
    before = snapshot(run_dir)
    other = token_dataset(tmp_path / "other", num_samples=64, seq_len=32, vocab_size=64, seed=5)
    proc = train(PRETRAIN, run_dir, f"data.path={other}", "data.shuffle_seed=99", launcher=False, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "refusing to resume" in proc.stdout
    for field in ("seed", "index_sha256"):  # every difference is named
        assert f"{field}: checkpoint" in proc.stdout, proc.stdout[-3000:]
    assert snapshot(run_dir) == before


def test_one_rank_with_more_accumulation_matches_two_ranks(pretrain, data, tmp_path):
    """Losses are normalised by the global token count: 1 rank x 4 micro-steps = 2 ranks x 2."""
    reference = losses(pretrain[0])
    run_dir = tmp_path / "run"
    ok(train(PRETRAIN, run_dir, f"data.path={data}", "schedule.stop_at_step=4", ranks=1))
    got = losses(run_dir)
    for step in range(1, 5):
        assert got[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5)
    stats = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    assert stats["local_numel"] == stats["total_numel"]


def test_transition_trains_and_logs_alpha_and_gates(transition):
    run_dir, stdout = transition
    assert_decreasing(run_dir)
    assert "[transition] step 12/12" in stdout and "alpha 1.000" in stdout
    tb = tensorboard(run_dir)
    tags = set(tb.Tags()["scalars"])
    alpha = [e.value for e in tb.Scalars("train/alpha")]
    assert alpha[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]) and set(alpha[5:]) == {1.0}
    for layer in (0, 1):
        for stat in ("mean", "min", "max"):
            assert f"gates/layer{layer}/{stat}" in tags
        low, mean, high = (tb.Scalars(f"gates/layer{layer}/{s}")[-1].value for s in ("min", "mean", "max"))
        assert 0.0 <= low <= mean <= high <= 1.0
    assert {"lr/gates", "lr/attention", "lr/other", "train/ce_loop2", "train/exit_entropy"} <= tags
    ratio = 1e-2 / 3e-3  # optimizer.groups.gates.lr / optimizer.lr in the smoke config
    assert tb.Scalars("lr/gates")[3].value == pytest.approx(ratio * tb.Scalars("lr/other")[3].value)


def test_nonfinite_loss_stops_naming_step_and_rank(data, tmp_path):
    proc = train(PRETRAIN, tmp_path / "run", f"data.path={data}", "guards.inject_nonfinite_at_step=2")
    assert proc.returncode != 0
    assert "non-finite loss at step 2 (micro-step 1) on rank(s) [0]; stopping" in proc.stdout


def test_a_lost_rank_stops_the_run_with_a_clear_error_not_a_hang(data, tmp_path):
    """Rank 1 stops answering after step 3 (as a hung or unreachable node does): rank 0's next collective
    waits engine.collective_timeout_s, then the run exits 4 naming the cause and the key; the
    checkpoint of step 2 is there to resume from."""
    began = time.time()
    proc = train(
        PRETRAIN,
        tmp_path / "run",
        f"data.path={data}",
        "engine.collective_timeout_s=5",
        "checkpointing.every=2",
        env={"MELT_DEBUG_KILL": "lose_rank@3"},
        torchrun=True,
        timeout=150,
    )
    assert proc.returncode != 0
    assert (
        "error: rank 0: lost contact with another rank" in proc.stdout
        and "engine.collective_timeout_s=5 s" in proc.stdout
        and "exitcode  : 4" in proc.stdout
    ), proc.stdout[-3000:]
    assert time.time() - began < 120  # the timeout, not a hang (the test's own limit would kill it at 150 s)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_nonfinite_skip_and_frozen_parameters(data, looplm_init, tmp_path):
    """guards.nonfinite=skip: the step is skipped and training goes on. trainable=gates: only the gates
    move, the frozen LoopLM weights come out unchanged in the export."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "run"
    ok(
        train(
            TRANSITION,
            run_dir,
            f"data.path={data}",
            f"model.init_from={looplm_init}",
            "phase.trainable=gates",
            "guards.nonfinite=skip",
            "guards.inject_nonfinite_at_step=2",
            "schedule.total_steps=4",
            "schedule.warmup_steps=1",
        )
    )
    records = metrics(run_dir)
    assert [r["train/step_applied"] for r in records] == [1.0, 0.0, 1.0, 1.0]
    assert all(r["train/loss"] == r["train/loss"] for r in records[2:])  # finite again
    init = load_file(looplm_init / "model.safetensors")
    exported = load_file(run_dir / "export" / "model.safetensors")
    for name, tensor in exported.items():
        if ".kv_gate." in name:
            continue
        assert torch.equal(tensor, init[name]), name
    moved = [n for n in exported if n.endswith("kv_gate.proj.weight") and exported[n].abs().max() > 0]
    assert len(moved) == 2
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000004")
    assert set(recovered) == set(exported) and all(torch.equal(recovered[n], exported[n]) for n in exported)
