"""Phase distill on 2 CPU ranks with the real `deepspeed` launcher: a ZeRO-3 student engine and a
ZeRO-3 inference engine for the frozen teacher (gloo).

One straight smoke run (module fixture) is shared by the assertions on logging, partitioning,
the teacher's integrity, checkpoints and export; it is also the reference of the resumption
and the 1-rank normalisation tests. The teacher is a tiny LoopLM trained here in-process on
the counting data (seconds); the student starts from an earlier snapshot of the same training
(a LoopLM checkpoint: MELT with fresh gates), so there is something to distil.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from .launch import REPO, metrics, ok, tensorboard, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DISTILL = "configs/smoke/distill.yaml"
STEPS = 12  # smoke config: 12 steps, a checkpoint every 4, the last 2 kept


@pytest.fixture(scope="module")
def data(tmp_path_factory, token_dataset):
    return token_dataset(tmp_path_factory.mktemp("data") / "train", num_samples=512, seq_len=32, vocab_size=64)


@pytest.fixture(scope="module")
def looplms(tmp_path_factory):
    """(student start, teacher): the smoke LoopLM trained on counting sequences for 40 and 200 steps."""
    import yaml

    from pipeline.models import LoopLMConfig, LoopLMForCausalLM
    from pipeline.training.losses import ouro_stage1_loss

    root = tmp_path_factory.mktemp("looplm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster than two contending
    try:
        torch.manual_seed(0)
        model = LoopLMForCausalLM(LoopLMConfig(**yaml.safe_load((REPO / "configs/model/looplm-tiny.yaml").read_text())))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for step in range(1, 201):
            ids = (torch.randint(0, 64, (16, 1), generator=g) + torch.arange(32)) % 64
            out = model(input_ids=ids, output_loop_logits=True, use_cache=False)
            loss = ouro_stage1_loss(out.loop_logits, out.exit_logits, ids).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (40, 200):
                model.save_pretrained(root / f"step{step}")
    finally:
        torch.set_num_threads(threads)
    return root / "step40", root / "step200"


def distill_args(data, looplms):
    student, teacher = looplms
    return f"data.path={data}", f"model.init_from={student}", f"teacher.init_from={teacher}"


@pytest.fixture(scope="module")
def distill(data, looplms, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    proc = ok(train(DISTILL, run_dir, *distill_args(data, looplms)))
    return run_dir, proc.stdout


def mean(values):
    return sum(values) / len(values)


def test_distill_trains_logs_every_loss_and_partitions_both_models(distill):
    run_dir, stdout = distill
    assert "[distill] step 12/12 loss" in stdout and "teacher unchanged: 27 tensors match" in stdout
    assert "unknown inputs or outputs type" not in stdout  # ZeRO-3's hooks see every tensor of the outputs
    tb = tensorboard(run_dir)
    tags = set(tb.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/align",
        "train/align/layer0",
        "train/align/layer1",
        "train/kl",
        "train/kl_loop1",
        "train/kl_loop2",
        "train/ce",
        "train/ce_loop1",
        "train/ce_loop2",
        "perf/teacher_tokens_per_s",
        "perf/student_tokens_per_s",
        "perf/teacher_forward_s",
        "perf/student_forward_backward_s",
        "perf/tokens_per_s",
        "memory/rss_bytes",
        "train/grad_norm",
        "lr/gates",
        "lr/attention",
        "lr/other",
    }
    expected |= {f"gates/layer{layer}/{stat}" for layer in (0, 1) for stat in ("mean", "min", "max")}
    assert expected <= tags, sorted(expected - tags)
    series = {tag: [e.value for e in tb.Scalars(tag)] for tag in expected}
    assert all(len(v) == STEPS for v in series.values())
    assert [e.step for e in tb.Scalars("train/align")] == list(range(1, STEPS + 1))
    # the alignment error and the KL go down; the total is w_attn * align + w_kd * kl (w_ce = 0)
    for tag, ratio in (("train/align", 0.8), ("train/kl", 0.95), ("train/loss", 0.9)):
        first, last = mean(series[tag][:3]), mean(series[tag][-3:])
        assert last < ratio * first and series[tag][-1] < series[tag][0], (tag, series[tag])
    for step in range(STEPS):
        assert series["train/loss"][step] == pytest.approx(
            series["train/align"][step] + series["train/kl"][step], rel=1e-4
        )
        assert series["train/align"][step] == pytest.approx(
            mean([series["train/align/layer0"][step], series["train/align/layer1"][step]]), rel=1e-4
        )
    assert all(
        0 <= lo <= m <= hi <= 1
        for lo, m, hi in zip(series["gates/layer0/min"], series["gates/layer0/mean"], series["gates/layer0/max"])
    )
    assert all(v > 0 for v in series["perf/teacher_tokens_per_s"] + series["perf/student_tokens_per_s"])
    # the same records in metrics.jsonl
    records = metrics(run_dir)
    assert [r["train/kl_loop2"] for r in records] == pytest.approx(series["train/kl_loop2"], rel=1e-6)
    # both models partitioned: each rank holds about half of each; the teacher has no optimizer state
    stats = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key, owner in (("student", None), ("teacher", "teacher")):
        parts = [s if owner is None else s[owner] for s in stats]
        total = parts[0]["total_numel"]
        assert total > 20_000 and parts[1]["total_numel"] == total
        for part in parts:
            assert part["world_size"] == 2 and abs(part["local_numel"] - total / 2) <= 0.02 * total, (key, part)
        assert sum(p["local_numel"] for p in parts) >= total
    assert all(s["teacher"]["optimizer_state_bytes"] == 0 and s["teacher"]["master_bytes"] == 0 for s in stats)
    assert all(s["optimizer_state_bytes"] >= 2 * 4 * s["local_numel"] for s in stats)
    assert stats[0]["teacher"]["total_numel"] == stats[0]["total_numel"] - sum(  # the student adds the gates
        t.numel() for n, t in load_file(run_dir / "export" / "model.safetensors").items() if ".kv_gate." in n
    )


def test_teacher_weights_are_unchanged_bit_for_bit(distill, looplms):
    """What the teacher engine holds at the end (gathered from both ranks' partitions by the trainer,
    sha256 per tensor) is the teacher checkpoint's content, read here independently."""
    run_dir, _ = distill
    report = json.loads((run_dir / "teacher_check.json").read_text())
    checkpoint = load_file(looplms[1] / "model.safetensors")
    assert set(report["tensors"]) == set(checkpoint) and len(checkpoint) == 27
    for name, tensor in checkpoint.items():
        digest = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert report["tensors"][name]["held_sha256"] == digest, name
        assert report["tensors"][name]["shape"] == list(tensor.shape)
    assert report["unchanged"] and report["changed"] == []
    # and the student did move away from its start: distillation is not a no-op
    start = load_file(looplms[0] / "model.safetensors")
    exported = load_file(run_dir / "export" / "model.safetensors")
    assert not torch.equal(
        exported["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )


def test_checkpoints_hold_the_student_only_and_the_export_is_melt(distill):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import MeltForCausalLM

    run_dir, _ = distill
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000008", "step_00000012"]
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="step_00000012")
    exported = load_file(run_dir / "export" / "model.safetensors")
    assert set(recovered) == set(exported)
    for name, tensor in recovered.items():
        assert torch.equal(exported[name], tensor), name
    student_numel = json.loads((run_dir / "ranks" / "rank0.json").read_text())["total_numel"]
    assert sum(t.numel() for t in recovered.values()) == student_numel  # no teacher tensor in the checkpoint
    for tag in ("step_00000008", "step_00000012"):
        files = sorted(p.name for p in (root / tag).iterdir())
        assert files == [
            "COMPLETE",
            "trainer_state.json",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    state = json.loads((root / "step_00000012" / "trainer_state.json").read_text())
    assert state["phase"] == "distill" and state["step"] == STEPS
    model = MeltForCausalLM.from_pretrained(run_dir / "export").eval()
    assert model.config.alpha == 1.0 and model.config.chunk_size == 8 and model.config.gate == "elementwise"
    assert json.loads((run_dir / "export" / "export_info.json").read_text())["phase"] == "distill"
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], prompt)


