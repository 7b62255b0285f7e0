"""Exported models under lm-evaluation-harness, on the synthetic tasks as local generation tasks.

    python -m pipeline.evaluation.harness --model runs/demo/distill/export --data runs/demo/data/eval \\
        --out runs/demo/lm_eval.json
    python -m pipeline.evaluation.harness --model DIR --math-data gsm8k.jsonl --out lm_eval_gsm8k.json

A GSM8K-format file (--math-data) is a local task too: see harness_math.py.

The eval split is written as a local JSONL file (prompt and answer as text), the task YAML
(configs/lm_eval/melt_synthetic.yaml) is filled in beside it, and lm_eval's `hf` model class
runs our model object (loaded by our own classes: no remote code, no downloads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from pipeline.evaluation.data import EvalSplit, load_eval_split

TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "lm_eval" / "melt_synthetic.yaml"
TASK = "melt_synthetic"


def write_task(split: EvalSplit, tokenizer, out_dir: Path, pad_id: int = 0) -> int:
    """The split as JSONL plus the task YAML in out_dir; returns the number of answer tokens."""
    if split.prompt_length is None:
        raise ValueError("the lm_eval task needs a synthetic eval split (with prompt_length)")
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{TASK}.jsonl"
    answer_tokens = 0
    with data_file.open("w") as f:
        for i in range(len(split)):
            length = int(split.prompt_length[i])
            prompt = [t for t in split.input_ids[i, :length].tolist() if t != pad_id]
            answer = split.input_ids[i, length:].tolist()
            answer_tokens = max(answer_tokens, len(answer))
            f.write(
                json.dumps(
                    {
                        "prompt": tokenizer.decode(prompt),
                        "answer": tokenizer.decode(answer),
                        "difficulty": int(split.difficulty[i]) if split.difficulty is not None else 0,
                    }
                )
                + "\n"
            )
    text = TEMPLATE.read_text().replace("{data_file}", str(data_file)).replace("{answer_tokens}", str(answer_tokens))
    (out_dir / f"{TASK}.yaml").write_text(text)
    return answer_tokens


def run_local_task(
    model_dir: str | Path, task: str, work_dir: Path, limit: Optional[int] = None, batch_size: int = 32
) -> dict:
    """lm_eval's `hf` model on our model object and a task YAML already in work_dir; lm_eval's results."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    # only our task's folder: indexing lm_eval's thousands of built-in tasks takes seconds
    tasks = TaskManager(include_path=str(work_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=tasks, limit=limit, log_samples=False, bootstrap_iters=0
    )
    return results["results"][task]


def load_model(model_dir: str | Path):
    """The export and its tokenizer, through our own classes (no remote code, no downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.models  # noqa: F401  (registers model types "ouro" and "melt" with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def run_harness(
    model_dir: str | Path, data_dir: str | Path, work_dir: Path, limit: Optional[int] = None, batch_size: int = 32
) -> dict:
    from transformers import AutoTokenizer

    split = load_eval_split(data_dir, limit)
    write_task(split, AutoTokenizer.from_pretrained(model_dir), work_dir)
    results = run_local_task(model_dir, TASK, work_dir, limit, batch_size)
    return {
        "task": TASK,
        "model": str(model_dir),
        "samples": len(split),
        "exact_match": float(results["exact_match,none"]),
    }


def main(argv=None) -> int:
    from pipeline.evaluation.harness_math import run_math_harness
    from pipeline.evaluation.math_data import MathDataError
    from pipeline.evaluation.math_prompts import add_prompt_arguments, prompt_config

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluation.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="exported model directory (with its tokenizer)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="synthetic eval split (MDS, with manifest.json)")
    data.add_argument("--math-data", help="GSM8K-format JSONL ({question, answer: '... #### 42'})")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="--math-data: generation budget")
    add_prompt_arguments(parser)
    args = parser.parse_args(argv)
    work = args.out.parent / "lm_eval_task"
    if args.data:
        result = run_harness(args.model, args.data, work, args.limit, args.batch_size)
    else:
        try:
            result = run_math_harness(
                args.model, args.math_data, work, prompt_config(args), args.max_new_tokens, args.limit, args.batch_size
            )
        except MathDataError as error:
            raise SystemExit(str(error)) from None
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
