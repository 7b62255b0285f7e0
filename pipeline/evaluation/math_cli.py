"""`python -m pipeline.evaluate --math ...`: the flags, and the run they describe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .contenders import Contender
from .math_data import MathDataError, MathTask, load_math_task, parse_math_specs
from .math_eval import MathSettings, evaluate_math
from .math_prompts import add_prompt_arguments, prompt_config


def add_math_arguments(parser) -> None:
    parser.add_argument(
        "--math",
        action="append",
        default=[],
        metavar="NAME=PATH[,NAME=PATH]",
        help="math problems (JSONL) by generation; NAME gsm8k or math, or starting with one "
        "(gsm8k_test, math500): gsm8k rows {question, answer: '... #### 42'}, math rows "
        "{problem, solution: '... \\\\boxed{...}' or answer}",
    )
    parser.add_argument(
        "--math-samples",
        type=int,
        default=0,
        help="sampled completions per problem for pass@k (default 0: greedy pass@1 only)",
    )
    parser.add_argument("--math-k", default=None, help="k of pass@k, comma-separated (default: 1 and --math-samples)")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (no top-k)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples of each contender and task")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per completion")
    add_prompt_arguments(parser)


@dataclass
class MathRun:
    tasks: list[MathTask]
    settings: MathSettings

    @property
    def files(self) -> dict:
        return {task.name: task.path for task in self.tasks}

    def evaluate(self, contender: Contender, model_path: str | Path) -> tuple[dict, list]:
        """{task: result} and the per-problem records of one contender; its tokenizer comes from
        the model directory (exports carry theirs)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--math needs the tokenizer in {model_path}: {error}") from None
        results, records = {}, []
        for task in self.tasks:
            try:
                results[task.name], rows = evaluate_math(contender, tokenizer, task, self.settings)
            except MathDataError as error:  # a prompt that cannot run: named, not a traceback
                raise SystemExit(f"{contender.name}: {error}") from None
            records += [{"task": task.name, **row} for row in rows]
            print(
                f"{contender.name} {task.name}: pass@1 "
                + ", ".join(f"{m}={v:.3f}" for m, v in results[task.name]["pass@1"].items()),
                flush=True,
            )
        return results, records


def math_run(args) -> MathRun | None:
    """The tasks (read and checked now) and settings of the --math flags; None without --math."""
    if not args.math:
        return None
    try:
        ks = tuple(int(k) for k in args.math_k.split(",")) if args.math_k else ()
    except ValueError:
        raise SystemExit(f"--math-k {args.math_k}: write the k values as integers, comma-separated") from None
    try:
        settings = MathSettings(
            args.max_new_tokens,
            args.batch_size,
            args.math_samples,
            ks,
            args.temperature,
            args.top_p,
            args.seed,
            prompt_config(args),
        )
        tasks = [load_math_task(name, path, args.max_samples) for name, path in parse_math_specs(args.math)]
    except ValueError as error:  # settings (MathSettings, PromptConfig) or files (MathDataError)
        raise SystemExit(str(error)) from None
    return MathRun(tasks, settings)
