"""The run config: YAML + _base_ includes + dotted overrides, validated, errors naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distributed import DistEnv
from pipeline.training.config import (
    ConfigError,
    load_run_config,
    load_run_configs_by_phase,
    load_yaml_with_includes,
    validate_run_config,
)
from pipeline.training.engines.deepspeed import DeepSpeedEngine

REPO = Path(__file__).resolve().parents[2]
SMOKE_PRETRAIN = REPO / "configs/smoke/pretrain.yaml"
SMOKE_TRANSITION = REPO / "configs/smoke/transition.yaml"


def test_smoke_configs_load_with_includes_and_overrides():
    cfg = load_run_config(
        SMOKE_PRETRAIN, ["optimizer.lr=5e-4", "run_dir=/x", "data.path=/d", "model.config.total_ut_steps=3"]
    )
    assert cfg.phase.name == "pretrain" and cfg.phase.loss.kind == "ouro_stage1"
    assert cfg.optimizer.lr == 5e-4 and cfg.run_dir == "/x" and cfg.data.path == "/d"
    assert cfg.model.config["hidden_size"] == 32 and cfg.model.config["total_ut_steps"] == 3  # from _base_
    zero = cfg.engine.deepspeed["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0  # zero3_cpu over zero3
    assert zero["stage3_max_live_parameters"] == 1e9  # zero3.yaml underneath

    tr = load_run_config(SMOKE_TRANSITION, ["phase.alpha.shape=cosine", "phase.trainable=gates"])
    assert tr.phase.name == "transition" and tr.phase.alpha.shape == "cosine" and tr.phase.trainable == "gates"
    assert tr.optimizer.groups["gates"].lr == 1e-2 and tr.phase.loss.kind == "last_loop_ce"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optimizer.lrr=1e-3"], "optimizer.lrr"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.lr=fast"], "optimizer.lr"),
        (["phase.alpha.end=1"], "phase.alpha"),  # pretrain has no alpha
        (["schedule.total_steps=0"], "schedule.total_steps"),
        (["data.micro_batch_size=3"], "data"),
        (["bogus=1"], "bogus"),
        (["model.config.hiden_size=8"], "model.config"),
        (["model.config.num_attention_heads=3"], "model.config"),
        (["engine.deepspeed.train_batch_size=8"], "engine.deepspeed"),
        (["engine.deepspeed.zero_optimization.stage=2"], "engine.deepspeed"),
        (["engine.name=fsdp9"], "engine.name"),
        (["phase.name=distil"], "phase"),
        (["model.init_from=/x"], "<top>"),  # pretrain builds from model.config, not a checkpoint
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_run_config(SMOKE_PRETRAIN, overrides)
    assert f"config key '{key}'" in str(err.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["phase.alpha.shape=quadratic"], "phase.alpha.shape"),
        (["phase.alpha.end=2"], "phase.alpha.end"),
        (["phase.gate=sigmoid"], "phase.gate"),
        (["phase.trainable=mlp"], "phase.trainable"),
        (["phase.loss.kind=kl"], "phase.loss.kind"),
        (["model.config={hidden_size: 8}"], "<top>"),
    ],
)
def test_bad_transition_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_run_config(SMOKE_TRANSITION, overrides)
    assert f"config key '{key}'" in str(err.value)


def test_override_syntax_and_files():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_run_config(SMOKE_PRETRAIN, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="'optimizer.lr' is not a mapping"):
        load_run_config(SMOKE_PRETRAIN, ["optimizer.lr.x=1"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_run_config(REPO / "configs/smoke/nope.yaml")
    with pytest.raises(ConfigError, match="phase.name is 'pretrain'"):
        load_run_config(SMOKE_PRETRAIN, phase="transition")


def test_engine_given_by_its_name_alone(tmp_path):
    """`engine=fsdp` is `engine.name=fsdp`, on the command line and in YAML, and keeps the rest of the
    section (the smoke config's engine.deepspeed, or engine.precision set beside it)."""
    short = load_run_config(SMOKE_PRETRAIN, ["engine=fsdp", "engine.precision=fp32"])
    dotted = load_run_config(SMOKE_PRETRAIN, ["engine.name=fsdp", "engine.precision=fp32"])
    assert short.engine == dotted.engine and short.engine.name == "fsdp" and short.engine.precision == "fp32"
    assert short.engine.deepspeed["zero_optimization"]["stage"] == 3  # from the config's _base_ files
    (tmp_path / "run.yaml").write_text(f"_base_: {SMOKE_PRETRAIN}\nengine: fsdp\n")
    from_yaml = load_run_config(tmp_path / "run.yaml")
    assert from_yaml.engine == dotted.engine.model_copy(update={"precision": "auto"})
    raw = {**load_yaml_with_includes(SMOKE_PRETRAIN), "engine": "fsdp"}  # a config built in code
    assert validate_run_config(raw).engine == from_yaml.engine.model_copy(update={"deepspeed": {}})


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_a_wrong_engine_name_names_the_key_and_the_choices(tmp_path, where):
    overrides = ["engine=fsdp2"]
    path = SMOKE_PRETRAIN
    if where == "yaml":
        overrides, path = [], tmp_path / "run.yaml"
        path.write_text(f"_base_: {SMOKE_PRETRAIN}\nengine: fsdp2\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, overrides)
    assert "config key 'engine.name'" in str(err.value)
    assert "'deepspeed' or 'fsdp'" in str(err.value) and "got 'fsdp2'" in str(err.value)


@pytest.mark.parametrize("name", ["1.4b", "2.6b"])
def test_experiment_configs_validate(name):
    path = REPO / "configs/ouro" / f"{name}.yaml"
    runs = load_run_configs_by_phase(path)
    assert set(runs) == {"transition", "distill"}  # distill: tests/training/test_distill_phase.py
    cfg = runs["transition"]
    assert cfg.model.init_from.startswith("ByteDance/Ouro-")
    assert cfg.engine.name == "deepspeed" and cfg.engine.precision == "auto" and cfg.engine.activation_checkpointing
    assert cfg.engine.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.phase.chunk_size == 128 and cfg.phase.alpha.end == 1.0
    assert cfg.data.global_batch_size == 128 and cfg.data.num_canonical_nodes == 8
    assert f"ouro-{name}" in cfg.run_dir.lower()
    # the same section through the trainer's loader, with --phase and overrides
    again = load_run_config(path, ["data.path=/data/train"], phase="transition")
    assert again.data.path == "/data/train" and again.model.init_from == cfg.model.init_from
    # 8 GPUs per node: the batch divides into micro-steps on 1 or 2 nodes, DeepSpeed config in bf16 form
    for world in (8, 16):
        env = DistEnv(0, world, 0, 8, "127.0.0.1", 29500, "deepspeed")
        engine = DeepSpeedEngine(
            cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"precision": "bf16"})}), env
        )
        ds = engine.ds_config
        assert (
            ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * world * ds["gradient_accumulation_steps"]
            and ds["bf16"]["enabled"]
        )


