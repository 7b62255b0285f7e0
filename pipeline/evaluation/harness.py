"""Exported models under lm-evaluation-harness, on the synthetic tasks as local generation tasks.

    python -m pipeline.evaluation.harness --model runs/demo/distill/export --data runs/demo/data/eval \\
        --out runs/demo/lm_eval.json

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
            f.write(json.dumps({"prompt": tokenizer.decode(prompt), "answer": tokenizer.decode(answer),
                                "difficulty": int(split.difficulty[i]) if split.difficulty is not None else 0})
                    + "\n")
    text = TEMPLATE.read_text().replace("{data_file}", str(data_file)).replace("{answer_tokens}", str(answer_tokens))
    (out_dir / f"{TASK}.yaml").write_text(text)
    return answer_tokens


def run_harness(model_dir: str | Path, data_dir: str | Path, work_dir: Path, limit: Optional[int] = None,
                batch_size: int = 32) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.models  # noqa: F401  (registers model types "ouro" and "melt" with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = load_eval_split(data_dir, limit)
    write_task(split, tokenizer, work_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(work_dir)),
                                      limit=limit, log_samples=False, bootstrap_iters=0)
    return {"task": TASK, "model": str(model_dir), "samples": len(split),
            "exact_match": float(results["results"][TASK]["exact_match,none"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (with its tokenizer)")
    parser.add_argument("--data", required=True, help="synthetic eval split (MDS, with manifest.json)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    result = run_harness(args.model, args.data, args.out.parent / "lm_eval_task", args.limit, args.batch_size)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
