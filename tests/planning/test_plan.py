"""The memory planner (pipeline/planning, python -m pipeline.plan): fake-tensor step bytes equal real
ones, depth extrapolation equals a direct run, the engine arithmetic, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import plan as plan_cli
from pipeline.planning.inputs import step_inputs, worst_alpha
from pipeline.planning.live_bytes import LiveBytes
from pipeline.planning.report import parse_memory
from pipeline.planning.state import ModelCounts, ZeroSettings, fsdp2_state, zero3_state
from pipeline.planning.step import extrapolate, measure_step
from pipeline.training.config import ConfigError, load_run_config

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    total_ut_steps=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
)
SEQ = 64


@pytest.fixture(scope="module")
def looplm_dir(tmp_path_factory):
    """A LoopLM checkpoint directory with its config.json (the planner reads no weights)."""
    from pipeline.models import LoopLMConfig

    path = tmp_path_factory.mktemp("looplm")
    LoopLMConfig(**TINY).save_pretrained(path)
    return path


def run_config(phase: str, looplm_dir: Path, *overrides: str):
    common = [
        "engine.precision=fp32",
        "engine.activation_checkpointing=true",
        "data.micro_batch_size=2",
        "data.path=/nonexistent/data",
    ]
    if phase == "pretrain":
        common += [f"model.config.{k}={v}" for k, v in TINY.items()]
    else:
        common += [f"model.init_from={looplm_dir}", "phase.chunk_size=16"]
    if phase == "distill":
        common.append(f"teacher.init_from={looplm_dir}")
    return load_run_config(REPO / f"configs/smoke/{phase}.yaml", common + list(overrides))


CASES = {
    "pretrain": ("pretrain", ()),
    "transition_alpha_0.5": ("transition", ()),
    "transition_alpha_1": ("transition", ("phase.alpha.start=1.0",)),
    "distill": ("distill", ()),
}


# ----------------------------------------------------------------------------- step bytes


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_step_bytes_equal_real_step_bytes(case, looplm_dir):
    """(a) The activation peak counted on fake tensors equals the same step on real CPU tensors."""
    phase, extra = CASES[case]
    cfg = run_config(phase, looplm_dir, *extra)
    inputs = step_inputs(cfg, seq_len=SEQ)
    if phase == "transition":
        assert inputs.alpha == (1.0 if extra else 0.5)
    real = measure_step(cfg, inputs=inputs, fake=False)
    fake = measure_step(cfg, inputs=inputs, fake=True)
    assert real.activations > 0 and real.params > 0 and real.grads == real.params
    assert abs(fake.activations - real.activations) <= 0.02 * real.activations, (fake, real)
    assert fake.activations == real.activations and fake.regions == real.regions  # in practice: to the byte
    assert (fake.params, fake.grads, fake.frozen) == (real.params, real.grads, real.frozen)
    if phase == "distill":
        assert real.frozen == real.params - sum(  # the teacher: the student's parameters but the gates
            p.numel() * 4 for n, p in _melt(cfg, inputs).named_parameters() if ".kv_gate." in n
        )
        assert "teacher" in real.regions


def _melt(cfg, inputs):
    from pipeline.planning.step import build_models

    with torch.device("meta"):
        return build_models(cfg, inputs, None)[1]


def test_mid_ramp_alpha_and_no_checkpointing_cost_more(looplm_dir):
    """Mid-ramp, the per-loop keys and values are kept as well; without activation checkpointing
    every chunk's activations are."""
    half, one, off = (
        measure_step(run_config("transition", looplm_dir, *extra), seq_len=32)
        for extra in ((), ("phase.alpha.start=1.0",), ("engine.activation_checkpointing=false",))
    )
    assert one.activations < half.activations < off.activations


@pytest.mark.parametrize(
    "case, depths",
    [
        ("transition_alpha_0.5", (3, 4)),
        pytest.param("distill", (3,), marks=pytest.mark.slow),
        pytest.param("pretrain", (4,), marks=pytest.mark.slow),
    ],
)
def test_depth_extrapolation_equals_a_direct_run(case, depths, looplm_dir):
    """Runs at 1 and 2 layers, extrapolated linearly (region by region), equal direct runs at 3 / 4 layers."""
    phase, extra = CASES[case]
    cfg = run_config(phase, looplm_dir, *extra)
    inputs = step_inputs(cfg, seq_len=SEQ)
    one, two = (measure_step(cfg, inputs=inputs, layers=n) for n in (1, 2))
    for depth in depths:
        direct = measure_step(cfg, inputs=inputs, layers=depth)
        guess = extrapolate(one, two, depth)
        assert (guess.params, guess.grads, guess.frozen) == (direct.params, direct.grads, direct.frozen)
        assert abs(guess.activations - direct.activations) <= 0.02 * direct.activations, (guess, direct)


