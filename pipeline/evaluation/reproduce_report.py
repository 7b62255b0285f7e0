"""`make reproduce`'s report: for each loop count T, MELT (one run per seed) against zero-shot last-loop
KV sharing and the LoopLM (and the standard transformer once), the targets per T on every seed,
MELT / LoopLM against the distillation steps, plots.

Reads ``<run_dir>/evaluate_standard/results.json``, ``<run_dir>/evaluate_t<T>/results.json`` (the
LoopLM and the zero-shot baseline) and ``<run_dir>/evaluate_melt_t<T>_seed<s>/results.json`` (seed s's
MELT; ``melt:<label>`` entries are its intermediate distillation exports, for the step curve).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.evaluation.demo_report import KEEP, phase_time_lines, phase_times, plot_training_curves, save_figure
from pipeline.evaluation.demo_report import training_curves as all_training_curves
from pipeline.evaluation.report import markdown_table
from pipeline.evaluation.seed_results import (
    MELT_OF_LOOPLM,
    check_targets,
    distill_curve,
    first_step_reaching,
    melt_by_seed,
    read_results,
    spread,
    target_lines,
)

BASELINES = ("looplm", "looplm_lastkv")
_EVAL_T = re.compile(r"evaluate_t(\d+)$")


def collect(run_dir: Path, seeds=None) -> tuple[dict, dict[int, dict], dict[int, dict[int, dict]]]:
    """(the standard transformer's entry, {T: {looplm, looplm_lastkv}}, {T: {seed: its results}})."""
    standard = read_results(run_dir / "evaluate_standard" / "results.json", ["standard"], KEEP)["standard"]
    by_loops, melts = {}, {}
    for d in run_dir.glob("evaluate_t*"):
        match = _EVAL_T.match(d.name)
        if match:
            t = int(match.group(1))
            by_loops[t] = read_results(d / "results.json", BASELINES, KEEP)
            melts[t] = melt_by_seed(run_dir, f"evaluate_melt_t{t}", seeds)
    if not by_loops:
        raise FileNotFoundError(f"{run_dir} holds no evaluate_t<T>/results.json")
    order = sorted(by_loops)  # by T (not by name: t16 after t8)
    return standard, {t: by_loops[t] for t in order}, {t: melts[t] for t in order}


def _melt(results: dict) -> dict:
    return {k: results["melt"][k] for k in KEEP if k in results["melt"]}


def summary_rows(standard: dict, by_loops: dict[int, dict], melts: dict[int, dict]) -> list[dict]:
    rows = [{"loops": 1, "looplm": standard["accuracy"], "kv_looplm": standard["kv_cache_bytes"]}]
    for t, c in by_loops.items():
        looplm = c["looplm"]["accuracy"]
        accs = {s: r["melt"]["accuracy"] for s, r in melts[t].items()}
        rows.append(
            {
                "loops": t,
                "looplm": looplm,
                "looplm_lastkv": c["looplm_lastkv"]["accuracy"],
                "melt": spread(accs),
                "melt_over_looplm": spread({s: a / max(looplm, 1e-9) for s, a in accs.items()}),
                "kv_looplm": c["looplm"]["kv_cache_bytes"],
                "kv_melt": max(r["melt"]["kv_cache_bytes"] for r in melts[t].values()),
            }
        )
    return rows


def step_curves(by_loops: dict[int, dict], melts: dict[int, dict]) -> dict[int, dict]:
    """Per T: each seed's (distillation step, MELT / LoopLM) and the first step where every seed
    reaches MELT_OF_LOOPLM of the LoopLM."""
    out = {}
    for t, c in by_loops.items():
        looplm = c["looplm"]["accuracy"]
        curves = {s: distill_curve(r) for s, r in melts[t].items()}
        out[t] = {
            "per_seed": {
                str(s): [(step, acc / max(looplm, 1e-9)) for step, acc in curve] for s, curve in curves.items()
            },
            "first_step_all_seeds_reach_target": first_step_reaching(curves, looplm),
        }
    return out


def _fmt(v, kind="acc") -> str:
    if v is None:
        return "-"
    return f"{v:,}" if kind == "bytes" else f"{v:.3f}"


def _markdown(standard, by_loops, melts, rows, targets, curves, chance, seconds, wall, files) -> str:
    seeds = sorted({s for m in melts.values() for s in m})
    lines = [
        "# MELT reproduction: accuracy and KV cache against the loop count",
        "",
        "S3 word problem (compose k permutations of {0,1,2}; answer: 3 digit tokens, all exact), greedy "
        f"decoding, {len(standard['accuracy_by_difficulty'])} difficulty levels. "
        f"Chance: {chance:.3f}. Every model has the same parameters except MELT's gates. MELT is "
        f"post-trained once per seed ({len(seeds)}: {', '.join(map(str, seeds))}).",
        "",
        "| T | LoopLM (full per-loop KV) | zero-shot last-loop KV | MELT per seed | MELT mean | MELT / LoopLM "
        "mean | **min** | KV bytes LoopLM | KV bytes MELT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["loops"] == 1:
            lines.append(
                f"| 1 (standard) | {_fmt(r['looplm'])} | - | - | - | - | - | {_fmt(r['kv_looplm'], 'bytes')} | - |"
            )
            continue
        per_seed = ", ".join(f"{a:.3f}" for a in r["melt"]["per_seed"].values())
        lines.append(
            f"| {r['loops']} | {_fmt(r['looplm'])} | {_fmt(r['looplm_lastkv'])} | {per_seed} | "
            f"{_fmt(r['melt']['mean'])} | {_fmt(r['melt_over_looplm']['mean'])} | "
            f"**{_fmt(r['melt_over_looplm']['min'])}** | {_fmt(r['kv_looplm'], 'bytes')} | {_fmt(r['kv_melt'], 'bytes')} |"
        )
    lines += [
        "",
        f"## Targets per T, each on every seed (MELT >= {MELT_OF_LOOPLM:.0%} of the LoopLM, clearly above the "
        "standard model and the zero-shot baseline, KV bytes = standard = 1/T of the LoopLM)",
        "",
    ]
    for t, tt in targets.items():
        lines += [f"### T = {t}", "", *target_lines(tt), ""]
    if any(c["per_seed"] for c in curves.values()):
        lines += [
            "## Distillation steps",
            "",
            "MELT / LoopLM after s distillation steps (step 0: the transition's export):",
            "",
        ]
        for t, c in curves.items():
            first = c["first_step_all_seeds_reach_target"]
            reached = (
                f"first reaches {MELT_OF_LOOPLM} on every seed at step {first}"
                if first is not None
                else (f"does not reach {MELT_OF_LOOPLM} on every seed at any evaluated step")
            )
            points = "; ".join(
                f"seed {s}: " + ", ".join(f"{step}: {ratio:.3f}" for step, ratio in curve)
                for s, curve in c["per_seed"].items()
            )
            lines.append(f"- T = {t}: {reached} ({points})")
    table = {"standard": standard}
    for t, c in by_loops.items():
        table.update({f"{n} T={t}": c[n] for n in BASELINES})
        table.update({f"melt T={t} seed {s}": _melt(r) for s, r in melts[t].items()})
    lines += ["", "## By difficulty", "", markdown_table(table)]
    lines += phase_time_lines(seconds, wall)
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in files.items()]
    return "\n".join(lines) + "\n"


def _plots(
    run_dir: Path, standard: dict, by_loops: dict, melts: dict, rows: list, curves: dict, chance
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    loops = [r["loops"] for r in rows[1:]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(loops, [r["looplm"] for r in rows[1:]], marker="o", label="LoopLM (full per-loop KV)")
    mean = [r["melt"]["mean"] for r in rows[1:]]
    low = [m - r["melt"]["min"] for m, r in zip(mean, rows[1:])]
    high = [r["melt"]["max"] - m for m, r in zip(mean, rows[1:])]
    line = ax.errorbar(
        loops, mean, yerr=[low, high], marker="o", capsize=4, label="MELT (mean; bars: min-max over seeds)"
    )
    for r in rows[1:]:  # every seed as a point
        seeds = list(r["melt"]["per_seed"].values())
        ax.scatter([r["loops"]] * len(seeds), seeds, s=10, color=line[0].get_color(), alpha=0.6, zorder=3)
    ax.plot(loops, [r["looplm_lastkv"] for r in rows[1:]], marker="o", label="zero-shot last-loop KV")
    ax.axhline(standard["accuracy"], color="gray", linestyle="--", label="standard transformer (T = 1)")
    ax.axhline(chance, color="lightgray", linestyle=":", label=f"chance ({chance:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(loops, [str(t) for t in loops])
    ax.set_xlabel("loops T")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy against the loop count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, run_dir, "accuracy_vs_loops", files)

    fig, axes = plt.subplots(1, len(by_loops), figsize=(4.2 * len(by_loops), 3.8), sharey=True, squeeze=False)
    for ax, (t, c) in zip(axes[0], by_loops.items()):
        entries = [("standard", standard), *((n, c[n]) for n in BASELINES)]
        entries += [(f"melt seed {s}", r["melt"]) for s, r in melts[t].items()]
        for name, entry in entries:
            ks = sorted(entry["accuracy_by_difficulty"], key=int)
            style = {"linewidth": 1, "alpha": 0.8} if name.startswith("melt") else {}
            ax.plot(
                [int(k) for k in ks], [entry["accuracy_by_difficulty"][k] for k in ks], marker=".", label=name, **style
            )
        ax.set_title(f"T = {t}")
        ax.set_xlabel("difficulty k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, run_dir, "accuracy_by_difficulty", files)

    if any(c["per_seed"] for c in curves.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for t, c in curves.items():
            color = None
            for s, curve in c["per_seed"].items():
                drawn = ax.plot(
                    [p[0] for p in curve],
                    [p[1] for p in curve],
                    marker=".",
                    linewidth=1,
                    color=color,
                    label=f"T = {t}" if color is None else None,
                )
                color = drawn[0].get_color()
        ax.axhline(MELT_OF_LOOPLM, color="gray", linestyle="--", label=f"target {MELT_OF_LOOPLM}")
        ax.set_xlabel("distillation step (0: after the transition)")
        ax.set_ylabel("MELT / LoopLM (exact match)")
        ax.set_title("MELT against distillation steps (a line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, run_dir, "melt_vs_distill_steps", files)
    plot_training_curves(run_dir, all_training_curves(run_dir, _training_stages(run_dir)), files)
    return files


def _training_stages(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl"))


def write_report(run_dir: Path, experiment=None) -> dict:
    run_dir = Path(run_dir)
    seeds = experiment.seeds if experiment is not None else None
    standard, by_loops, melts = collect(run_dir, seeds)
    manifest = json.loads((run_dir / "data" / "eval" / "manifest.json").read_text())
    chance = float(manifest.get("chance", 0.0))
    rows = summary_rows(standard, by_loops, melts)
    targets = {
        t: check_targets({"standard": standard, **c}, {s: _melt(r) for s, r in melts[t].items()})
        for t, c in by_loops.items()
    }
    curves = step_curves(by_loops, melts)
    seconds, wall = phase_times(run_dir)
    files = _plots(run_dir, standard, by_loops, melts, rows, curves, chance)
    report = {
        "standard": standard,
        "by_loops": {
            str(t): {**c, "melt": {str(s): _melt(r) for s, r in melts[t].items()}} for t, c in by_loops.items()
        },
        "summary": rows,
        "targets": {str(t): tt for t, tt in targets.items()},
        "all_targets_met": all(v["met"] for tt in targets.values() for v in tt.values()),
        "distill_steps": {str(t): c for t, c in curves.items()},
        "chance": chance,
        "task": manifest.get("task"),
        "phase_seconds": seconds,
        "wall_seconds": wall,
        "figures": files,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(standard, by_loops, melts, rows, targets, curves, chance, seconds, wall, files)
    (run_dir / "report.md").write_text(markdown)
    return {**report, "markdown": markdown}
