"""The machinery shared by ``text`` and ``chat``: tokenize pass, write pass, manifest, publish.

1. tokenize: the main process reads items (documents, conversations) in order and cuts them
   into tasks of about ``part_chars`` characters; workers encode each task and save the ids
   (and, for chat, the loss mask) in a scratch folder (windows.save_part).
2. write: a layout plans the rows over the whole token store (windows.Packing,
   chat_layout.ChatLayout); the rows are cut into output parts of about one shard each and
   workers write each part with its own MDSWriter.
Then the parts' indexes are merged and the manifest written last (build_once publishes).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from .config import ChatConfig, RowsConfig, TextConfig
from .errors import DataPrepError
from .manifest import FORMAT_VERSION, MANIFEST, fingerprint, write_manifest
from .mds import ShardOptions, merge_parts, part_name, write_part
from .output import Location, build_once
from .parallel import WorkerPool
from .sources import SkipCounter, good_documents
from .tokenizer import check_seq_len, load_tokenizer, token_dtype
from .windows import TokenPart, TokenStore

# What a worker's encode function needs (tokenizer, dtype, ...), set by init_worker in each
# worker process (or in-process with one worker).
WORKER: dict[str, Any] = {}


def init_worker(state: dict[str, Any]) -> None:
    # Parallelism comes from --workers; the Rust thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    WORKER.update(state)


class PlannedRows(Protocol):
    """A layout's rows: how many, and any slice of them (an output part's rows)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> Any: ...


class Layout(Protocol):
    @property
    def pad_id(self) -> int: ...

    @property
    def columns(self) -> dict[str, str]: ...

    @property
    def bytes_per_window(self) -> int: ...

    def plan(self, store: TokenStore) -> tuple[dict[str, Any], PlannedRows]: ...

    def samples(self, store: TokenStore, rows: Any) -> Iterator[dict[str, np.ndarray]]: ...


@dataclass(frozen=True)
class Stage:
    """What differs between the commands: the item noun (error messages), the worker's
    encode function ((index, items, scratch) -> TokenPart) and an item's size in characters."""

    kind: str
    noun: str
    encode: Callable[[tuple[int, list[Any], str]], TokenPart]
    size: Callable[[Any], int]


@dataclass
class Prepared:
    manifest: dict[str, Any]
    built: bool
    seconds: float


def load_for(cfg: RowsConfig) -> tuple[Any, np.dtype]:
    """The tokenizer, checked against --seq-len, and the input_ids dtype."""
    tok = load_tokenizer(cfg.tokenizer)
    check_seq_len(tok, cfg.seq_len, cfg.tokenizer)
    return tok, token_dtype(len(tok), cfg.dtype)


def prepare_rows(
    cfg: TextConfig | ChatConfig,
    stage: Stage,
    tok: Any,
    tok_sha256: str,
    layout: Layout,
    inputs: Any,
    items: Callable[[], Iterable[Any]],
    worker_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Prepared:
    """Build ``cfg.out`` (unless it already holds this dataset) and return its manifest."""
    started = time.perf_counter()
    local_tok = Path(cfg.tokenizer)
    tok_info = {"name_or_path": str(local_tok.resolve()) if local_tok.is_dir() else cfg.tokenizer, "sha256": tok_sha256}
    semantic = cfg.semantic_arguments()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": stage.kind,
        "seq_len": cfg.seq_len,
        "pack": cfg.pack,
        "columns": layout.columns,
        "tokenizer": tok_info,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": layout.pad_id,
        "arguments": cfg.model_dump(mode="json"),
        "inputs": inputs,
        **(extra or {}),
        "fingerprint": fingerprint(stage.kind, semantic, tok_sha256, inputs),
    }

    def build(location: Location) -> None:
        manifest.update(_build(cfg, stage, layout, items(), worker_state, location))
        write_manifest(location.local, manifest)

    built = build_once(cfg.out, [MANIFEST], manifest, sorted(semantic), cfg.overwrite, build)
    return Prepared(manifest, built, time.perf_counter() - started)


def _tasks(
    items: Iterable[Any], size: Callable[[Any], int], part_chars: int, scratch: str
) -> Iterator[tuple[int, list[Any], str]]:
    batch: list[Any] = []
    chars = 0
    index = 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if chars >= part_chars:
            yield index, batch, scratch
            batch, chars, index = [], 0, index + 1
    if batch:
        yield index, batch, scratch


@dataclass(frozen=True)
class _WriteTask:
    location: Location
    layout: Layout
    store: TokenStore
    rows: Any  # a slice of the layout's planned rows
    options: ShardOptions


def _write(task: _WriteTask) -> int:
    return write_part(task.location, task.layout.columns, task.layout.samples(task.store, task.rows), task.options)


def _build(
    cfg: RowsConfig,
    stage: Stage,
    layout: Layout,
    items: Iterable[Any],
    worker_state: dict[str, Any],
    location: Location,
) -> dict[str, Any]:
    scratch = location.local / ".scratch"
    scratch.mkdir()
    skipped = SkipCounter()
    good = good_documents(items, cfg.on_bad_doc, skipped, cfg.max_docs)
    try:
        with WorkerPool(cfg.workers, init_worker, (worker_state,)) as pool:
            parts: list[TokenPart] = []
            with tqdm(desc="tokenize", unit="tok", unit_scale=True) as bar:
                for part in pool.map(stage.encode, _tasks(good, stage.size, cfg.part_chars, str(scratch))):
                    parts.append(part)
                    bar.update(part.tokens)
            store = TokenStore(parts)
            if store.total_documents == 0:
                raise DataPrepError(f"no {stage.noun} in the input ({skipped.as_dict()['total']} skipped)")
            counts, rows = layout.plan(store)
            per_part = max(1, cfg.shard_size // layout.bytes_per_window)
            options = ShardOptions(cfg.compression, tuple(cfg.hashes), cfg.shard_size)
            starts = range(0, len(rows), per_part)
            names = [part_name(i) for i in range(len(starts))]
            tasks = (
                _WriteTask(location.sub(name), layout, store, rows[start : min(start + per_part, len(rows))], options)
                for name, start in zip(names, starts)
            )
            with tqdm(total=len(rows), desc="write", unit="row") as bar:
                for written in pool.map(_write, tasks):
                    bar.update(written)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "documents": store.total_documents,
        "tokens": store.total_tokens,
        **counts,
        "skipped_documents": skipped.as_dict(),
        "parts": len(names),
        "index_sha256": merge_parts(location, names),
    }
