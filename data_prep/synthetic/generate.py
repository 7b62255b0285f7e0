"""The problems of a synthetic task, as streams both ``synthetic`` (MDS rows) and
``synthetic-chat`` (conversations) draw from, so that the same seed gives the same problems.

train: ``train_samples`` problems, k uniform in [min, max], in parts of ``samples_per_part``
(part i from the seed stream (seed, 0, i): the problems do not depend on the number of
workers). eval: ``eval_per_difficulty`` problems per k from the stream (seed, 1, k); distinct
prompts never seen in train when the task has enough of them, else (small k) prompts seen in
train, else repeats (a stage ends after eval_per_difficulty rejected draws in a row).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from pydantic import ValidationError

from ..config import TaskConfig
from ..errors import DataPrepError
from .tasks import TASKS, Problem, Task

TRAIN_STREAM, EVAL_STREAM = 0, 1


def resolve_task(cfg: TaskConfig) -> tuple[Task, tuple[int, int]]:
    """The task with its parameters checked, and its difficulty range."""
    cls = TASKS[cfg.task]
    try:
        task = cls(cfg.params)
    except ValidationError as err:
        problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DataPrepError(f"task {cfg.task}: {problems}") from None
    lo = cfg.min_difficulty or cls.default_difficulty[0]
    hi = cfg.max_difficulty or cls.default_difficulty[1]
    if not 1 <= lo <= hi <= cls.max_supported:
        raise DataPrepError(
            f"task {cfg.task}: difficulty range {lo}..{hi} must satisfy 1 <= min <= max <= {cls.max_supported}"
        )
    try:
        task.check(hi)
    except ValueError as err:
        raise DataPrepError(f"task {cfg.task}: {err}") from None
    return task, (lo, hi)


def part_counts(cfg: TaskConfig) -> list[int]:
    """How many train problems each part (seed stream) holds."""
    return [
        min(cfg.samples_per_part, cfg.train_samples - start)
        for start in range(0, cfg.train_samples, cfg.samples_per_part)
    ]


def train_problems(
    task: Task, difficulty: tuple[int, int], seed: int, part: int, count: int
) -> Iterator[tuple[int, Problem]]:
    lo, hi = difficulty
    rng = np.random.default_rng([seed, TRAIN_STREAM, part])
    for _ in range(count):
        k = int(rng.integers(lo, hi + 1))
        yield k, task.sample(rng, k, hi)


def prompt_key(problem: Problem) -> str:
    return " ".join(problem.prompt)


def eval_problems(
    task: Task,
    difficulty: tuple[int, int],
    seed: int,
    per_k: int,
    train_prompts: dict[int, set[str]],
    report: dict[str, dict[str, int]],
) -> Iterator[tuple[int, Problem]]:
    """The eval problems, k by k; ``report`` gets, per k, how many are distinct and in train."""
    lo, hi = difficulty
    for k in range(lo, hi + 1):
        rng = np.random.default_rng([seed, EVAL_STREAM, k])
        seen_in_train = train_prompts.get(k, set())
        chosen: list[Problem] = []
        keys: set[str] = set()
        # Held-out distinct prompts first; small k has too few, so then allow train prompts,
        # then repeats. A stage gives up after per_k draws in a row were rejected.
        for allow_train, allow_repeat in ((False, False), (True, False), (True, True)):
            rejected = 0
            while len(chosen) < per_k and rejected < per_k:
                problem = task.sample(rng, k, hi)
                key = prompt_key(problem)
                if (key in keys and not allow_repeat) or (key in seen_in_train and not allow_train):
                    rejected += 1
                    continue
                rejected = 0
                keys.add(key)
                chosen.append(problem)
        report[str(k)] = {
            "distinct_prompts": len(keys),
            "in_train": sum(prompt_key(p) in seen_in_train for p in chosen),
        }
        yield from ((k, p) for p in chosen)