def test_cli_refuses_a_bad_config_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipeline/train.py"),
            "--config",
            str(SMOKE_PRETRAIN),
            f"run_dir={run_dir}",
            "optimizer.lrr=1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config key 'optimizer.lrr': unknown key" in proc.stderr
    assert not run_dir.exists()


def test_preflight_refuses_missing_inputs_and_writes_nothing(tmp_path, token_dataset):
    from pipeline.training.trainer import preflight

    env = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "deepspeed")
    run_dir = tmp_path / "run"
    data = token_dataset(tmp_path / "data", num_samples=16, seq_len=8)
    cases = [
        (SMOKE_PRETRAIN, [f"data.path={tmp_path / 'missing'}"], "config key 'data.path': .* does not exist"),
        (SMOKE_PRETRAIN, [f"data.path={tmp_path}"], "config key 'data.path': .*no readable manifest.json"),
        (SMOKE_PRETRAIN, [f"data.path={data}", "data.global_batch_size=12"], "config key 'data.global_batch_size'"),
        (
            SMOKE_PRETRAIN,
            [f"data.path={data}", "model.config.vocab_size=32"],
            r"config key 'model.config.vocab_size': the model's vocabulary \(32\) is smaller",
        ),
        (
            SMOKE_PRETRAIN,
            [f"data.path={data}", "optimizer.groups={gates: {lr: 1.0}}"],
            "config key 'optimizer.groups.gates'",
        ),
        (
            SMOKE_TRANSITION,
            [f"data.path={data}", f"model.init_from={tmp_path / 'nope'}"],
            "config key 'model.init_from': .* does not exist",
        ),
        (
            SMOKE_TRANSITION,
            [f"data.path={data}", f"model.init_from={tmp_path}"],
            "config key 'model.init_from': .* has no config.json",
        ),
        (
            SMOKE_TRANSITION,
            [f"data.path={data}", f"model.init_from={data}", "phase.trainable=gates", "phase.alpha.end=0"],
            "config key 'phase.trainable': gates only at alpha fixed to 0",
        ),
    ]
    for path, overrides, match in cases:
        cfg = load_run_config(path, [f"run_dir={run_dir}", *overrides])
        with pytest.raises(ConfigError, match=match):
            preflight(cfg, env)
    assert not run_dir.exists()
