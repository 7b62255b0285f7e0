"""The experiment format and the launch plan (no cluster needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from launchers import local, slurm
from launchers.experiment import (
    ExperimentError,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    parse_time_minutes,
)
from launchers.plan import LaunchError, build_plan, is_complete

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:signal_delay_s < 120")


def gpu_experiment(**top) -> dict:
    """An Ouro-like production experiment (4 nodes x 8 GPUs)."""
    exp = {
        "name": "ouro-test",
        "resources": {
            "partition": "gpu",
            "account": "melt",
            "qos": "high",
            "constraint": "h100",
            "nodes": 4,
            "gpus_per_node": 8,
            "cpus_per_task": 12,
            "mem_gb": 480,
            "time": "2-00:00:00",
            "signal_delay_s": 300,
            "max_requeues": 5,
            "setup": ["module load cuda/12.4", "source ~/miniforge3/bin/activate melt"],
            "env": {"NCCL_DEBUG": "WARN"},
            "sbatch": {"exclusive": True},
        },
        "stages": {
            "data": {
                "kind": "data_prep",
                "args": ["synthetic", "--train-samples", 100],
                "resources": {"cpus_per_task": 32},
            },
            "transition": {
                "kind": "train",
                "config": "configs/smoke/transition.yaml",
                "overrides": {"schedule": {"total_steps": 100}, "optimizer.lr": 1.0e-4},
                "inputs": {"data.path": "data/train"},
            },
            "distill": {
                "kind": "train",
                "config": "configs/smoke/transition.yaml",
                "inputs": {"data.path": "data/train", "model.init_from": "transition/export"},
                "resources": {"nodes": 2, "time": 600},
            },
            "evaluate": {
                "kind": "evaluate",
                "args": ["--model", "melt={distill/export}", "--data", "{data/eval}"],
                "resources": {"gpus_per_node": 1},
            },
        },
    }
    exp.update(top)
    return exp


def test_smoke_experiment_loads_and_resolves(tmp_path):
    exp = load_experiment(SMOKE, [f"run_dir={tmp_path}"])
    assert list(exp.stages) == ["data", "pretrain", "transition", "distill", "evaluate"]
    assert exp.resources_of("pretrain").ntasks_per_node == 2
    assert exp.resources_of("data").ntasks_per_node == 1 and exp.resources_of("evaluate").ntasks_per_node == 1
    assert exp.upstream_of("distill") == ["data", "pretrain", "transition"]
    assert exp.upstream_of("evaluate") == ["data", "pretrain", "distill"]
    plan = build_plan(exp, strict=False)
    transition = plan.stage("transition")
    assert transition.entry == "pipeline.train"
    assert transition.argv == [
        "--config",
        str(REPO / "configs/smoke/transition.yaml"),
        f"data.path={tmp_path}/data/train",
        f"model.init_from={tmp_path}/pretrain/export",
        f"run_dir={tmp_path}/transition",
    ]
    assert plan.stage("data").argv[-2:] == ["--out", str(tmp_path / "data")]
    evaluate = plan.stage("evaluate").argv
    assert evaluate[:4] == [
        "--model",
        f"looplm={tmp_path}/pretrain/export",
        "--model",
        f"melt={tmp_path}/distill/export",
    ]
    assert evaluate[-2:] == ["--out", str(tmp_path / "evaluate" / "results.json")]


def test_unknown_keys_are_errors_naming_the_key():
    for raw, key in [
        ({**gpu_experiment(), "partitoin": "x"}, "partitoin"),
        (gpu_experiment(resources={"nodez": 2}), "resources.nodez"),
        ({**gpu_experiment(), "stages": {"data": {"kind": "data_prep", "argz": []}}}, "stages.data.argz"),
    ]:
        with pytest.raises(ExperimentError, match=rf"{key}: unknown key"):
            experiment_from_dict(raw)
    raw = gpu_experiment()
    raw["stages"]["transition"]["resources"] = {"gpus_per_nod": 4}
    with pytest.raises(ExperimentError, match=r"stages.transition.resources.gpus_per_nod: unknown key"):
        experiment_from_dict(raw)
    with pytest.raises(ExperimentError, match=r"stages.transition.kind"):
        experiment_from_dict({**gpu_experiment(), "stages": {"transition": {"kind": "trian", "config": "x"}}})


def test_the_old_phases_key_is_refused_naming_stages(tmp_path):
    raw = gpu_experiment()
    raw["phases"] = raw.pop("stages")
    with pytest.raises(ExperimentError, match="the top-level key `phases` is now `stages`"):
        experiment_from_dict(raw)
    with pytest.raises(ExperimentError, match="the top-level key `phases` is now `stages`"):
        experiment_from_dict(gpu_experiment(), ["phases.distill.resources.nodes=3"])
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ExperimentError, match=f"{path}: the top-level key `phases` is now `stages`"):
        load_experiment(path)


def test_signal_delay_below_120_needs_the_test_override():
    with pytest.raises(ExperimentError, match=r"signal_delay_s=60: below 120 s"):
        experiment_from_dict(gpu_experiment(), ["resources.signal_delay_s=60"])
    with pytest.warns(UserWarning, match="allow_short_signal_delay"):
        exp = experiment_from_dict(gpu_experiment(), ["resources.signal_delay_s=60", "allow_short_signal_delay=true"])
    assert exp.resources_of("transition").signal_delay_s == 60 and exp.notes
    with pytest.raises(ExperimentError, match="not shorter than the time limit"):
        experiment_from_dict(gpu_experiment(), ["resources.time=2"])


def test_inputs_must_come_from_earlier_stages():
    raw = gpu_experiment()
    raw["stages"]["transition"]["inputs"]["model.init_from"] = "pretrain/export"
    with pytest.raises(
        ExperimentError,
        match=r"stages.transition.inputs.model.init_from: 'pretrain/export' names no "
        r"stage",
    ):
        experiment_from_dict(raw)
    raw = gpu_experiment()
    raw["stages"]["transition"]["inputs"]["model.init_from"] = "distill/export"
    with pytest.raises(ExperimentError, match="which does not run before 'transition'"):
        experiment_from_dict(raw)
    raw = gpu_experiment()
    raw["stages"]["evaluate"]["args"] = ["--model", "melt={distil/export}"]
    with pytest.raises(ExperimentError, match=r"stages.evaluate.args\[1\]: 'distil/export' names no stage"):
        experiment_from_dict(raw)


def test_gpu_resources_one_task_per_gpu_and_overrides():
    exp = experiment_from_dict(
        gpu_experiment(),
        [
            "stages.distill.resources.nodes=3",
            "stages.transition.overrides.schedule.warmup_steps=10",
            "resources.env.OMP_NUM_THREADS=8",
        ],
    )
    tr, di, ev, data = (exp.resources_of(n) for n in ("transition", "distill", "evaluate", "data"))
    assert (tr.nodes, tr.ntasks_per_node, tr.num_tasks, tr.time) == (4, 8, 32, 2880)
    assert (di.nodes, di.num_tasks, di.time) == (3, 24, 600)
    assert (ev.nodes, ev.gpus_per_node, ev.ntasks_per_node) == (1, 1, 1)
    assert (data.nodes, data.gpus_per_node, data.ntasks_per_node, data.cpus_per_task) == (1, 0, 1, 32)
    assert tr.env == {"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": 8}
    plan = build_plan(exp, run_dir=Path("/scratch/run"), strict=False)
    argv = plan.stage("transition").argv
    assert "schedule.total_steps=100" in argv and "schedule.warmup_steps=10" in argv and "optimizer.lr=0.0001" in argv
    with pytest.raises(ExperimentError, match="one task per GPU"):
        experiment_from_dict(gpu_experiment(), ["stages.transition.resources.tasks_per_node=2"])
    with pytest.raises(ExperimentError, match="runs one task on one node"):
        experiment_from_dict(gpu_experiment(), ["stages.data.resources.nodes=2"])


def test_time_limits():
    assert parse_time_minutes(90) == 90
    assert parse_time_minutes("01:30:00") == 90
    assert parse_time_minutes("2-00:00:00") == 2880
    assert parse_time_minutes("1-12") == 2160
    assert parse_time_minutes("45") == 45
    for bad in ("soon", 0, "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_time_minutes(bad)


def test_override_syntax():
    raw = apply_overrides({"stages": {"a": {"overrides": {"x.y": 1}}}}, ["stages.a.overrides.x.y=2", "run_dir=/r"])
    assert raw == {"stages": {"a": {"overrides": {"x.y": 1, "x": {"y": 2}}}}, "run_dir": "/r"}
    exp = experiment_from_dict(
        gpu_experiment(),
        ["stages.transition.overrides.optimizer.lr=0.5", "stages.transition.inputs.model.init_from=data/model"],
    )
    argv = build_plan(exp, run_dir=Path("/r"), strict=False).stage("transition").argv
    assert "optimizer.lr=0.5" in argv and "optimizer.lr=0.0001" not in argv
    assert "model.init_from=/r/data/model" in argv
    with pytest.raises(ExperimentError, match="must look like dotted.key=value"):
        apply_overrides({}, ["nonsense"])


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_stage_subset_needs_complete_inputs_on_disk(tmp_path):
    exp = experiment_from_dict(gpu_experiment(run_dir=str(tmp_path)))
    with pytest.raises(LaunchError) as err:
        build_plan(exp, select=["distill"], strict=False)
    message = str(err.value)
    assert "stage 'distill', inputs.model.init_from = transition/export: stage 'transition' is not launched" in message
    assert "inputs.data.path = data/train: stage 'data'" in message
    _touch(tmp_path / "data/train/manifest.json")
    _touch(tmp_path / "data/train/index.json")
    _touch(tmp_path / "transition/export/config.json")
    _touch(tmp_path / "data/eval/manifest.json")
    plan = build_plan(exp, select=["distill", "evaluate"], strict=False)
    assert [p.name for p in plan.stages] == ["distill", "evaluate"]
    assert plan.stage("distill").upstream == [] and plan.stage("evaluate").upstream == ["distill"]
    assert plan.skipped == {"data": "not selected by --stages", "transition": "not selected by --stages"}
    # the evaluate stage reads data/eval, which is not there
    (tmp_path / "data/eval/manifest.json").unlink()
    (tmp_path / "data/eval").rmdir()
    with pytest.raises(LaunchError, match=r"stage 'evaluate', args\[3\] = data/eval"):
        build_plan(exp, select=["evaluate"], strict=False)


def test_resume_skips_complete_stages(tmp_path):
    exp = experiment_from_dict(gpu_experiment(run_dir=str(tmp_path)))
    _touch(tmp_path / "data/train/index.json")
    assert not is_complete(exp, tmp_path, "data")  # an index without its manifest: interrupted
    _touch(tmp_path / "data/train/manifest.json")
    _touch(tmp_path / "data/eval/index.json")
    _touch(tmp_path / "data/eval/manifest.json")
    _touch(tmp_path / "transition/export/config.json")
    assert is_complete(exp, tmp_path, "data") and is_complete(exp, tmp_path, "transition")
    plan = build_plan(exp, resume=True, strict=False)
    assert [p.name for p in plan.stages] == ["distill", "evaluate"]
    assert plan.skipped["transition"] == "complete (--resume-from)"


def test_dry_run_prints_sbatch_dependencies_and_resources(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.chdir(REPO)
    cfg = tmp_path / "ouro.yaml"
    cfg.write_text(yaml.safe_dump(gpu_experiment(run_dir=str(tmp_path / "run")), sort_keys=False))
    assert slurm.main(["--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in [
        "#   transition: afterok [data]",
        "#   distill: afterok [data, transition]",
        "#SBATCH --dependency='afterok:<data>:<transition>'",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=480GB",
        "#SBATCH --time=2880",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=melt",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "module load cuda/12.4",
        "export NCCL_DEBUG=WARN",
        "-u -m submitit.core._submit",
        f"--output {tmp_path}/run/slurm/transition/%j_%t_log.out",
    ]:
        assert line in out, line
    assert "--wckey" not in out
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_smoke_dry_run_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.chdir(REPO)
    assert slurm.main(["--config", str(SMOKE), "--dry-run", f"run_dir={tmp_path}", "--stages", "data,pretrain"]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH --dependency=afterok:<data>" in captured.out.replace("'", "")
    assert "#SBATCH --ntasks-per-node=2" in captured.out and "export DS_ACCELERATOR=cpu" in captured.out
    assert "signal_delay_s < 120" in captured.err
    assert local.main(["--config", str(SMOKE), "--dry-run", f"run_dir={tmp_path}", "--stages", "data,pretrain"]) == 0
    out = capsys.readouterr().out
    assert (
        "deepspeed.launcher.runner --num_gpus 2" in out
        and "pipeline/train.py" in out
        and "-m data_prep synthetic" in out
    )


def test_submit_without_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    monkeypatch.chdir(REPO)
    assert slurm.main(["--config", str(SMOKE), f"run_dir={tmp_path / 'run'}", "--stages", "data"]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


def test_resume_from_reloads_the_saved_experiment(tmp_path, monkeypatch, capsys):
    from launchers.plan import save_experiment

    monkeypatch.chdir(REPO)
    exp = load_experiment(SMOKE, [f"run_dir={tmp_path}"])
    save_experiment(exp, tmp_path)
    saved = yaml.safe_load((tmp_path / "experiment.yaml").read_text())
    assert saved["stages"]["pretrain"]["config"] == str(REPO / "configs/smoke/pretrain.yaml")
    monkeypatch.chdir(tmp_path)  # absolute paths: works from anywhere
    assert local.main(["--resume-from", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--out {tmp_path}/data" in out
    assert local.main(["--resume-from", str(tmp_path), "--dry-run", "run_dir=/elsewhere"]) == 2
    assert "disagree" in capsys.readouterr().err
    json.dumps(saved)  # plain data
    assert os.path.isabs(saved["run_dir"])


@pytest.mark.parametrize("size, nodes", [("1.4b", 1), ("2.6b", 2)])
def test_ouro_experiments_plan_the_whole_chain(size, nodes, tmp_path):
    exp = load_experiment(REPO / "configs" / "experiments" / f"ouro-{size}-melt.yaml", [f"run_dir={tmp_path}"])
    plan = build_plan(exp, base=REPO, strict=False)
    graph = {p.name: p.upstream for p in plan.stages}
    assert graph == {
        "data": [],
        "data_eval": [],
        "transition": ["data"],
        "distill": ["data", "transition"],
        "evaluate": ["data_eval", "distill"],
    }
    transition = plan.stage("transition")
    assert transition.resources.gpus_per_node == 8 and transition.resources.nodes == nodes
    assert transition.argv[:4] == ["--config", str(REPO / "configs" / "ouro" / f"{size}.yaml"), "--phase", "transition"]
    assert f"model.init_from={tmp_path / 'transition' / 'export'}" in plan.stage("distill").argv
    assert exp.resources.signal_delay_s >= 120


@pytest.mark.parametrize("name", ["ouro-1.4b-melt", "ouro-2.6b-melt", "ouro-1.4b-thinking-paper"])
def test_ouro_experiments_evaluate_all_three_contenders(name, tmp_path):
    """Every real run reports MELT, Ouro and Ouro with the last loop's KV only (zero-shot), on the same base."""
    exp = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml", [f"run_dir={tmp_path}"])
    argv = build_plan(exp, base=REPO, strict=False).stage("evaluate").argv
    models = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--model")
    assert set(models) == {"melt", "looplm", "looplm_lastkv"}, argv
    assert models["looplm"] == models["looplm_lastkv"] and models["looplm"].startswith("ByteDance/Ouro-")
    assert models["melt"] == str(tmp_path / "distill" / "export")


