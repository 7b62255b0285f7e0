"""MELT's results over seeds, as the demo and the reproduction report them.

An experiment post-trains MELT once per seed (launchers/seeds.py): stage ``<prefix>_seed<s>``
evaluates seed s's MELT (``melt``) and, optionally, its intermediate distillation exports
(``melt:<label>``, each export's ``export_info.json`` giving its step). The seed-independent
contenders (the LoopLM, the baselines, the standard transformer) are evaluated once elsewhere.
The targets hold for every seed: the minimum over seeds is what is checked.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Optional

CLEAR_MARGIN = 0.05  # "clearly above": at least 5 points of exact match
MELT_OF_LOOPLM = 0.98  # MELT keeps at least 98% of the LoopLM's accuracy


def read_results(path: Path, names, keep, optional=()) -> dict:
    """The named contenders' entries of an evaluate stage's results.json (only the keys in keep),
    then those of `optional` that it holds."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: that evaluate stage has not finished")
    results = json.loads(path.read_text())["results"]
    missing = [n for n in names if n not in results]
    if missing:
        raise ValueError(f"{path} lacks the contenders {missing}")
    return {n: {k: results[n][k] for k in keep if k in results[n]} for n in [*names, *optional] if n in results}


def melt_by_seed(run_dir: Path, prefix: str, seeds: Optional[list[int]] = None) -> dict[int, dict]:
    """{seed: that seed's results (every contender of <prefix>_seed<s>/results.json)}, by seed; of
    the given seeds (the experiment's), else of every seed found."""
    if seeds is None:
        pattern = re.compile(re.escape(prefix) + r"_seed(\d+)$")
        found = (pattern.match(d.name) for d in Path(run_dir).glob(f"{prefix}_seed*"))
        seeds = [int(m.group(1)) for m in found if m]
    out = {}
    for seed in seeds:
        path = Path(run_dir) / f"{prefix}_seed{seed}" / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: that evaluate stage has not finished")
        out[seed] = json.loads(path.read_text())["results"]
    if not out:
        raise FileNotFoundError(f"{run_dir} holds no {prefix}_seed<s>/results.json (MELT's evaluation per seed)")
    for seed, results in out.items():
        if "melt" not in results:
            raise ValueError(f"{run_dir}/{prefix}_seed{seed}/results.json lacks the contender 'melt'")
    return dict(sorted(out.items()))


def spread(values: dict[int, float]) -> dict:
    """Per seed, mean, min and max of a figure measured once per seed."""
    v = list(values.values())
    return {
        "per_seed": {str(s): x for s, x in values.items()},
        "mean": statistics.fmean(v),
        "min": min(v),
        "max": max(v),
        "seeds": len(v),
    }


def export_step(model_path: str) -> Optional[tuple[str, int]]:
    """(phase, step) of an export, from the export_info.json the trainer writes beside its weights."""
    info = Path(model_path) / "export_info.json"
    if not info.is_file():
        return None
    data = json.loads(info.read_text())
    return data.get("phase", ""), int(data.get("step", 0))


def distill_curve(results: dict) -> list[tuple[int, float]]:
    """(distillation step, accuracy) of every MELT entry of one seed's results: the intermediate
    exports, the final one, and the transition's export as step 0; sorted by step."""
    points = {}
    for name, entry in results.items():
        if name.split(":")[0] != "melt" or "accuracy" not in entry:
            continue
        where = export_step(entry.get("model_path", ""))
        if where is None:
            continue
        phase, step = where
        if phase == "distill":
            points[step] = entry["accuracy"]
        elif phase == "transition":
            points[0] = entry["accuracy"]
    return sorted(points.items())


def first_step_reaching(curves: dict[int, list[tuple[int, float]]], looplm: float, ratio: float = MELT_OF_LOOPLM):
    """The first distillation step at which every seed's MELT reaches ratio x the LoopLM's accuracy
    (None when some step evaluated on one seed is missing on another, or none reaches it)."""
    steps = sorted({s for curve in curves.values() for s, _ in curve})
    for step in steps:
        accs = [dict(curve).get(step) for curve in curves.values()]
        if all(a is not None and a >= ratio * looplm for a in accs):
            return step
    return None


def check_targets(others: dict, melts: dict[int, dict]) -> dict:
    """The claims, each on every seed. others: the seed-independent contenders (standard, looplm and
    the zero-shot baselines looplm_lastkv[_chunked]); melts: {seed: MELT's entry}."""
    looplm, standard = others["looplm"], others["standard"]
    baselines = [others[k]["accuracy"] for k in ("looplm_lastkv", "looplm_lastkv_chunked") if k in others]
    accs = [m["accuracy"] for m in melts.values()]
    kvs = [m["kv_cache_bytes"] for m in melts.values()]
    return {
        "melt_at_least_98pct_of_looplm_on_every_seed": {
            "met": min(accs) >= MELT_OF_LOOPLM * looplm["accuracy"],
            "value": min(accs) / max(looplm["accuracy"], 1e-9),
        },
        "melt_clearly_above_standard_on_every_seed": {
            "met": min(accs) >= standard["accuracy"] + CLEAR_MARGIN,
            "value": min(accs) - standard["accuracy"],
        },
        "melt_clearly_above_zero_shot_last_kv_on_every_seed": {
            "met": all(a >= b + CLEAR_MARGIN for a in accs for b in baselines),
            "value": min(accs) - max(baselines),
        },
        "melt_kv_equals_standard": {
            "met": all(kv == standard["kv_cache_bytes"] for kv in kvs),
            "value": max(kvs) / standard["kv_cache_bytes"],
        },
        "melt_kv_is_1_over_T_of_looplm": {
            "met": all(kv * looplm["loops"] == looplm["kv_cache_bytes"] for kv in kvs),
            "value": max(kvs) / looplm["kv_cache_bytes"],
        },
    }


def target_lines(targets: dict) -> list[str]:
    lines = [
        f"- {'met' if t['met'] else 'NOT MET'}: {name.replace('_', ' ')} ({t['value']:.3f})"
        for name, t in targets.items()
    ]
    if not all(t["met"] for t in targets.values()):
        lines += ["", "**Some targets are not met** (see above); the figures are reported as measured."]
    return lines
