"""``data_prep text``: documents -> tokens -> fixed windows -> MDS shards + manifest.

Two passes over a pool of workers:
1. tokenize: the main process reads documents in order and cuts them into tasks of about
   ``part_chars`` characters; workers batch-encode each task, append EOS per document and
   save the ids in a scratch folder.
2. write: the windows (a grid over the global token stream, see windows.py) are cut into
   output parts of about one shard each; workers write each part with its own MDSWriter.
Then the parts' indexes are merged and the manifest written last.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .config import TextConfig
from .errors import DataPrepError
from .manifest import FORMAT_VERSION, MANIFEST, fingerprint, write_manifest
from .mds import ShardOptions, merge_parts, part_name, write_part
from .output import Location, build_once
from .parallel import WorkerPool
from .sources import (Document, SkipCounter, describe_dataset, describe_files, expand_inputs,
                      good_documents, read_dataset, read_files)
from .tokenizer import check_seq_len, encode_documents, load_tokenizer, token_dtype, tokenizer_sha256
from .windows import Packing, TokenPart, TokenStore

_worker: dict[str, Any] = {}


def _init_worker(tok: Any, dtype: np.dtype) -> None:
    # Parallelism comes from --workers; the Rust thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=tok, dtype=dtype)


def _tokenize(task: tuple[int, list[str], str]) -> TokenPart:
    index, texts, scratch = task
    flat, ends = encode_documents(_worker["tok"], texts, _worker["dtype"])
    tokens_path, ends_path = (os.path.join(scratch, f"{index:06d}.{kind}.npy") for kind in ("ids", "ends"))
    np.save(tokens_path, flat)
    np.save(ends_path, ends)
    return TokenPart(tokens_path, ends_path, len(texts), len(flat))


@dataclass(frozen=True)
class _WriteTask:
    location: Location
    packing: Packing
    store: TokenStore
    start: int
    stop: int
    options: ShardOptions


def _write(task: _WriteTask) -> int:
    samples = task.packing.samples(task.store, task.start, task.stop)
    return write_part(task.location, task.packing.columns, samples, task.options)


def _tasks(docs: Iterable[Document], part_chars: int, scratch: str) -> Iterator[tuple[int, list[str], str]]:
    texts: list[str] = []
    chars = 0
    index = 0
    for doc in docs:
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= part_chars:
            yield index, texts, scratch
            texts, chars, index = [], 0, index + 1
    if texts:
        yield index, texts, scratch


@dataclass
class TextResult:
    manifest: dict[str, Any]
    built: bool
    seconds: float


def prepare_text(cfg: TextConfig) -> TextResult:
    started = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer)
    check_seq_len(tok, cfg.seq_len, cfg.tokenizer)
    dtype = token_dtype(len(tok), cfg.dtype)
    if cfg.input is not None:
        files = expand_inputs(cfg.input)
        inputs: Any = describe_files(files)
        items = partial(read_files, files, cfg.text_field)
    else:
        inputs = describe_dataset(cfg.dataset, cfg.subset, cfg.split)
        items = partial(read_dataset, cfg.dataset, cfg.subset, cfg.split, cfg.text_field)
    local_tok = Path(cfg.tokenizer)
    tok_info = {"name_or_path": str(local_tok.resolve()) if local_tok.is_dir() else cfg.tokenizer,
                "sha256": tokenizer_sha256(tok)}
    semantic = cfg.semantic_arguments()
    packing = Packing(cfg.pack, cfg.seq_len, dtype.name,
                      tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "kind": "text", "seq_len": cfg.seq_len, "pack": cfg.pack,
        "columns": packing.columns, "tokenizer": tok_info, "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id, "pad_token_id": packing.pad_id,
        "arguments": cfg.model_dump(mode="json"), "inputs": inputs,
        "fingerprint": fingerprint("text", semantic, tok_info["sha256"], inputs),
    }

    def build(location: Location) -> None:
        manifest.update(_build(cfg, tok, dtype, packing, items(), location))
        write_manifest(location.local, manifest)

    built = build_once(cfg.out, [MANIFEST], manifest, sorted(semantic), cfg.overwrite, build)
    return TextResult(manifest, built, time.perf_counter() - started)


def _build(cfg: TextConfig, tok: Any, dtype: np.dtype, packing: Packing, items: Iterable[Any],
           location: Location) -> dict[str, Any]:
    scratch = location.local / ".scratch"
    scratch.mkdir()
    skipped = SkipCounter()
    docs = good_documents(items, cfg.on_bad_doc, skipped, cfg.max_docs)
    try:
        with WorkerPool(cfg.workers, _init_worker, (tok, dtype)) as pool:
            parts: list[TokenPart] = []
            with tqdm(desc="tokenize", unit="tok", unit_scale=True) as bar:
                for part in pool.map(_tokenize, _tasks(docs, cfg.part_chars, str(scratch))):
                    parts.append(part)
                    bar.update(part.tokens)
            store = TokenStore(parts)
            if store.total_documents == 0:
                raise DataPrepError(f"no documents in the input ({skipped.as_dict()['total']} skipped)")
            plan = packing.plan(store)
            if plan["windows"] == 0:
                raise DataPrepError(f"the input has {store.total_tokens} tokens, fewer than one "
                                    f"window of --seq-len {cfg.seq_len}")
            per_part = max(1, cfg.shard_size // packing.bytes_per_window)
            options = ShardOptions(cfg.compression, tuple(cfg.hashes), cfg.shard_size)
            starts = range(0, plan["windows"], per_part)
            names = [part_name(i) for i in range(len(starts))]
            tasks = (_WriteTask(location.sub(name), packing, store, start,
                                min(start + per_part, plan["windows"]), options)
                     for name, start in zip(names, starts))
            with tqdm(total=plan["windows"], desc="write", unit="win") as bar:
                for written in pool.map(_write, tasks):
                    bar.update(written)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"documents": store.total_documents, "tokens": store.total_tokens, **plan,
            "skipped_documents": skipped.as_dict(), "parts": len(names),
            "index_sha256": merge_parts(location, names)}