@pytest.mark.parametrize(
    "name",
    [
        "smoke",
        "demo",
        "demo-from-scratch",
        "reproduce",
        "reproduce-from-scratch",
        "ouro-1.4b-melt",
        "ouro-2.6b-melt",
        "ouro-1.4b-thinking-paper",
    ],
)
def test_local_experiments_plan_and_their_run_configs_validate(name, tmp_path):
    """What `make demo` / `make reproduce` would launch: every train stage's run config, with the
    experiment's overrides and inputs, is a valid RunConfig (a typo fails here, not 30 minutes in)."""
    from pipeline.train import parse_args
    from pipeline.training.config import load_run_config

    exp = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml", [f"run_dir={tmp_path}"])
    plan = build_plan(exp, base=REPO, strict=False)
    trains = [p for p in plan.stages if p.kind == "train"]
    assert trains
    configs = {}
    for p in trains:
        args = parse_args(p.argv)
        configs[p.name] = load_run_config(args.config, args.overrides, args.phase)
        assert str(configs[p.name].run_dir) == str(tmp_path / p.name), p.name
    if name == "ouro-1.4b-thinking-paper":  # the paper's recipe, as reported
        transition, distill = configs["transition"], configs["distill"]
        assert transition.model.init_from == distill.teacher.init_from == "ByteDance/Ouro-1.4B-Thinking"
        assert "--seq-len 10240" in " ".join(plan.stage("data").argv)
        for cfg, steps in ((transition, 500), (distill, 300)):
            assert cfg.phase.chunk_size == 500 and cfg.schedule.total_steps == steps
            assert cfg.data.global_batch_size * 10240 == 327_680  # ~320k tokens per step
            assert cfg.optimizer.lr == 8e-6 and cfg.optimizer.groups["gates"].lr == 5e-4
    if name in ("reproduce", "reproduce-from-scratch"):
        seeds = exp.seeds
        assert seeds == [0, 1, 2]
        for t in (2, 4, 8):
            for seed in seeds:
                transition, distill = configs[f"transition_t{t}_seed{seed}"], configs[f"distill_t{t}_seed{seed}"]
                assert transition.seed == distill.seed == seed
                assert distill.model.init_from == str(tmp_path / f"transition_t{t}_seed{seed}" / "export")
                assert distill.teacher.init_from == transition.model.init_from  # the LoopLM of this T
                assert distill.checkpointing.export_every  # the steps curve
        assert {p.name for p in plan.stages if p.kind == "evaluate"} == {
            "evaluate_standard",
            *(f"evaluate_t{t}" for t in (2, 4, 8)),
            *(f"evaluate_melt_t{t}_seed{s}" for t in (2, 4, 8) for s in seeds),
        }
    if name == "reproduce":  # from the shipped models
        assert not [n for n in configs if n.startswith("pretrain")]
        assert configs["transition_t8_seed0"].model.init_from == "assets/reproduce/looplm_t8"
    if name == "reproduce-from-scratch":
        assert {n: c.model.config["total_ut_steps"] for n, c in configs.items() if n.startswith("pretrain")} == {
            "pretrain_standard": 1,
            "pretrain_t2": 2,
            "pretrain_t4": 4,
            "pretrain_t8": 8,
        }
