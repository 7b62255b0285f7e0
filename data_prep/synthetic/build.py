"""``data_prep synthetic``: DIR/tokenizer, DIR/train and DIR/eval (each a complete dataset).

train: ``train_samples`` problems, k uniform in [min, max], generated in parts of
``samples_per_part`` (part i from the seed stream (seed, 0, i), so the output does not depend
on the number of workers); labels include the intermediate targets when asked (s3).
eval: ``eval_per_difficulty`` problems per k from the stream (seed, 1, k), answer labels only;
distinct prompts never seen in train when the task has enough of them, else (small k) prompts
seen in train, else repeats (a stage ends after eval_per_difficulty rejected draws in a
row); the manifest records how many of each.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from ..config import SyntheticConfig
from ..errors import DataPrepError
from ..manifest import FORMAT_VERSION, MANIFEST, fingerprint, write_manifest
from ..mds import ShardOptions, merge_parts, ndarray_column, part_name, write_part
from ..output import Location, build_once
from ..parallel import WorkerPool
from ..tokenizer import tokenizer_sha256
from .encode import PAD_ID, RowLayout, build_tokenizer, vocabulary
from .tasks import TASKS, Problem, Task

TRAIN_STREAM, EVAL_STREAM = 0, 1
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class _Spec:
    """What a worker needs to generate and write rows."""

    task: str
    params: dict[str, int]
    difficulty: tuple[int, int]
    layout: RowLayout
    options: ShardOptions

    def make_task(self) -> Task:
        return TASKS[self.task](self.params)

    @property
    def columns(self) -> dict[str, str]:
        n = self.layout.seq_len
        return {"input_ids": ndarray_column(np.uint16, n), "labels": ndarray_column(self.layout.labels_dtype, n),
                "difficulty": "int32", "prompt_length": "int32"}


@dataclass
class _Stats:
    difficulties: Counter = field(default_factory=Counter)
    tokens: int = 0
    prompts: dict[int, set[str]] = field(default_factory=dict)

    def add(self, k: int, problem: Problem) -> None:
        self.difficulties[k] += 1
        self.tokens += len(problem.prompt) + len(problem.answer)
        self.prompts.setdefault(k, set()).add(" ".join(problem.prompt))

    def merge(self, other: _Stats) -> None:
        self.difficulties.update(other.difficulties)
        self.tokens += other.tokens
        for k, prompts in other.prompts.items():
            self.prompts.setdefault(k, set()).update(prompts)


def _rows(spec: _Spec, problems: Iterator[tuple[int, Problem]], intermediate: bool,
          stats: _Stats) -> Iterator[dict[str, Any]]:
    for k, problem in problems:
        stats.add(k, problem)
        ids, labels = spec.layout.encode(problem, intermediate)
        yield {"input_ids": ids, "labels": labels, "difficulty": k, "prompt_length": spec.layout.prompt_length}


@dataclass(frozen=True)
class _TrainPart:
    spec: _Spec
    location: Location
    index: int
    count: int
    seed: int
    intermediate: bool


def _train_problems(part: _TrainPart) -> Iterator[tuple[int, Problem]]:
    task = part.spec.make_task()
    lo, hi = part.spec.difficulty
    rng = np.random.default_rng([part.seed, TRAIN_STREAM, part.index])
    for _ in range(part.count):
        k = int(rng.integers(lo, hi + 1))
        yield k, task.sample(rng, k, hi)


def _write_train_part(part: _TrainPart) -> _Stats:
    stats = _Stats()
    write_part(part.location, part.spec.columns, _rows(part.spec, _train_problems(part), part.intermediate, stats),
               part.spec.options)
    return stats


def _eval_problems(spec: _Spec, seed: int, per_k: int, train_prompts: dict[int, set[str]],
                   report: dict[str, dict[str, int]]) -> Iterator[tuple[int, Problem]]:
    task = spec.make_task()
    lo, hi = spec.difficulty
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
                key = " ".join(problem.prompt)
                if (key in keys and not allow_repeat) or (key in seen_in_train and not allow_train):
                    rejected += 1
                    continue
                rejected = 0
                keys.add(key)
                chosen.append(problem)
        report[str(k)] = {"distinct_prompts": len(keys),
                          "in_train": sum(" ".join(p.prompt) in seen_in_train for p in chosen)}
        yield from ((k, p) for p in chosen)


@dataclass
class SyntheticResult:
    manifests: dict[str, dict[str, Any]]
    built: bool
    seconds: float


def _resolve(cfg: SyntheticConfig) -> tuple[Task, tuple[int, int]]:
    cls = TASKS[cfg.task]
    try:
        task = cls(cfg.params)
    except ValidationError as err:
        problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DataPrepError(f"task {cfg.task}: {problems}") from None
    lo = cfg.min_difficulty or cls.default_difficulty[0]
    hi = cfg.max_difficulty or cls.default_difficulty[1]
    if not 1 <= lo <= hi <= cls.max_supported:
        raise DataPrepError(f"task {cfg.task}: difficulty range {lo}..{hi} must satisfy "
                            f"1 <= min <= max <= {cls.max_supported}")
    try:
        task.check(hi)
    except ValueError as err:
        raise DataPrepError(f"task {cfg.task}: {err}") from None
    return task, (lo, hi)


def prepare_synthetic(cfg: SyntheticConfig) -> SyntheticResult:
    started = time.perf_counter()
    task, difficulty = _resolve(cfg)
    layout = RowLayout(task.prompt_length(difficulty[1]), task.answer_length, vocabulary(task.words))
    spec = _Spec(cfg.task, dict(cfg.params), difficulty, layout,
                 ShardOptions(cfg.compression, tuple(cfg.hashes), cfg.shard_size))
    tok = build_tokenizer(task.words, layout.seq_len)
    tok_info = {"name_or_path": "../tokenizer", "sha256": tokenizer_sha256(tok)}
    semantic = cfg.semantic_arguments()
    base: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "kind": "synthetic", "task": cfg.task,
        "task_params": task.params.model_dump(), "convention": task.convention(),
        "difficulty_range": list(difficulty),
        "seq_len": layout.seq_len, "prompt_length": layout.prompt_length,
        "answer_length": layout.answer_length, "chance": task.chance, "columns": spec.columns,
        "tokenizer": tok_info, "vocab_size": len(layout.vocab), "pad_token_id": PAD_ID,
        "arguments": cfg.model_dump(mode="json"), "inputs": None, "dropped_tokens": 0,
        "fingerprint": fingerprint("synthetic", semantic, tok_info["sha256"], None),
    }
    manifests = {split: {**base, "split": split} for split in SPLITS}

    def build(location: Location) -> None:
        tok.save_pretrained(str(location.local / "tokenizer"))
        for path in sorted((location.local / "tokenizer").iterdir()):
            location.upload(f"tokenizer/{path.name}")
        train, train_prompts = _build_train(cfg, spec, location.sub("train"))
        manifests["train"].update(train)
        manifests["eval"].update(_build_eval(cfg, spec, location.sub("eval"), train_prompts))
        for split in SPLITS:
            write_manifest(location.local / split, manifests[split])

    built = build_once(cfg.out, [f"{s}/{MANIFEST}" for s in SPLITS], manifests["train"], sorted(semantic),
                       cfg.overwrite, build)
    return SyntheticResult(manifests, built, time.perf_counter() - started)


def _counts(stats: _Stats, samples: int, index_sha256: str) -> dict[str, Any]:
    return {"documents": samples, "windows": samples, "tokens": stats.tokens, "index_sha256": index_sha256,
            "difficulties": {str(k): n for k, n in sorted(stats.difficulties.items())}}


def _build_train(cfg: SyntheticConfig, spec: _Spec, location: Location
                 ) -> tuple[dict[str, Any], dict[int, set[str]]]:
    starts = range(0, cfg.train_samples, cfg.samples_per_part)
    counts = [min(cfg.samples_per_part, cfg.train_samples - start) for start in starts]
    names = [part_name(i) for i in range(len(counts))]
    intermediate = cfg.running_product and TASKS[cfg.task].intermediate_targets
    parts = (_TrainPart(spec, location.sub(name), i, n, cfg.seed, intermediate)
             for i, (name, n) in enumerate(zip(names, counts)))
    stats = _Stats()
    with WorkerPool(cfg.workers) as pool, tqdm(total=cfg.train_samples, desc="train", unit="sample") as bar:
        for part_stats in pool.map(_write_train_part, parts):
            stats.merge(part_stats)
            bar.update(sum(part_stats.difficulties.values()))
    result = _counts(stats, cfg.train_samples, merge_parts(location, names))
    return {**result, "intermediate_supervision": intermediate}, stats.prompts


def _build_eval(cfg: SyntheticConfig, spec: _Spec, location: Location,
                train_prompts: dict[int, set[str]]) -> dict[str, Any]:
    report: dict[str, dict[str, int]] = {}
    stats = _Stats()
    problems = _eval_problems(spec, cfg.seed, cfg.eval_per_difficulty, train_prompts, report)
    samples = write_part(location.sub(part_name(0)), spec.columns, _rows(spec, problems, False, stats), spec.options)
    result = _counts(stats, samples, merge_parts(location, [part_name(0)]))
    return {**result, "intermediate_supervision": False, "eval_prompts": report}
