"""The demo's report: one entry per contender, the paper's three claims checked plainly,
KV bytes against the loop count, and plots (accuracy by difficulty, KV bytes, training curves)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import torch

from pipeline.bench.common import generate
from pipeline.evaluation.report import markdown_table
from pipeline.evaluation.seed_results import check_targets, melt_by_seed, read_results, spread, target_lines
from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltForCausalLM

KEEP = (
    "accuracy",
    "accuracy_by_difficulty",
    "kv_cache_bytes",
    "kv_bytes_per_token",
    "loops",
    "parameters",
    "perplexity",
    "loop_perplexity",
    "scoring_chunking",
    "decode_tokens_per_s",
    "samples",
    "model_path",
)
TRAIN_STAGES = re.compile(r"(pretrain|pretrain_standard|transition|distill)(_seed\d+)?$")


def kv_bytes_against_loops(export_dir: Path, tokens: int, loops=(1, 2, 4, 8)) -> list[dict]:
    """Cache bytes read from the cache objects after generating `tokens` tokens, for the demo's
    architecture at each loop count (random weights: the size does not depend on them)."""
    rows = []
    for t in loops:
        looplm = LoopLMForCausalLM(LoopLMConfig.from_pretrained(export_dir, total_ut_steps=t)).eval()
        prompt = torch.randint(4, looplm.config.vocab_size, (1, tokens // 2))
        for name, model in (("looplm", looplm), ("melt", MeltForCausalLM.from_looplm(looplm, chunk_size=1).eval())):
            cache = generate(model, prompt, tokens - prompt.shape[1]).past_key_values
            rows.append({"model": name, "loops": t, "context": cache.get_seq_length(), "kv_cache_bytes": cache.nbytes})
    return rows


_PHASE_END = re.compile(r"\[local\] \S+: exit 0 after (\d+)s(?:, at (\S+))?")


def _phase_runs(run_dir: Path) -> dict[str, tuple[float, str | None]]:
    """Each phase's last successful run in the local launcher's logs: (seconds, end time or None)."""
    out = {}
    for log in sorted((run_dir / "local").glob("*.log")):
        found = _PHASE_END.findall(log.read_text(errors="replace"))
        if found:
            seconds, ended = found[-1]
            out[log.stem] = (float(seconds), ended or None)
    return out


def phase_times(run_dir: Path) -> tuple[dict[str, float], float | None]:
    """Wall time of each phase (its last successful run in the local launcher's logs), and from the
    first phase's start to the last phase's end (phases may have run side by side; None when a log
    does not say when its phase ended)."""
    runs = _phase_runs(run_dir)
    seconds = {name: s for name, (s, _) in runs.items()}
    if not runs or any(ended is None for _, ended in runs.values()):
        return seconds, None
    spans = [(datetime.fromisoformat(ended).timestamp(), s) for s, ended in runs.values() if ended is not None]
    return seconds, max(end for end, _ in spans) - min(end - s for end, s in spans)


def training_curves(run_dir: Path, stages=None) -> dict[str, list[tuple[int, float]]]:
    """train/loss against the step of each training stage (default: the demo's, every seed)."""
    if stages is None:
        stages = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl") if TRAIN_STAGES.match(p.parent.name))
    curves = {}
    for phase in stages:
        path = run_dir / phase / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            curves[phase] = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    return curves


def save_figure(fig, run_dir: Path, key: str, files: dict[str, str]) -> None:
    """Write the figure as <run_dir>/<key>.png, close it and list it in files."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(run_dir / f"{key}.png", dpi=120)
    plt.close(fig)
    files[key] = f"{key}.png"


def plot_training_curves(run_dir: Path, curves: dict, files: dict[str, str]) -> None:
    """train/loss of each training stage, the seeds of one stage in one panel."""
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list]] = {}
    for stage, points in curves.items():
        panels.setdefault(re.sub(r"_seed\d+$", "", stage), {})[stage] = points
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for stage, points in lines.items():
            seed = stage.removeprefix(panel).removeprefix("_")
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, label=seed or None)
        ax.set_title(panel)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train/loss")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    save_figure(fig, run_dir, "training_curves", files)


def _plots(run_dir: Path, contenders: dict, melts: dict, chance: float, kv_rows: list, curves: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in contenders.items():
        ks = sorted(c["accuracy_by_difficulty"], key=int)
        ax.plot([int(k) for k in ks], [c["accuracy_by_difficulty"][k] for k in ks], marker="o", label=name)
    ks = sorted(next(iter(melts.values()))["accuracy_by_difficulty"], key=int)
    by_k = [[m["accuracy_by_difficulty"][k] for m in melts.values()] for k in ks]
    mean = [sum(v) / len(v) for v in by_k]
    line = ax.plot([int(k) for k in ks], mean, marker="o", label=f"melt (mean of {len(melts)} seeds)")[0]
    if len(melts) > 1:  # the spread over seeds: min to max
        ax.fill_between(
            [int(k) for k in ks], [min(v) for v in by_k], [max(v) for v in by_k], color=line.get_color(), alpha=0.25
        )
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3f})")
    ax.set_xlabel("difficulty k (permutations composed)")
    ax.set_ylabel("exact match (all answer tokens)")
    ax.set_ylim(0, 1.02)
    ax.set_title("S3 word problem: accuracy by difficulty")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, run_dir, "accuracy_by_difficulty", files)

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in ("looplm", "melt"):
        rows = [r for r in kv_rows if r["model"] == model]
        ax.plot([r["loops"] for r in rows], [r["kv_cache_bytes"] for r in rows], marker="o", label=model)
    standard = next(r["kv_cache_bytes"] for r in kv_rows if r["model"] == "looplm" and r["loops"] == 1)
    ax.axhline(standard, color="gray", linestyle="--", label="standard transformer (T = 1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T")
    ax.set_ylabel(f"KV cache bytes ({kv_rows[0]['context']} tokens)")
    ax.set_title("KV cache against the loop count")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, run_dir, "kv_bytes_vs_loops", files)
    plot_training_curves(run_dir, curves, files)
    return files


def phase_time_lines(seconds: dict, wall: float | None) -> list[str]:
    if not seconds:
        return []
    lines = ["", "## Phase wall time", ""] + [f"- {k}: {v:.0f} s" for k, v in seconds.items()]
    if wall is not None:
        lines.append(f"- all phases, first start to last end: {wall:.0f} s (independent phases side by side)")
    return lines


def starting_points(contenders: dict) -> dict[str, str]:
    """Where the pretrained contenders came from: a shipped model (a PROVENANCE.md beside its folder
    says how it was made) or this run's pretraining."""
    out = {}
    for name in ("looplm", "standard"):
        path = Path(contenders[name].get("model_path", ""))
        shipped = (path.parent / "PROVENANCE.md").is_file()
        out[name] = (
            f"{path} ({'shipped pretrained model: ' + str(path.parent / 'PROVENANCE.md') if shipped else 'pretrained in this run'})"
        )
    return out


def seed_lines(melts: dict, looplm: dict) -> list[str]:
    """MELT per seed, mean and minimum, as fractions of the LoopLM's accuracy too."""
    acc = spread({seed: m["accuracy"] for seed, m in melts.items()})
    ratio = {k: acc[k] / max(looplm["accuracy"], 1e-9) for k in ("mean", "min")}
    seeds = ", ".join(f"seed {s}: {a:.3f}" for s, a in acc["per_seed"].items())
    return [
        f"MELT over {acc['seeds']} seed(s) ({seeds}): mean {acc['mean']:.3f}, min {acc['min']:.3f}; "
        f"MELT / LoopLM mean {ratio['mean']:.3f}, min {ratio['min']:.3f}."
    ]


def _markdown(contenders, melts, targets, chance, kv_rows, seconds, wall, files) -> str:
    table = {**contenders, **{f"melt (seed {s})": m for s, m in melts.items()}}
    lines = [
        "# MELT demo: the paper's claims in miniature",
        "",
        "S3 word problem (compose k permutations of {0,1,2}; answer: 3 digit tokens, all exact), "
        f"greedy decoding. Chance (best prompt-blind guess): {chance:.3f}.",
        "",
        markdown_table(table),
        "",
        *seed_lines(melts, contenders["looplm"]),
        "",
        "- `looplm_lastkv`: zero-shot baseline in Ouro's setting (the prompt with the full per-loop "
        "cache, decoded tokens see earlier tokens through their last loop only); with MELT's chunking "
        "(the prompt as one chunk, the answer token by token) it is the same computation.",
        "- `looplm_lastkv_chunked`: the same zero-shot baseline token by token from the first token.",
        *[f"- `{name}` from {where}" for name, where in starting_points(contenders).items()],
        "",
        "## Targets (each on every seed)",
        "",
        *target_lines(targets),
    ]
    lines += ["", "## KV cache bytes against loops", "", "| T | LoopLM | MELT |", "|---|---|---|"]
    for t in sorted({r["loops"] for r in kv_rows}):
        by = {r["model"]: r["kv_cache_bytes"] for r in kv_rows if r["loops"] == t}
        lines.append(f"| {t} | {by['looplm']:,} | {by['melt']:,} |")
    lines += phase_time_lines(seconds, wall)
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in files.items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, experiment=None) -> dict:
    """Reads <run_dir>/evaluate/results.json (the standard transformer, the LoopLM, the zero-shot
    baselines) and <run_dir>/evaluate_melt_seed<s>/results.json (MELT, one per seed)."""
    run_dir = Path(run_dir)
    seeds = experiment.seeds if experiment is not None else None  # else every seed evaluated
    path = run_dir / "evaluate" / "results.json"
    contenders = read_results(path, ["standard", "looplm", "looplm_lastkv"], KEEP, optional=["looplm_lastkv_chunked"])
    melts = {
        seed: {k: r["melt"][k] for k in KEEP if k in r["melt"]}
        for seed, r in melt_by_seed(run_dir, "evaluate_melt", seeds).items()
    }
    manifest = json.loads((run_dir / "data" / "eval" / "manifest.json").read_text())
    chance = float(manifest.get("chance", 0.0))
    kv_rows = kv_bytes_against_loops(Path(contenders["looplm"]["model_path"]), manifest["seq_len"])
    curves = training_curves(run_dir)
    targets = check_targets(contenders, melts)
    seconds, wall = phase_times(run_dir)
    files = _plots(run_dir, contenders, melts, chance, kv_rows, curves)
    looplm = contenders["looplm"]["accuracy"]
    report = {
        **contenders,
        "melt": {str(s): m for s, m in melts.items()},
        "melt_accuracy": spread({s: m["accuracy"] for s, m in melts.items()}),
        "melt_over_looplm": spread({s: m["accuracy"] / max(looplm, 1e-9) for s, m in melts.items()}),
        "chance": chance,
        "task": manifest.get("task"),
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "kv_bytes_vs_loops": kv_rows,
        "phase_seconds": seconds,
        "wall_seconds": wall,
        "figures": files,
        "starting_points": starting_points(contenders),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(contenders, melts, targets, chance, kv_rows, seconds, wall, files)
    (run_dir / "report.md").write_text(markdown)
    return {**report, "markdown": markdown}
