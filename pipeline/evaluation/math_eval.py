"""Math accuracy of a contender: greedy pass@1 and sampled pass@k, per answer-extraction mode
(gsm8k: strict and flexible; math: boxed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .contenders import Contender, Decoding
from .math_data import MathDataError, MathTask
from .math_generation import complete, eos_ids
from .math_prompts import PromptConfig, encode_prompts, render_prompts
from .passk import pass_at_k


@dataclass(frozen=True)
class MathSettings:
    max_new_tokens: int = 256
    batch_size: int = 16
    samples: int = 0  # n sampled completions per problem; 0: greedy pass@1 only
    ks: tuple[int, ...] = ()  # pass@k for these k <= samples; default 1 and samples
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.samples < 0:
            raise ValueError("max_new_tokens and batch_size must be >= 1, samples >= 0")
        if self.samples and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(
                f"sampled pass@k needs temperature > 0 and 0 < top_p <= 1 "
                f"(got {self.temperature}, {self.top_p}); greedy pass@1 is always reported"
            )
        bad = [k for k in self.ks if not 0 < k <= self.samples]
        if bad:
            raise ValueError(f"pass@k for k={bad}: each k must be between 1 and the samples ({self.samples})")

    @property
    def pass_ks(self) -> list[int]:
        return sorted(set(self.ks or (1, self.samples)))


def _correct(task: MathTask, completions: list[str], problem: int) -> tuple[dict, dict]:
    """(answers, correct) per extraction mode of one problem's completions."""
    gold = task.problems[problem].gold
    answers = {mode: [extract(c) for c in completions] for mode, extract in task.kind.extractors.items()}
    return answers, {mode: [task.kind.match(a, gold) for a in found] for mode, found in answers.items()}


def _check_fits(contender: Contender, task: MathTask, prompts: list, new_tokens: int) -> None:
    """Fail before generating where a prompt and its token budget exceed the model's positions."""
    limit = getattr(contender.model.config, "max_position_embeddings", None)
    over = [(p.where, len(ids)) for p, ids in zip(task.problems, prompts) if limit and len(ids) + new_tokens > limit]
    if over:
        where, length = over[0]
        raise MathDataError(
            f"{where}: a prompt of {length} tokens + {new_tokens} new tokens exceeds the model's "
            f"max_position_embeddings={limit} ({len(over)} problem(s) in all; lower --max-new-tokens)"
        )


def evaluate_math(contender: Contender, tokenizer, task: MathTask, settings: MathSettings) -> tuple[dict, list]:
    """The task's result for the JSON, and one record per problem (its greedy completion)."""
    texts, prompt_info = render_prompts(tokenizer, task, settings.prompt)
    prompts = encode_prompts(tokenizer, texts)
    _check_fits(contender, task, prompts, settings.max_new_tokens)
    eos = eos_ids(tokenizer, contender.model)
    stops = prompt_info["stop"]

    def run(decoding: Decoding, rows: list, desc: str):
        return complete(
            contender,
            tokenizer,
            rows,
            decoding,
            settings.max_new_tokens,
            stops,
            settings.batch_size,
            f"{contender.name}: {task.name} {desc}",
        )

    greedy, speed = run(Decoding(eos_token_id=eos), prompts, "greedy")
    n, modes = len(task.problems), list(task.kind.extractors)
    records = []
    for i, completion in enumerate(greedy):
        answers, correct = _correct(task, [completion], i)
        records.append(
            {
                "where": task.problems[i].where,
                "gold": task.problems[i].gold,
                "completion": completion,
                "answer": {m: answers[m][0] for m in modes},
                "correct": {m: correct[m][0] for m in modes},
            }
        )
    result = {
        "kind": task.kind_name,
        "path": task.path,
        "problems": n,
        "prompt": prompt_info,
        "max_new_tokens": settings.max_new_tokens,
        "pass@1": {m: sum(r["correct"][m] for r in records) / n for m in modes},
        "answered": {m: sum(r["answer"][m] is not None for r in records) / n for m in modes},
        **speed,
    }
    if settings.samples:
        result["sampled"] = _sampled(run, task, prompts, eos, settings)
    return result, records


def _sampled(run, task: MathTask, prompts: list, eos: Optional[list[int]], settings: MathSettings) -> dict:
    """pass@k from `samples` completions per problem; seeded once per contender and task, so a
    rerun with the same settings (and batch size, on the same device) draws the same samples."""
    s = settings.samples
    torch.manual_seed(settings.seed)
    decoding = Decoding(settings.temperature, settings.top_p, eos_token_id=eos)
    texts, _ = run(decoding, [p for p in prompts for _ in range(s)], f"{s} samples")
    hits = [_correct(task, texts[i * s : (i + 1) * s], i)[1] for i in range(len(prompts))]
    return {
        "samples": s,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "pass@k": {
            str(k): {m: sum(pass_at_k(s, sum(h[m]), k) for h in hits) / len(hits) for m in hits[0]}
            for k in settings.pass_ks
        },
    }
