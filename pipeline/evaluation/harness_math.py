"""A GSM8K-format JSONL file as a local lm-evaluation-harness task (no downloads): our prompt
text (chat template or plain, as `python -m pipeline.evaluate --math` renders it), greedy
generate_until, and lm_eval's own gsm8k filters: strict `#### <number>` and flexible last number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from .harness import run_local_task
from .math_data import load_math_task
from .math_prompts import PromptConfig, render_prompts

TASK = "melt_gsm8k"

# lm_eval's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml): exact match after these, per filter
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
FILTERS = {
    "strict": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}],
    "flexible": [
        {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
        {"function": "take_first"},
    ],
}


def write_math_task(
    path: str | Path, tokenizer, prompt: PromptConfig, max_new_tokens: int, out_dir: Path, limit: Optional[int] = None
) -> dict:
    """The problems as JSONL (prompt text, gold answer) plus the task YAML in out_dir; returns
    what the task is (problems, prompt record)."""
    task = load_math_task("gsm8k", path, limit)
    texts, prompt_info = render_prompts(tokenizer, task, prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{TASK}.jsonl"
    with data_file.open("w") as f:
        for text, problem in zip(texts, task.problems):
            f.write(json.dumps({"prompt": text, "answer": problem.gold}) + "\n")
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": prompt_info["stop"], "max_gen_toks": max_new_tokens, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": IGNORE,
            }
        ],
        "filter_list": [{"name": name, "filter": steps} for name, steps in FILTERS.items()],
        "metadata": {"version": 1.0},
    }
    (out_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {"problems": len(task.problems), "prompt": prompt_info}


def run_math_harness(
    model_dir: str | Path,
    data: str | Path,
    work_dir: Path,
    prompt: PromptConfig,
    max_new_tokens: int = 256,
    limit: Optional[int] = None,
    batch_size: int = 32,
) -> dict:
    """lm_eval's strict and flexible exact match (greedy) of the model on a GSM8K-format file."""
    from transformers import AutoTokenizer

    task = write_math_task(data, AutoTokenizer.from_pretrained(model_dir), prompt, max_new_tokens, work_dir, limit)
    results = run_local_task(model_dir, TASK, work_dir, limit, batch_size)
    return {
        "task": TASK,
        "model": str(model_dir),
        "data": str(data),
        **task,
        "max_new_tokens": max_new_tokens,
        "exact_match": {name: float(results[f"exact_match,{name}"]) for name in FILTERS},
    }
