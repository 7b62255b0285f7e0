"""`make reproduce`'s report: a row per loop count from the evaluate stages' results, MELT per seed
(mean, minimum), the targets per T on every seed, the distillation-step curve from intermediate
exports, the standard transformer once, plots; missing results named."""

import json

import pytest

from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.reproduce_report import write_report
from pipeline.models import MeltForCausalLM
from tests.model_helpers import tiny_looplm, write_eval_split

from .test_evaluation import _split


def _evaluate(run, stage, data, models: dict) -> None:
    argv = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    assert evaluate_main(argv + ["--data", str(data), "--out", str(run / stage / "results.json")]) == 0


def _export(model, path, phase, step):
    model.save_pretrained(path)
    (path / "export_info.json").write_text(json.dumps({"phase": phase, "step": step}))
    return path


def test_report_has_a_row_per_loop_count_and_melt_per_seed(tmp_path):
    run = tmp_path / "run"
    data = write_eval_split(run / "data" / "eval", _split(tiny_looplm()))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "chance": 1 / 6, "task": "toy"}))
    standard = run / "assets" / "standard"
    tiny_looplm(total_ut_steps=1).save_pretrained(standard)
    _evaluate(run, "evaluate_standard", data, {"standard": standard})
    for t in (2, 4):
        lm = tiny_looplm(total_ut_steps=t)
        lm.save_pretrained(run / "assets" / f"looplm_t{t}")
        _evaluate(
            run, f"evaluate_t{t}", data, {n: run / "assets" / f"looplm_t{t}" for n in ("looplm", "looplm_lastkv")}
        )
        for seed, gate in ((0, "elementwise"), (1, "overwrite")):
            melt = MeltForCausalLM.from_looplm(lm, chunk_size=1, gate=gate)
            distill = run / f"distill_t{t}_seed{seed}"
            models = {
                "melt:transition": _export(melt, run / f"transition_t{t}_seed{seed}" / "export", "transition", 4),
                "melt:step2": _export(melt, distill / "exports" / "step_00000002", "distill", 2),
                "melt": _export(melt, distill / "export", "distill", 4),
            }
            _evaluate(run, f"evaluate_melt_t{t}_seed{seed}", data, models)
    (run / "transition_t2_seed0").mkdir(exist_ok=True)
    (run / "transition_t2_seed0" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 1 / s}) + "\n" for s in range(1, 5))
    )
    (run / "local").mkdir()
    (run / "local" / "distill_t2_seed0.log").write_text("[local] x: exit 0 after 30s, at 2026-01-01T10:00:30\n")
    (run / "local" / "distill_t4_seed0.log").write_text("[local] x: exit 0 after 20s, at 2026-01-01T10:00:40\n")

    report = write_report(run)
    saved = json.loads((run / "report.json").read_text())
    assert [r["loops"] for r in saved["summary"]] == [1, 2, 4]
    kv_standard = saved["standard"]["kv_cache_bytes"]
    for t in (2, 4):
        entry = saved["by_loops"][str(t)]
        assert entry["looplm"]["loops"] == t and entry["looplm"]["kv_cache_bytes"] == t * kv_standard
        assert set(entry["melt"]) == {"0", "1"}
        assert all(m["kv_cache_bytes"] == kv_standard for m in entry["melt"].values())
        assert saved["targets"][str(t)]["melt_kv_is_1_over_T_of_looplm"]["met"]
        row = next(r for r in saved["summary"] if r["loops"] == t)
        accs = [entry["melt"][s]["accuracy"] for s in ("0", "1")]
        assert row["melt"]["min"] == min(accs) and row["melt"]["per_seed"] == dict(zip(("0", "1"), accs))
        looplm = entry["looplm"]["accuracy"]
        assert row["melt_over_looplm"]["min"] == pytest.approx(min(accs) / looplm)
        assert saved["targets"][str(t)]["melt_at_least_98pct_of_looplm_on_every_seed"]["value"] == pytest.approx(
            min(accs) / looplm
        )
        curve = saved["distill_steps"][str(t)]["per_seed"]["1"]
        assert [step for step, _ in curve] == [0, 2, 4]  # the transition's export, then the distillation's
        assert curve[-1][1] == pytest.approx(accs[1] / looplm)
    assert saved["wall_seconds"] == 40.0  # 10:00:00 (first start) -> 10:00:40
    assert "| 4 |" in report["markdown"] and "| 1 (standard) |" in report["markdown"]
    assert "## Distillation steps" in report["markdown"]
    for png in (
        "accuracy_vs_loops.png",
        "accuracy_by_difficulty.png",
        "melt_vs_distill_steps.png",
        "training_curves.png",
    ):
        assert (run / png).stat().st_size > 1000


def test_missing_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate_standard/results.json is missing"):
        write_report(tmp_path)
