"""`make reproduce`'s report: a row per loop count from the evaluate phases' results, the targets per
T, the standard transformer once, plots; missing results named."""

import json

import pytest

from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.reproduce_report import write_report
from pipeline.models import MeltForCausalLM
from tests.model_helpers import tiny_looplm, write_eval_split

from .test_evaluation import _split


def _evaluate(run, phase, data, models: dict) -> None:
    argv = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    assert evaluate_main(argv + ["--data", str(data), "--out", str(run / phase / "results.json")]) == 0


def test_report_has_a_row_per_loop_count(tmp_path):
    run = tmp_path / "run"
    data = write_eval_split(run / "data" / "eval", _split(tiny_looplm()))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "chance": 1 / 6, "task": "toy"}))
    standard = run / "pretrain_standard" / "export"
    tiny_looplm(total_ut_steps=1).save_pretrained(standard)
    _evaluate(run, "evaluate_standard", data, {"standard": standard})
    for t in (2, 4):
        lm = tiny_looplm(total_ut_steps=t)
        lm.save_pretrained(run / f"pretrain_t{t}" / "export")
        MeltForCausalLM.from_looplm(lm, chunk_size=1).save_pretrained(run / f"distill_t{t}" / "export")
        _evaluate(
            run,
            f"evaluate_t{t}",
            data,
            {
                "looplm": run / f"pretrain_t{t}" / "export",
                "looplm_lastkv": run / f"pretrain_t{t}" / "export",
                "melt": run / f"distill_t{t}" / "export",
            },
        )
    (run / "pretrain_t2" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 1 / s}) + "\n" for s in range(1, 5))
    )
    (run / "local").mkdir()
    (run / "local" / "pretrain_t2.log").write_text("[local] pretrain_t2: exit 0 after 30s, at 2026-01-01T10:00:30\n")
    (run / "local" / "pretrain_t4.log").write_text("[local] pretrain_t4: exit 0 after 20s, at 2026-01-01T10:00:40\n")

    report = write_report(run)
    saved = json.loads((run / "report.json").read_text())
    assert [r["loops"] for r in saved["summary"]] == [1, 2, 4]
    kv_standard = saved["standard"]["kv_cache_bytes"]
    for t in (2, 4):
        entry = saved["by_loops"][str(t)]
        assert entry["looplm"]["loops"] == t and entry["looplm"]["kv_cache_bytes"] == t * kv_standard
        assert entry["melt"]["kv_cache_bytes"] == entry["looplm_lastkv"]["kv_cache_bytes"] == kv_standard
        assert saved["targets"][str(t)]["melt_kv_is_1_over_T_of_looplm"]["met"]
        row = next(r for r in saved["summary"] if r["loops"] == t)
        assert row["melt"] == entry["melt"]["accuracy"] and row["kv_looplm"] == t * kv_standard
    assert saved["wall_seconds"] == 40.0  # 10:00:00 (first start) -> 10:00:40
    assert "| 4 |" in report["markdown"] and "| 1 (standard) |" in report["markdown"]
    for png in ("accuracy_vs_loops.png", "accuracy_by_difficulty.png", "training_curves.png"):
        assert (run / png).stat().st_size > 1000


def test_missing_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate_standard/results.json is missing"):
        write_report(tmp_path)
