"""Math problem files (JSONL) and what each kind of task reads, answers and scores.

- gsm8k: rows {"question": ..., "answer": "... #### 42"}; a completion's answer is read strictly
  (the number after `#### `) and flexibly (the last number), both scored.
- math: rows {"problem": ..., "solution": "... \\boxed{...}"} or {"problem": ..., "answer": ...};
  a completion's answer is its last `\\boxed{...}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .math_boxed import boxed_answer, same_math_answer
from .math_numbers import flexible_answer, gold_gsm8k, same_answer, strict_answer


class MathDataError(ValueError):
    """A math task file, specification or prompt that cannot be used; the message names file:line."""


@dataclass(frozen=True)
class Reference:
    key: str  # the row's field
    read: Callable[[str], Optional[str]]  # field -> final answer (None: it has none)
    expected: str  # what the error says the field lacks


@dataclass(frozen=True)
class Kind:
    question_key: str
    references: tuple[Reference, ...]  # the first field present is read
    extractors: dict[str, Callable[[str], Optional[str]]]  # mode -> completion -> answer
    match: Callable[[Optional[str], str], bool]
    plain_template: str  # prompt without a chat template
    instruction: str  # default end of the chat user turn
    stop: tuple[str, ...]  # text that ends a plain completion


# lm-evaluation-harness's gsm8k stops at these too, in case a tokenizer decodes them as text
END_OF_TURN = ("</s>", "<|im_end|>")

KINDS = {
    "gsm8k": Kind(
        "question",
        (Reference("answer", gold_gsm8k, "final '#### <answer>'"),),
        {"strict": strict_answer, "flexible": flexible_answer},
        same_answer,
        "Question: {question}\nAnswer:",
        "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
        ("Question:",) + END_OF_TURN,
    ),
    "math": Kind(
        "problem",
        (
            Reference("answer", lambda text: text.strip() or None, "text"),
            Reference("solution", boxed_answer, "\\boxed{...} answer"),
        ),
        {"boxed": boxed_answer},
        same_math_answer,
        "Problem: {question}\nSolution:",
        "Solve the problem step by step, and put your final answer within \\boxed{}.",
        ("Problem:",) + END_OF_TURN,
    ),
}


@dataclass(frozen=True)
class MathProblem:
    question: str
    gold: str  # the reference's final answer, as the kind reads it
    where: str  # file:line, for messages


@dataclass(frozen=True)
class MathTask:
    name: str
    kind_name: str
    path: str
    problems: list[MathProblem]

    @property
    def kind(self) -> Kind:
        return KINDS[self.kind_name]


def kind_of(name: str) -> str:
    """A task name is a kind or starts with one (gsm8k, gsm8k_platinum, math500)."""
    for kind in sorted(KINDS, key=len, reverse=True):
        if name.startswith(kind):
            return kind
    raise MathDataError(f"math task {name!r}: the name must start with a kind ({', '.join(KINDS)})")


def _gold(row: dict, kind: Kind, where: str) -> str:
    ref = next((r for r in kind.references if isinstance(row.get(r.key), str)), None)
    if ref is None:
        keys = " or ".join(repr(r.key) for r in kind.references)
        raise MathDataError(f"{where}: row has no {keys} (a string)")
    gold = ref.read(row[ref.key])
    if not gold:
        raise MathDataError(f"{where}: {ref.key!r} has no {ref.expected}")
    return gold


def load_math_task(name: str, path: str | Path, limit: Optional[int] = None) -> MathTask:
    """Read a JSONL file of the kind `name` names; every bad row is an error naming file:line."""
    kind_name = kind_of(name)
    kind, path = KINDS[kind_name], Path(path)
    if not path.is_file():
        raise MathDataError(f"math task {name}: {path} does not exist")
    problems = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MathDataError(f"{where}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(kind.question_key), str):
                raise MathDataError(f"{where}: row has no {kind.question_key!r} (a string)")
            problems.append(MathProblem(row[kind.question_key], _gold(row, kind, where), where))
            if limit is not None and len(problems) == limit:
                break
    if not problems:
        raise MathDataError(f"math task {name}: {path} has no problems")
    return MathTask(name, kind_name, str(path), problems)


def parse_math_specs(values: list[str]) -> list[tuple[str, str]]:
    """`--math gsm8k=PATH[,math=PATH]` (repeatable) -> [(name, path)], names unique."""
    specs: list[tuple[str, str]] = []
    for value in values:
        for item in filter(None, value.split(",")):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise MathDataError(
                    f"--math {item}: write NAME=PATH (NAME one of {', '.join(KINDS)}, or starting with one)"
                )
            kind_of(name)
            if name in dict(specs):
                raise MathDataError(f"--math {item}: task {name!r} is given twice")
            specs.append((name, path))
    return specs
