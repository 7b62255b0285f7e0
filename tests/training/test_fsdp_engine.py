"""The FSDP2 engine in one process (a gloo group of 1): meta-device construction with deferred
initialisation / loading, the frozen wrapper, steps (clipping, non-finite skip), DCP checkpoints;
its config section, the local launcher's torchrun choice and the refusal to resume another
engine's checkpoints. The 2-rank runs are in tests/distributed/test_train_fsdp.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.distributed import DistEnv, free_port
from pipeline.models import LoopLMForCausalLM
from pipeline.training.config import ConfigError, load_run_config
from pipeline.training.engines.base import ParamGroup
from pipeline.training.engines.fsdp import FSDPEngine
from pipeline.training.initialization import initialize
from pipeline.training.weights import CheckpointTensors

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
    pytest.mark.filterwarnings("ignore:signal_delay_s < 120"),
]
PRETRAIN = REPO / "configs/smoke/pretrain.yaml"


def fsdp_cfg(*overrides, run_dir="/unused"):
    return load_run_config(
        PRETRAIN,
        ["engine.name=fsdp", "data.path=/unused", f"run_dir={run_dir}", "data.global_batch_size=4", *overrides],
    )


@pytest.fixture(scope="module")
def engine():
    """An FSDP engine on a one-process gloo group; the process environment is restored after."""
    import torch.distributed as dist

    saved = dict(os.environ)
    engine = FSDPEngine(fsdp_cfg(), DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single"))
    try:
        engine.init_distributed()
        yield engine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def tiny_config():
    from pipeline.models import LoopLMConfig

    return LoopLMConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        total_ut_steps=2,
        max_position_embeddings=64,
    )


def eager_init(seed: int) -> LoopLMForCausalLM:
    """A plain model with the seeded initial weights (initialization.py), as every engine makes them."""
    model = LoopLMForCausalLM(tiny_config())
    initialize(model, model._init_weights, seed)
    return model


def weights(engine) -> dict[str, torch.Tensor]:
    """A copy of the full weights (with one rank they may share storage with the parameters)."""
    return {name: tensor.clone() for name, tensor in engine.full_state_dict().items()}


def batch(seed=0):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def trained(engine):
    """A LoopLM built on the meta device, initialised by the engine from the run's seed, sharded,
    prepared; with the global RNG state before and after (initialisation draws nothing from it)."""
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with engine.init_context():
        model = LoopLMForCausalLM(tiny_config())
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary frequencies are computed, not loaded
    engine.init_weights(model, model._init_weights)  # deferred until the model is sharded
    params = list(model.parameters())
    groups = [ParamGroup("all", [p for p in params if p.dim() >= 2], 1e-2, 0.1, [p for p in params if p.dim() < 2])]
    engine.prepare(model, groups, lambda step: 1.0 / (step + 1), (0.9, 0.95), 1e-8)
    return model, (before, torch.get_rng_state())


def test_meta_init_is_deferred_to_the_shards_and_equals_the_eager_init(engine, trained):
    model, (before, after_prepare) = trained
    reference = eager_init(engine.cfg.seed)
    assert torch.equal(before, after_prepare)  # the run's random stream is left where it was
    state = engine.full_state_dict()
    assert set(state) == set(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters())
    stats = engine.partition_stats()
    assert stats.total_numel == stats.local_numel == sum(p.numel() for p in reference.parameters())


def test_an_uninitialised_parameter_is_an_error(engine):
    with engine.init_context():
        model = LoopLMForCausalLM(tiny_config())
    engine.init_weights(model, lambda module: None)  # touches nothing
    engine.shard(model, engine.mp_policy(), reshard_after_forward=True)
    with pytest.raises(RuntimeError, match=r"initialisation left parameters unset \(NaN\): \['model\.layers\.0\."):
        engine.materialize(model)


def test_frozen_model_loads_shard_wise_and_runs_like_the_plain_model(engine, tmp_path):
    plain = eager_init(3).eval()
    plain.save_pretrained(tmp_path)
    with engine.frozen_init_context():
        model = LoopLMForCausalLM(tiny_config())
    engine.load_weights(model, CheckpointTensors(tmp_path))
    frozen = engine.build_frozen(model)
    held = dict(frozen.full_tensors())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(held[name], tensor), name
    assert not any(p.requires_grad for p in frozen.module.parameters()) and not frozen.module.training
    ids = batch()["input_ids"]
    got = frozen(input_ids=ids, output_loop_logits=True, use_cache=False)
    with torch.no_grad():
        want = plain(input_ids=ids, output_loop_logits=True, use_cache=False)
    assert got.loop_logits[-1].grad_fn is None
    torch.testing.assert_close(got.loop_logits[-1], want.loop_logits[-1], rtol=1e-5, atol=1e-6)
    stats = frozen.partition_stats()
    assert stats.optimizer_state_bytes == 0 and stats.local_numel == stats.total_numel


def test_steps_clip_skip_non_finite_and_checkpoint_round_trip(engine, trained, tmp_path):
    model, _ = trained
    reference = eager_init(engine.cfg.seed)
    out = engine.forward(**batch(1), use_cache=False)
    engine.backward(out.loss)
    want = reference(**batch(1), use_cache=False)
    want.loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None])
    result = engine.optimizer_step()
    assert result.applied and result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert engine.learning_rates() == {"all": pytest.approx(0.5e-2)}  # lr_lambda(1) after one step

    with pytest.raises(RuntimeError, match="optimizer_step\\(\\) after 0 micro-step"):
        engine.optimizer_step()
    out = engine.forward(**batch(2), use_cache=False)
    engine.backward(out.loss * float("nan"))
    before = weights(engine)
    skipped = engine.optimizer_step()
    assert not skipped.applied and skipped.grad_norm != skipped.grad_norm
    assert engine.learning_rates() == {"all": pytest.approx(0.5e-2)}  # the schedule did not advance
    assert all(torch.equal(before[k], v) for k, v in weights(engine).items())

    engine.save_checkpoint(str(tmp_path), "step_1", {"trainer": {"step": 1}})
    assert {".metadata", "__0_0.distcp", "client_rank0.pt"} <= {p.name for p in (tmp_path / "step_1").iterdir()}
    out = engine.forward(**batch(3), use_cache=False)
    engine.backward(out.loss)
    assert engine.optimizer_step().applied
    moved = weights(engine)
    assert not all(torch.equal(before[k], v) for k, v in moved.items())
    assert engine.load_checkpoint(str(tmp_path), "step_1") == {"trainer": {"step": 1}}
    assert all(torch.equal(before[k], v) for k, v in weights(engine).items())
    assert engine.learning_rates() == {"all": pytest.approx(0.5e-2)}
    with pytest.raises(RuntimeError, match="not an FSDP checkpoint"):
        engine.load_checkpoint(str(tmp_path), "step_9")


def test_engine_config_section():
    cfg = fsdp_cfg("engine.fsdp.reshard_after_forward=false", "engine.fsdp.reduce_dtype=float32")
    assert cfg.engine.name == "fsdp" and not cfg.engine.fsdp.reshard_after_forward
    for ph in ("pretrain", "transition", "distill"):  # the FSDP variants of the smoke configs
        raw = (REPO / f"configs/smoke/fsdp/{ph}.yaml").read_text()
        assert "name: fsdp" in raw and f"_base_: ../{ph}.yaml" in raw
    for override, key in [
        ("engine.fsdp.reshard=1", "engine.fsdp.reshard"),
        ("engine.fsdp.reduce_dtype=fp8", "engine.fsdp.reduce_dtype"),
    ]:
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            fsdp_cfg(override)


def test_resuming_another_engines_checkpoints_is_refused(tmp_path, token_dataset):
    from pipeline.training.checkpointing import CheckpointManager
    from pipeline.training.train_data import data_fingerprint, read_manifest
    from pipeline.training.trainer import preflight

    data = token_dataset(tmp_path / "data", num_samples=32)
    cfg = fsdp_cfg(f"data.path={data}", run_dir=tmp_path / "run")
    manager = CheckpointManager(cfg.run_dir)
    manager.begin_save("step_00000004")
    (manager.root / "step_00000004").mkdir()
    fingerprint = data_fingerprint(cfg, read_manifest(data))
    manager.finish_save("step_00000004", {"step": 4, "phase": "pretrain", "engine": "fsdp", "fingerprint": fingerprint})
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 1, "single")
    assert preflight(cfg, env).resume_tag == "step_00000004"
    deepspeed = load_run_config(
        PRETRAIN, [f"data.path={data}", f"run_dir={tmp_path / 'run'}", "data.global_batch_size=4"]
    )
    with pytest.raises(ConfigError, match="written by engine fsdp, not deepspeed: use another run_dir"):
        preflight(deepspeed, env)
    state = json.loads((manager.root / "step_00000004" / "trainer_state.json").read_text())
    del state["engine"]  # written before the FSDP engine existed: DeepSpeed's
    (manager.root / "step_00000004" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="written by engine deepspeed, not fsdp"):
        preflight(cfg, env)


def test_local_launcher_uses_torchrun_for_fsdp_phases(tmp_path):
    from launchers import local
    from launchers.experiment import load_experiment
    from launchers.plan import build_plan

    smoke = REPO / "configs/experiments/smoke.yaml"
    exp = load_experiment(smoke, [f"run_dir={tmp_path}", "stages.transition.overrides.engine.name=fsdp"])
    plan = build_plan(exp, base=REPO, strict=False)
    launcher = {p.name: local.command(plan, p, port=29500)[2] for p in plan.stages if p.kind == "train"}
    assert launcher == {
        "pretrain": "deepspeed.launcher.runner",
        "transition": "torch.distributed.run",
        "distill": "deepspeed.launcher.runner",
    }
    exp = load_experiment(smoke, [f"run_dir={tmp_path}", "local.launcher=torchrun"])
    plan = build_plan(exp, base=REPO, strict=False)
    assert {local.command(plan, p)[2] for p in plan.stages if p.kind == "train"} == {"torch.distributed.run"}