def test_live_bytes_counts_storages_once_and_frees_them():
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: nothing new
        a.add_(1)  # in place: nothing new
        c = a * 2  # 4000 more
        assert live.current == 8000
        del a, b  # the last references to the first storage
        assert live.current == 4000
    assert live.peak == 8000 and live.current == 4000
    del c
    assert live.current == 0


def test_live_bytes_charges_a_storage_resize():
    with LiveBytes() as live:
        t = torch.empty(0)
        t.resize_(250)  # same storage, now 1000 bytes
        assert live.current == 1000
        del t
    assert live.current == 0 and live.peak == 1000


# ----------------------------------------------------------------------------- inputs, engine arithmetic


def test_worst_alpha_of_the_ramp(looplm_dir):
    assert worst_alpha(run_config("transition", looplm_dir))[0] == 0.5
    assert worst_alpha(run_config("transition", looplm_dir, "phase.alpha.start=1.0"))[0] == 1.0
    assert worst_alpha(run_config("transition", looplm_dir, "phase.alpha.start=0.2", "phase.alpha.end=0.2"))[0] == 0.2


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("141G") == 141 * 10**9 and parse_memory(str(2**33)) == 2**33
    for bad in ("80", "eighty", "80XB"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_memory(bad)


def _counts(layers=4, hidden=8, vocab=16):
    layer = [(hidden, hidden)] * 4 + [(hidden,)] * 2
    shapes = [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]
    inside = [False] + [True] * (len(layer) * layers) + [False, False]
    modules = [vocab * hidden] + [hidden * hidden] * (4 * layers) + [hidden] * (2 * layers + 1) + [vocab * hidden]
    return ModelCounts(
        tuple(shapes),
        tuple([True] * len(shapes)),
        tuple(inside),
        tuple(modules),
        4 * hidden * hidden + 2 * hidden,
        layers,
    )


def test_zero3_state_is_sharded_by_the_world_size():
    counts = _counts()
    zero = ZeroSettings(param_persistence_threshold=0, reduce_bucket_size=0, contiguous_gradients=False)
    one, eight = (zero3_state(counts, counts, w, torch.bfloat16, zero) for w in (1, 8))
    total = counts.total
    assert one.params == 2 * total and one.grads == 2 * total and one.optimizer == 12 * total
    assert one.teacher == 2 * total
    for key in ("params", "grads", "optimizer", "teacher"):
        assert getattr(eight, key) <= getattr(one, key) / 8 * 1.1
    fp32 = zero3_state(counts, None, 8, torch.float32, zero)
    assert fp32.optimizer == sum(-(-n // 8) for n in counts.numels) * 12  # DeepSpeed copies the master even in fp32
    persist = zero3_state(counts, None, 8, torch.bfloat16, ZeroSettings(param_persistence_threshold=8))
    assert persist.params == eight.params + 2 * 8 * (2 * 4 + 1)  # norm weights kept whole on every rank
    offload = zero3_state(counts, counts, 8, torch.bfloat16, zero, teacher_offload=True)
    assert offload.teacher == 0


def test_fsdp2_state_keeps_fp32_shards():
    counts = _counts()
    state = fsdp2_state(counts, None, 4, torch.bfloat16)
    assert state.params == 4 * sum(-(-s[0] // 4) * (s[1] if len(s) > 1 else 1) for s in counts.shapes)
    assert state.grads == state.params and state.optimizer == 2 * state.params
    assert state.gathered == 2 * (counts.root + 2 * counts.layer_numel)
    everything = fsdp2_state(counts, None, 4, torch.bfloat16, reshard_after_forward=False)
    assert everything.gathered == 2 * counts.total


# ----------------------------------------------------------------------------- command line


def _cli(*args):
    return plan_cli.main(["--quiet", *[str(a) for a in args]])


def test_cli_writes_the_plan_as_json(looplm_dir, tmp_path, capsys):
    config = REPO / "configs/smoke/transition.yaml"
    out = tmp_path / "plan.json"
    code = _cli(
        "--config",
        config,
        "--nodes",
        1,
        "--gpus-per-node",
        2,
        "--gpu-memory",
        "80GB",
        "--seq-len",
        SEQ,
        "--json",
        out,
        f"model.init_from={looplm_dir}",
        "phase.chunk_size=16",
        "data.micro_batch_size=2",
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "fits" in text and "activations (step)" in text and "world size 2" in text
    data = json.loads(out.read_text())
    for key in (
        "phase",
        "world_size",
        "per_gpu",
        "gpu_memory",
        "fits",
        "seq_len",
        "micro_batch",
        "chunk",
        "alpha",
        "dtype",
        "layers_measured",
        "method",
    ):
        assert key in data, key
    assert set(data["per_gpu"]) >= {"params", "grads", "optimizer", "teacher", "activations", "peak"}
    assert data["phase"] == "transition" and data["world_size"] == 2 and data["fits"] is True
    assert data["gpu_memory"] == 80 * 10**9 and data["seq_len"] == SEQ and data["alpha"] == 0.5
    assert data["dtype"] == "bfloat16" and data["layers_measured"] == [2]  # 2 layers: measured directly
    per = data["per_gpu"]
    assert per["peak"] >= per["params"] + per["grads"] + per["optimizer"] + per["activations"]


def test_cli_does_not_fit_and_require_fit(looplm_dir, tmp_path, capsys):
    args = [
        "--config",
        REPO / "configs/smoke/distill.yaml",
        "--gpus-per-node",
        2,
        "--gpu-memory",
        "2MB",
        "--seq-len",
        SEQ,
        "--json",
        tmp_path / "plan.json",
        f"model.init_from={looplm_dir}",
        f"teacher.init_from={looplm_dir}",
        "data.micro_batch_size=2",
        "phase.chunk_size=16",
    ]
    assert _cli(*args) == 0
    assert "does not fit" in capsys.readouterr().out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["fits"] is False and data["headroom"] < 0 and data["per_gpu"]["teacher"] > 0
    assert _cli(*args, "--require-fit") == 3


def test_cli_extrapolates_deeper_models(looplm_dir, tmp_path):
    out = tmp_path / "plan.json"
    assert (
        _cli(
            "--config",
            REPO / "configs/smoke/pretrain.yaml",
            "--gpus-per-node",
            8,
            "--gpu-memory",
            "80GiB",
            "--seq-len",
            SEQ,
            "--json",
            out,
            "model.config.num_hidden_layers=6",
            "data.micro_batch_size=1",
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["layers_measured"] == [1, 2] and data["num_layers"] == 6 and "extrapolated" in data["method"]


def test_cli_without_a_sequence_length_names_the_flag(looplm_dir, capsys):
    assert (
        _cli(
            "--config",
            REPO / "configs/smoke/transition.yaml",
            "--gpus-per-node",
            8,
            "--gpu-memory",
            "80GB",
            f"model.init_from={looplm_dir}",
            "data.path=/nonexistent/data",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--seq-len" in err and "data.path" in err


def test_cli_unknown_hub_name_is_a_clear_error(capsys):
    assert (
        _cli(
            "--config",
            REPO / "configs/ouro/1.4b.yaml",
            "--phase",
            "transition",
            "--gpus-per-node",
            8,
            "--gpu-memory",
            "80GB",
            "--seq-len",
            4096,
            "model.init_from=SomeOrg/NotAModel",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model.init_from" in err and "SomeOrg/NotAModel" in err and "--model-config" in err


def test_known_hub_names_and_the_distill_student_fallback():
    """Ouro hub names map to the shipped architecture; a distill student not on disk yet (the
    transition's export) takes the teacher's."""
    cfg = load_run_config(REPO / "configs/ouro/2.6b.yaml", [], "distill")
    inputs = step_inputs(cfg, seq_len=4096)
    assert inputs.teacher.num_layers == 48 and inputs.model.num_layers == 48
    assert "ouro-2.6b.yaml" in inputs.teacher.source and "not on disk" in inputs.model.source
    thinking = load_run_config(
        REPO / "configs/ouro/1.4b.yaml", ["model.init_from=ByteDance/Ouro-1.4B-Thinking"], "transition"
    )
    assert step_inputs(thinking, seq_len=4096).model.config["hidden_size"] == 2048
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        step_inputs(thinking, seq_len=10**6)
