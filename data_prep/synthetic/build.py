"""``data_prep synthetic``: DIR/tokenizer, DIR/train and DIR/eval (each a complete dataset).

The problems are generate.py's streams: train in parts of ``samples_per_part`` (one MDS
subfolder each, written by a worker), labels with the intermediate targets when asked (s3);
eval with answer labels only, held out from train where possible (the manifest records how
many prompts are distinct and how many were seen in train, per k).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from ..config import SyntheticConfig
from ..manifest import FORMAT_VERSION, MANIFEST, fingerprint, write_manifest
from ..mds import ShardOptions, merge_parts, ndarray_column, part_name, write_part
from ..output import Location, build_once
from ..parallel import WorkerPool
from ..tokenizer import tokenizer_sha256
from .encode import PAD_ID, RowLayout, build_tokenizer, vocabulary
from .generate import eval_problems, part_counts, prompt_key, resolve_task, train_problems
from .tasks import TASKS, Problem, Task

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
        return {
            "input_ids": ndarray_column(np.uint16, n),
            "labels": ndarray_column(self.layout.labels_dtype, n),
            "difficulty": "int32",
            "prompt_length": "int32",
        }


@dataclass
class _Stats:
    difficulties: Counter = field(default_factory=Counter)
    tokens: int = 0
    prompts: dict[int, set[str]] = field(default_factory=dict)

    def add(self, k: int, problem: Problem) -> None:
        self.difficulties[k] += 1
        self.tokens += len(problem.prompt) + len(problem.answer)
        self.prompts.setdefault(k, set()).add(prompt_key(problem))

    def merge(self, other: _Stats) -> None:
        self.difficulties.update(other.difficulties)
        self.tokens += other.tokens
        for k, prompts in other.prompts.items():
            self.prompts.setdefault(k, set()).update(prompts)


def _rows(
    spec: _Spec, problems: Iterator[tuple[int, Problem]], intermediate: bool, stats: _Stats
) -> Iterator[dict[str, Any]]:
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


def _write_train_part(part: _TrainPart) -> _Stats:
    stats = _Stats()
    problems = train_problems(part.spec.make_task(), part.spec.difficulty, part.seed, part.index, part.count)
    write_part(
        part.location, part.spec.columns, _rows(part.spec, problems, part.intermediate, stats), part.spec.options
    )
    return stats


@dataclass
class SyntheticResult:
    manifests: dict[str, dict[str, Any]]
    built: bool
    seconds: float


def prepare_synthetic(cfg: SyntheticConfig) -> SyntheticResult:
    started = time.perf_counter()
    task, difficulty = resolve_task(cfg)
    layout = RowLayout(task.prompt_length(difficulty[1]), task.answer_length, vocabulary(task.words))
    spec = _Spec(
        cfg.task, dict(cfg.params), difficulty, layout, ShardOptions(cfg.compression, tuple(cfg.hashes), cfg.shard_size)
    )
    tok = build_tokenizer(task.words, layout.seq_len)
    tok_info = {"name_or_path": "../tokenizer", "sha256": tokenizer_sha256(tok)}
    semantic = cfg.semantic_arguments()
    base: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "synthetic",
        "task": cfg.task,
        "task_params": task.params.model_dump(),
        "convention": task.convention(),
        "difficulty_range": list(difficulty),
        "seq_len": layout.seq_len,
        "prompt_length": layout.prompt_length,
        "answer_length": layout.answer_length,
        "chance": task.chance,
        "columns": spec.columns,
        "tokenizer": tok_info,
        "vocab_size": len(layout.vocab),
        "pad_token_id": PAD_ID,
        "arguments": cfg.model_dump(mode="json"),
        "inputs": None,
        "dropped_tokens": 0,
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

    built = build_once(
        cfg.out, [f"{s}/{MANIFEST}" for s in SPLITS], manifests["train"], sorted(semantic), cfg.overwrite, build
    )
    return SyntheticResult(manifests, built, time.perf_counter() - started)


def _counts(stats: _Stats, samples: int, index_sha256: str) -> dict[str, Any]:
    return {
        "documents": samples,
        "windows": samples,
        "tokens": stats.tokens,
        "index_sha256": index_sha256,
        "difficulties": {str(k): n for k, n in sorted(stats.difficulties.items())},
    }


def _build_train(cfg: SyntheticConfig, spec: _Spec, location: Location) -> tuple[dict[str, Any], dict[int, set[str]]]:
    counts = part_counts(cfg)
    names = [part_name(i) for i in range(len(counts))]
    intermediate = cfg.running_product and TASKS[cfg.task].intermediate_targets
    parts = (
        _TrainPart(spec, location.sub(name), i, n, cfg.seed, intermediate)
        for i, (name, n) in enumerate(zip(names, counts))
    )
    stats = _Stats()
    with WorkerPool(cfg.workers) as pool, tqdm(total=cfg.train_samples, desc="train", unit="sample") as bar:
        for part_stats in pool.map(_write_train_part, parts):
            stats.merge(part_stats)
            bar.update(sum(part_stats.difficulties.values()))
    result = _counts(stats, cfg.train_samples, merge_parts(location, names))
    return {**result, "intermediate_supervision": intermediate}, stats.prompts


def _build_eval(
    cfg: SyntheticConfig, spec: _Spec, location: Location, train_prompts: dict[int, set[str]]
) -> dict[str, Any]:
    report: dict[str, dict[str, int]] = {}
    stats = _Stats()
    problems = eval_problems(
        spec.make_task(), spec.difficulty, cfg.seed, cfg.eval_per_difficulty, train_prompts, report
    )
    samples = write_part(location.sub(part_name(0)), spec.columns, _rows(spec, problems, False, stats), spec.options)
    result = _counts(stats, samples, merge_parts(location, [part_name(0)]))
    return {**result, "intermediate_supervision": False, "eval_prompts": report}
