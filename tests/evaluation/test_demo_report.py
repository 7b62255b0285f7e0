"""The demo report: an entry per contender with the required keys, targets checked against the
measured figures, KV bytes read from caches, plots written."""

import json

from launchers.experiment import experiment_from_dict
from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.demo_report import write_report
from pipeline.evaluation.seed_results import check_targets
from pipeline.models import MeltForCausalLM
from tests.model_helpers import tiny_looplm, write_eval_split

from .test_evaluation import _split


def demo_experiment(seeds) -> dict:
    stages = {"evaluate_melt": {"kind": "evaluate", "per_seed": True, "args": ["--model", "melt=x"]}}
    return {"name": "demo", "seeds": seeds, "stages": stages}


def test_report_from_a_finished_run(tmp_path):
    run = tmp_path / "run"
    lm = tiny_looplm()
    split = _split(lm)
    data = write_eval_split(run / "data" / "eval", split)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(chance=1 / 6, task="toy")
    (data / "manifest.json").write_text(json.dumps(manifest))
    lm.save_pretrained(run / "pretrain" / "export")
    tiny_looplm(total_ut_steps=1).save_pretrained(run / "pretrain_standard" / "export")
    MeltForCausalLM.from_looplm(lm, chunk_size=1).save_pretrained(run / "distill_seed0" / "export")
    MeltForCausalLM.from_looplm(lm, chunk_size=1, gate="overwrite").save_pretrained(run / "distill_seed1" / "export")
    (run / "pretrain").mkdir(exist_ok=True)
    (run / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 1 / s}) + "\n" for s in range(1, 5))
    )
    models = {
        "standard": "pretrain_standard",
        "looplm": "pretrain",
        "looplm_lastkv": "pretrain",
        "looplm_lastkv_chunked": "pretrain",
    }
    argv = [a for name, phase in models.items() for a in ("--model", f"{name}={run / phase / 'export'}")]
    assert evaluate_main(argv + ["--data", str(data), "--out", str(run / "evaluate" / "results.json")]) == 0
    for seed in (0, 1):  # MELT once per seed, in its own stage
        melt = ["--model", f"melt={run / f'distill_seed{seed}' / 'export'}", "--data", str(data)]
        assert evaluate_main(melt + ["--out", str(run / f"evaluate_melt_seed{seed}" / "results.json")]) == 0

    report = write_report(run)
    saved = json.loads((run / "report.json").read_text())
    melts = saved["melt"]
    assert set(melts) == {"0", "1"}
    for name, entry in (*((n, saved[n]) for n in ("standard", "looplm", "looplm_lastkv")), *melts.items()):
        for key in ("accuracy", "accuracy_by_difficulty", "kv_cache_bytes", "loops", "parameters"):
            assert key in entry, (name, key)
    assert saved["looplm"]["accuracy"] == 0.5 and saved["chance"] == 1 / 6
    for melt in melts.values():
        assert melt["kv_cache_bytes"] == saved["standard"]["kv_cache_bytes"] == saved["looplm"]["kv_cache_bytes"] // 3
    accuracies = [melts[s]["accuracy"] for s in ("0", "1")]
    assert saved["melt_accuracy"]["min"] == min(accuracies) and saved["melt_accuracy"]["per_seed"]["1"] == accuracies[1]
    assert saved["melt_over_looplm"]["mean"] == sum(accuracies) / 2 / 0.5
    assert saved["targets"]["melt_at_least_98pct_of_looplm_on_every_seed"]["value"] == saved["melt_over_looplm"]["min"]
    assert (
        saved["targets"]["melt_kv_equals_standard"]["met"] and saved["targets"]["melt_kv_is_1_over_T_of_looplm"]["met"]
    )
    kv = {(r["model"], r["loops"]): r["kv_cache_bytes"] for r in saved["kv_bytes_vs_loops"]}
    assert kv[("melt", 8)] == kv[("melt", 1)] == kv[("looplm", 1)] and kv[("looplm", 8)] == 8 * kv[("looplm", 1)]
    for png in ("accuracy_by_difficulty.png", "kv_bytes_vs_loops.png", "training_curves.png"):
        assert (run / png).stat().st_size > 1000
    assert "| melt (seed 1) |" in report["markdown"] and (run / "report.md").read_text() == report["markdown"]
    assert "MELT over 2 seed(s)" in report["markdown"]
    assert set(write_report(run, experiment_from_dict(demo_experiment(seeds=[1])))["melt"]) == {"1"}
    assert saved["starting_points"]["looplm"].endswith("(pretrained in this run)")
    # a shipped pretrained model says so, and where its provenance is
    provenance = run / "pretrain_standard" / "PROVENANCE.md"  # beside the model's folder, as in assets/demo/
    provenance.write_text("made by ...")
    shipped = write_report(run)["starting_points"]
    assert shipped["standard"].endswith(f"(shipped pretrained model: {provenance})")
    assert shipped["looplm"].endswith("(pretrained in this run)")


def test_targets_say_plainly_when_they_are_missed_on_any_seed():
    entry = lambda acc, kv, loops: {"accuracy": acc, "kv_cache_bytes": kv, "loops": loops}  # noqa: E731
    others = {"standard": entry(0.6, 100, 1), "looplm": entry(0.9, 400, 4), "looplm_lastkv": entry(0.2, 100, 4)}
    melts = {0: entry(0.9, 100, 4), 1: entry(0.85, 100, 4)}
    targets = check_targets(others, melts)
    assert not targets["melt_at_least_98pct_of_looplm_on_every_seed"]["met"]  # seed 1: 0.85 < 0.98 * 0.9
    assert targets["melt_at_least_98pct_of_looplm_on_every_seed"]["value"] == 0.85 / 0.9
    assert targets["melt_clearly_above_standard_on_every_seed"]["met"]
    assert targets["melt_clearly_above_zero_shot_last_kv_on_every_seed"]["met"]
    melts[1] = entry(0.9, 200, 4)
    targets = check_targets(others, melts)
    assert (
        targets["melt_at_least_98pct_of_looplm_on_every_seed"]["met"] and not targets["melt_kv_equals_standard"]["met"]
    )
    melts[1] = entry(0.62, 100, 4)  # above the standard model, not clearly
    assert not check_targets(others, melts)["melt_clearly_above_standard_on_every_seed"]["met"]
