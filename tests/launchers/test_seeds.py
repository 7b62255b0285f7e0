"""Seeds in an experiment: per-seed stages copied once per seed, their references followed per seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from launchers.experiment import ExperimentError, experiment_from_dict
from launchers.plan import build_plan, parse_stage_list

REPO = Path(__file__).resolve().parents[2]


def seeded_experiment(seeds=None) -> dict:
    exp: dict = {
        "name": "seeded",
        "stages": {
            "data": {"kind": "data_prep", "args": ["synthetic"]},
            "transition": {
                "kind": "train",
                "per_seed": True,
                "config": "configs/smoke/transition.yaml",
                "inputs": {"data.path": "data/train"},
                "overrides": {"logging": {"tensorboard": True}, "run_name": "t-{seed}"},
            },
            "distill": {
                "kind": "train",
                "per_seed": True,
                "config": "configs/smoke/distill.yaml",
                "inputs": {"data.path": "data/train", "model.init_from": "transition/export"},
            },
            "evaluate_melt": {
                "kind": "evaluate",
                "per_seed": True,
                "args": ["--model", "melt={distill/export}", "--data", "{data/eval}", "--note", "seed {seed}"],
            },
        },
    }
    if seeds is not None:
        exp["seeds"] = seeds
    return exp


def test_each_per_seed_stage_runs_once_per_seed_reading_its_own_seeds_inputs(tmp_path):
    exp = experiment_from_dict(seeded_experiment(3))
    assert exp.seeds == [0, 1, 2]
    assert list(exp.stages) == [
        "data",
        *(f"transition_seed{s}" for s in range(3)),
        *(f"distill_seed{s}" for s in range(3)),
        *(f"evaluate_melt_seed{s}" for s in range(3)),
    ]
    for s in range(3):
        distill = exp.stages[f"distill_seed{s}"]
        assert distill.seed == s and distill.overrides["seed"] == s
        assert distill.inputs == {"data.path": "data/train", "model.init_from": f"transition_seed{s}/export"}
        evaluate = exp.stages[f"evaluate_melt_seed{s}"]
        assert evaluate.args[1] == f"melt={{distill_seed{s}/export}}" and evaluate.args[-1] == f"seed {s}"
        assert exp.upstream_of(f"distill_seed{s}") == ["data", f"transition_seed{s}"]
        assert exp.output_of(f"distill_seed{s}") == f"distill_seed{s}"
    assert exp.stages["data"].seed is None
    assert exp.stages["transition_seed1"].overrides == {"logging.tensorboard": True, "run_name": "t-1", "seed": 1}
    plan = build_plan(exp, run_dir=tmp_path, base=REPO, strict=False)
    argv = plan.stage("distill_seed2").argv
    assert "seed=2" in argv and f"model.init_from={tmp_path / 'transition_seed2' / 'export'}" in argv


def test_seeds_as_a_list_and_the_default_of_one_seed():
    assert list(experiment_from_dict(seeded_experiment([7, 11])).stages)[1:3] == [
        "transition_seed7",
        "transition_seed11",
    ]
    exp = experiment_from_dict(seeded_experiment())
    assert exp.seeds == [0] and "distill_seed0" in exp.stages
    exp = experiment_from_dict(seeded_experiment(1), ["seeds=2"])  # the command line's override wins
    assert exp.seeds == [0, 1]


def test_a_stage_subset_names_a_per_seed_stage_by_its_base_name():
    exp = experiment_from_dict(seeded_experiment(2))
    assert parse_stage_list("data,distill", exp) == ["data", "distill_seed0", "distill_seed1"]
    assert parse_stage_list("distill_seed1", exp) == ["distill_seed1"]


def test_a_saved_experiment_reloads_with_its_copies(tmp_path):
    """--resume-from reloads <run_dir>/experiment.yaml, where the copies are already expanded."""
    from launchers.experiment import load_experiment
    from launchers.plan import save_experiment

    exp = experiment_from_dict(seeded_experiment(2))
    again = load_experiment(save_experiment(exp, tmp_path, base=REPO))
    assert list(again.stages) == list(exp.stages) and again.seeds == [0, 1]
    assert (
        again.stages["distill_seed1"].seed == 1
        and again.stages["distill_seed1"].inputs == exp.stages["distill_seed1"].inputs
    )
    assert parse_stage_list("distill", again) == ["distill_seed0", "distill_seed1"]


def test_an_explicit_seed_override_is_kept():
    raw = seeded_experiment(2)
    raw["stages"]["transition"]["overrides"] = {"seed": 5}
    exp = experiment_from_dict(raw)
    assert [exp.stages[f"transition_seed{s}"].overrides["seed"] for s in range(2)] == [5, 5]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": 0}, "seeds: 0 must be at least 1"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"seeds": "three"}, "neither a count"),
        (
            {"stages.report": {"kind": "evaluate", "args": ["--model", "melt={distill/export}"]}},
            "set stages.report.per_seed",
        ),
        ({"stages.transition.seed": 3}, "stages.transition.seed is set by per_seed: true"),
    ],
)
def test_bad_seed_settings_are_named(change, message):
    raw = seeded_experiment(2)
    for key, value in change.items():
        if key.startswith("stages."):
            name, *rest = key.removeprefix("stages.").split(".")
            if rest:
                raw["stages"][name][rest[0]] = value
            else:
                raw["stages"][name] = value
        else:
            raw[key] = value
    with pytest.raises(ExperimentError, match=message):
        experiment_from_dict(raw)
