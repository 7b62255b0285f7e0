"""Reasoning tasks whose difficulty k (hops / steps) sets how much sequential work the answer
needs. A task draws a problem as words (prompt, answer, optional intermediate targets); the
tokenizer has one token per word.

- ``s3`` (default): the S3 word problem. Prompt ``g1 ... gk =``, each g one of the 6
  permutations of {0, 1, 2}, written ``pabc`` for the map 0->a, 1->b, 2->c. Composition is
  left to right, g1 applied first: r(x) = gk(...g2(g1(x))). Answer: r(0) r(1) r(2) as three
  digit tokens. Chance 1/6. Intermediate targets: after g_i (i < k), the running product
  g1..gi, i.e. r_i(x) = gi(...g1(x)), as a permutation token.
- ``pointer``: multi-hop variable binding. Assignments ``v s`` (v := s, s a digit or a
  variable), each variable assigned once, shuffled, then ``? q =``; the answer is q's digit.
  q's chain has k assignments; the others are distractor chains. Chance 1/10.
- ``arith``: ``a0 o1 a1 ... ok ak =`` with digits mod m and +, -, *, evaluated left to right
  mod m (no precedence); answer: one digit. Chance 1/m.
"""

from __future__ import annotations

import itertools
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Problem:
    prompt: list[str]
    answer: list[str]
    # intermediate[i]: the target that prompt word i is trained to predict (None: no target)
    intermediate: list[str | None] | None = None


class Task(ABC):
    name: ClassVar[str]
    default_difficulty: ClassVar[tuple[int, int]]
    max_supported: ClassVar[int]
    answer_length: ClassVar[int]
    intermediate_targets: ClassVar[bool] = False  # whether sample() fills Problem.intermediate

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: dict[str, int]):
        self.params = self.Params.model_validate(params)

    @property
    @abstractmethod
    def words(self) -> list[str]:
        """The task's vocabulary (the tokenizer adds its special tokens before these)."""

    @property
    @abstractmethod
    def chance(self) -> float:
        """Exact-match accuracy of the best guess that ignores the prompt."""

    @abstractmethod
    def prompt_length(self, max_difficulty: int) -> int:
        """Prompt width (problems are left-padded to it) for difficulties up to ``max_difficulty``."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, k: int, max_difficulty: int) -> Problem: ...

    def check(self, max_difficulty: int) -> None:
        """Raise ValueError if the parameters cannot make problems up to ``max_difficulty``."""

    @classmethod
    def convention(cls) -> str:
        return (cls.__doc__ or "").strip()


PERMUTATIONS = list(itertools.permutations(range(3)))


def _perm_word(perm: tuple[int, ...]) -> str:
    return "p" + "".join(map(str, perm))


class S3(Task):
    """S3 word problem; composition left to right, g1 applied first: r(x) = gk(...g1(x))."""

    name = "s3"
    default_difficulty = (1, 8)
    max_supported = 64
    answer_length = 3
    intermediate_targets = True
    words = ["=", "0", "1", "2"] + [_perm_word(p) for p in PERMUTATIONS]
    chance = 1 / 6

    def prompt_length(self, max_difficulty: int) -> int:
        return max_difficulty + 1  # k permutations and "="; 9 for the default k <= 8

    def sample(self, rng: np.random.Generator, k: int, max_difficulty: int) -> Problem:
        gs = [PERMUTATIONS[i] for i in rng.integers(0, 6, size=k)]
        running = (0, 1, 2)
        products = []
        for g in gs:
            running = tuple(g[running[x]] for x in range(3))
            products.append(_perm_word(running))
        intermediate: list[str | None] = products[:-1] + [None, None]  # no target at g_k and "="
        return Problem([_perm_word(g) for g in gs] + ["="], [str(v) for v in running], intermediate)


class Pointer(Task):
    """Multi-hop variable binding: follow k assignments from the query to a digit."""

    name = "pointer"
    default_difficulty = (1, 6)
    answer_length = 1
    chance = 1 / 10

    class Params(Task.Params):
        distractors: int = Field(4, ge=0, description="assignments beyond the query's chain")

    params: Params  # validated by Task.__init__ with this class's Params

    VARIABLES = list(string.ascii_lowercase)
    max_supported = len(VARIABLES)
    words = VARIABLES + list(string.digits) + ["?", "="]

    def _assignments(self, max_difficulty: int) -> int:
        return max_difficulty + self.params.distractors

    def prompt_length(self, max_difficulty: int) -> int:
        return 2 * self._assignments(max_difficulty) + 3

    def check(self, max_difficulty: int) -> None:
        if self._assignments(max_difficulty) > len(self.VARIABLES):
            raise ValueError(
                f"max difficulty {max_difficulty} + {self.params.distractors} distractors "
                f"need more than the {len(self.VARIABLES)} variables"
            )

    def sample(self, rng: np.random.Generator, k: int, max_difficulty: int) -> Problem:
        total = self._assignments(max_difficulty)
        names = [self.VARIABLES[i] for i in rng.permutation(len(self.VARIABLES))[:total]]
        chain, others = names[:k], names[k:]
        digit = str(rng.integers(0, 10))
        pairs = [(chain[0], digit)] + [(chain[i], chain[i - 1]) for i in range(1, k)]
        for i, var in enumerate(others):  # distractors point only to digits or earlier distractors
            source = others[rng.integers(0, i)] if i and rng.random() < 0.5 else str(rng.integers(0, 10))
            pairs.append((var, source))
        order = rng.permutation(len(pairs))
        prompt = [w for i in order for w in pairs[i]] + ["?", chain[-1], "="]
        return Problem(prompt, [digit])


class Arith(Task):
    """Left-to-right modular arithmetic with k operations."""

    name = "arith"
    default_difficulty = (1, 6)
    max_supported = 64
    answer_length = 1
    OPS = ["+", "-", "*"]

    class Params(Task.Params):
        modulus: int = Field(10, ge=2, le=10, description="operands and result are digits mod m")

    params: Params  # validated by Task.__init__ with this class's Params

    @property
    def words(self) -> list[str]:
        return [str(d) for d in range(self.params.modulus)] + self.OPS + ["="]

    @property
    def chance(self) -> float:
        return 1 / self.params.modulus

    def prompt_length(self, max_difficulty: int) -> int:
        return 2 * max_difficulty + 2

    def sample(self, rng: np.random.Generator, k: int, max_difficulty: int) -> Problem:
        m = self.params.modulus
        operands = rng.integers(0, m, size=k + 1)
        ops = [self.OPS[i] for i in rng.integers(0, 3, size=k)]
        value = int(operands[0])
        prompt = [str(value)]
        for op, operand in zip(ops, operands[1:]):
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % m
            prompt += [op, str(operand)]
        return Problem(prompt + ["="], [str(int(value))])


TASKS: dict[str, type[Task]] = {t.name: t for t in (S3, Pointer, Arith)}