def test_stop_and_rerun_gives_identical_losses(distill, data, looplms, tmp_path):
    """N/2 steps, stop, rerun (the teacher is rebuilt from teacher.init_from): the straight run's
    losses and metrics, bit for bit. The first half keeps the teacher's partitions offloaded to CPU
    memory (teacher.offload_params), which changes where they live, not what they compute."""
    reference = metrics(distill[0])
    run_dir = tmp_path / "run"
    first = ok(
        train(DISTILL, run_dir, *distill_args(data, looplms), "schedule.stop_at_step=6", "teacher.offload_params=true")
    )
    assert "stopped at step 6 of 12" in first.stdout and not (run_dir / "export").exists()
    assert "(parameters offloaded to CPU)" in first.stdout
    second = ok(train(DISTILL, run_dir, *distill_args(data, looplms)))
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    got = metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, reference):
        for key in (
            "train/loss",
            "train/align",
            "train/kl",
            "train/kl_loop1",
            "train/align/layer1",
            "train/ce",
            "gates/layer1/mean",
            "train/grad_norm",
        ):
            assert mine[key] == theirs[key], (mine["step"], key)
    assert json.loads((run_dir / "teacher_check.json").read_text())["unchanged"]


def test_one_rank_with_more_accumulation_matches_two_ranks(distill, data, looplms, tmp_path):
    """Every loss is normalised by the global token count: 1 rank x 4 micro-steps = 2 ranks x 2."""
    reference = metrics(distill[0])
    run_dir = tmp_path / "run"
    ok(
        train(
            DISTILL,
            run_dir,
            *distill_args(data, looplms),
            "schedule.stop_at_step=3",
            launcher=False,
            env={"OMP_NUM_THREADS": "1"},
        )
    )  # one process: two threads would contend with the others
    got = metrics(run_dir)
    assert len(got) == 3
    for mine, theirs in zip(got, reference):
        for key in ("train/loss", "train/align", "train/kl", "train/ce", "train/align/layer0", "train/grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    stats = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    assert (
        stats["local_numel"] == stats["total_numel"]
        and stats["teacher"]["local_numel"] == stats["teacher"]["total_numel"]
    )
