"""``data_prep synthetic-chat``: a synthetic task's problems as conversations, one JSON object
a line, for ``data_prep chat`` and a GSM8K-style evaluation:

    {"messages": [{"role": "user", "content": "p120 p021 ="},
                  {"role": "assistant", "content": "p120 #### 201"}],
     "question": "p120 p021 =", "answer": "p120 #### 201", "final": "201", "task": "s3", "difficulty": 2}

The user turn is the prompt's words; the assistant turn, with ``trace``, the task's
intermediate steps (s3: the running products g1, g1g2, ...; other tasks have none), then
``####`` and the final answer: digits written as one number (s3's permutation 2 0 1 as 201),
so that GSM8K-style extraction reads it; other answers keep their words. ``question`` and
``answer`` repeat the two turns in GSM8K's format, so the eval file is also a GSM8K-format
file for ``pipeline.evaluate --math gsm8k=FILE``; ``final`` is the final answer alone. The problems are those of
``data_prep synthetic`` with the same seed, task and difficulties (generate.py); the eval file
holds the held-out eval problems.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from ..config import SyntheticChatConfig
from ..errors import DataPrepError
from .generate import eval_problems, part_counts, prompt_key, resolve_task, train_problems
from .tasks import Problem

ANSWER_MARK = "####"


def conversation(problem: Problem, k: int, cfg: SyntheticChatConfig) -> dict[str, Any]:
    steps = [t for t in problem.intermediate or [] if t is not None] if cfg.trace else []
    words = list(problem.answer)
    final = "".join(words) if all(w.isdigit() for w in words) else " ".join(words)
    question, solution = " ".join(problem.prompt), " ".join([*steps, ANSWER_MARK, final])
    row: dict[str, Any] = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": solution}],
        "question": question,
        "answer": solution,
        "final": final,
        "task": cfg.task,
        "difficulty": k,
    }
    if cfg.system:
        row["system"] = cfg.system
    return row


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write through a temporary sibling renamed at the end: an interrupted run leaves no
    half file under the final name."""
    tmp = path.with_name(f".{path.name}.partial")
    count = 0
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(tmp, "wt", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


@dataclass
class SyntheticChatResult:
    train: int
    eval: int
    eval_prompts: dict[str, dict[str, int]]


def prepare_synthetic_chat(cfg: SyntheticChatConfig) -> SyntheticChatResult:
    task, difficulty = resolve_task(cfg)
    outputs = [Path(p) for p in (cfg.out, cfg.eval_out) if p is not None]
    for path in outputs:
        if path.exists() and not cfg.overwrite:
            raise DataPrepError(f"{path} exists; pass --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
    train_prompts: dict[int, set[str]] = {}

    def train_rows() -> Iterator[dict[str, Any]]:
        with tqdm(total=cfg.train_samples, desc="train", unit="conv") as bar:
            for part, count in enumerate(part_counts(cfg)):
                for k, problem in train_problems(task, difficulty, cfg.seed, part, count):
                    train_prompts.setdefault(k, set()).add(prompt_key(problem))
                    bar.update()
                    yield conversation(problem, k, cfg)

    train = _write_jsonl(outputs[0], train_rows())
    report: dict[str, dict[str, int]] = {}
    held_out = 0
    if cfg.eval_out is not None:
        problems = eval_problems(task, difficulty, cfg.seed, cfg.eval_per_difficulty, train_prompts, report)
        held_out = _write_jsonl(outputs[1], (conversation(p, k, cfg) for k, p in problems))
    return SyntheticChatResult(train, held_out, report)
