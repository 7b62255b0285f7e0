"""Documents from local files (.txt, .jsonl, .jsonl.gz, .parquet) or a `datasets` dataset.

Each document carries its origin ("file:line", "file:row N") so that a bad one can be named.
A .txt file is one document. Reading order is deterministic: inputs sorted, rows in file order.
What a JSONL or dataset row holds is decided by a row parser, ``(row, origin) -> item or
BadDocument``: a text field here (text_rows), a conversation for chat (conversations.py).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .errors import DataPrepError

if TYPE_CHECKING:
    from .config import RowsConfig

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Document:
    text: str
    origin: str


@dataclass(frozen=True)
class BadDocument:
    origin: str
    reason: str


@dataclass
class SkipCounter:
    """Documents left out, by reason, with the first few origins for the manifest."""

    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, bad: BadDocument) -> None:
        self.reasons[bad.reason.split(":")[0]] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{bad.origin}: {bad.reason}")
            log.warning("skipped %s: %s", bad.origin, bad.reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": sum(self.reasons.values()),
            "by_reason": dict(sorted(self.reasons.items())),
            "examples": self.examples,
        }


def expand_inputs(patterns: Iterable[str], suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Files named by paths, directories (searched recursively) or globs; sorted, deduplicated."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise DataPrepError(f"input {pattern!r}: no such file, directory or glob match")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.is_file() and p.name.endswith(suffixes))
                if not found:
                    raise DataPrepError(f"input {match}: directory holds no {', '.join(suffixes)} file")
                files.extend(found)
            elif match.name.endswith(suffixes):
                files.append(match)
            else:
                raise DataPrepError(f"input {match}: unsupported file type (expected {', '.join(suffixes)})")
    return sorted({p.resolve() for p in files})


def describe_files(files: list[Path]) -> list[dict[str, Any]]:
    """Identity of the inputs for the fingerprint: path, size, mtime (like make)."""
    return [{"path": str(p), "size": (s := p.stat()).st_size, "mtime_ns": s.st_mtime_ns} for p in files]


def _decode(raw: bytes, origin_file: Path, line: int) -> str | BadDocument:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line += raw[: err.start].count(b"\n")
        return BadDocument(f"{origin_file}:{line}", f"not valid UTF-8: byte 0x{raw[err.start]:02x}")


def _read_txt(path: Path) -> Iterator[Document | BadDocument]:
    text = _decode(path.read_bytes(), path, 1)
    yield text if isinstance(text, BadDocument) else Document(text, f"{path}:1")


def _field(row: Any, origin: str, text_field: str) -> Document | BadDocument:
    if not isinstance(row, dict):
        return BadDocument(origin, f"not a JSON object: {type(row).__name__}")
    if text_field not in row:
        return BadDocument(origin, f"missing field {text_field!r}: keys {sorted(row)[:8]}")
    value = row[text_field]
    if isinstance(value, bytes):  # a binary parquet/datasets column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            return BadDocument(origin, f"not valid UTF-8: byte 0x{value[err.start]:02x}")
    if not isinstance(value, str):
        return BadDocument(origin, f"field {text_field!r} is {type(value).__name__}, not a string")
    return Document(value, origin)


def text_rows(text_field: str) -> Callable[[Any, str], Document | BadDocument]:
    """The row parser of text: the document is the string in ``text_field``."""
    return partial(_field, text_field=text_field)


def _read_jsonl(path: Path, parse: Callable[[Any, str], Any]) -> Iterator[Any]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                line = _decode(raw, path, number)
                if isinstance(line, BadDocument):
                    yield line
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield BadDocument(f"{path}:{number}", f"invalid JSON: {err.msg} at column {err.colno}")
                    continue
                yield parse(row, f"{path}:{number}")
    except (OSError, EOFError) as err:  # truncated or corrupt gzip
        raise DataPrepError(f"{path}: cannot read: {err}") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[Document | BadDocument]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a non-parquet file
        raise DataPrepError(f"{path}: not a readable parquet file: {err}") from None
    names = handle.schema_arrow.names
    if text_field not in names:
        raise DataPrepError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    row = 0
    for batch in handle.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            origin = f"{path}:row {row}"
            if value is None:
                yield BadDocument(origin, f"field {text_field!r} is null")
            else:
                yield _field({text_field: value}, origin, text_field)


def read_files(files: list[Path], text_field: str) -> Iterator[Document | BadDocument]:
    for path in files:
        if path.name.endswith(".txt"):
            yield from _read_txt(path)
        elif path.name.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        else:
            yield from _read_jsonl(path, text_rows(text_field))


def read_jsonl(files: list[Path], parse: Callable[[Any, str], Any]) -> Iterator[Any]:
    for path in files:
        yield from _read_jsonl(path, parse)


def _open_dataset(name: str, subset: str | None, split: str) -> Iterable[Any]:
    import datasets

    try:
        if Path(name).is_dir() and (Path(name, "dataset_dict.json").exists() or Path(name, "state.json").exists()):
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataPrepError(f"dataset {name}: no split {split!r} (splits: {', '.join(data)})")
                data = data[split]
            return data
        return datasets.load_dataset(name, subset, split=split, streaming=True)
    except DataPrepError:
        raise
    except Exception as err:  # datasets raises many types (offline, missing config, bad files)
        raise DataPrepError(f"cannot open dataset {name!r} (subset {subset}, split {split}): {err}") from None


def read_dataset(name: str, subset: str | None, split: str, parse: Callable[[Any, str], Any]) -> Iterator[Any]:
    for row, item in enumerate(_open_dataset(name, subset, split), start=1):
        yield parse(item, f"{name}[{split}]:row {row}")


def describe_dataset(name: str, subset: str | None, split: str) -> dict[str, Any]:
    identity: dict[str, Any] = {"dataset": name, "subset": subset, "split": split}
    if Path(name).is_dir():
        identity["files"] = describe_files(sorted(p.resolve() for p in Path(name).rglob("*") if p.is_file()))
    return identity


def open_source(
    cfg: RowsConfig,
    parse: Callable[[Any, str], Any],
    read: Callable[[list[Path]], Iterator[Any]],
    suffixes: tuple[str, ...] = SUFFIXES,
) -> tuple[Any, Callable[[], Iterator[Any]]]:
    """The identity of ``cfg``'s input (files or dataset; for the fingerprint) and a reader of
    its items: ``read`` over the files (of these suffixes), or ``parse`` over the dataset's rows."""
    if cfg.input is not None:
        files = expand_inputs(cfg.input, suffixes)
        return describe_files(files), partial(read, files)
    assert cfg.dataset is not None  # RowsConfig: exactly one of input and dataset
    return (
        describe_dataset(cfg.dataset, cfg.subset, cfg.split),
        partial(read_dataset, cfg.dataset, cfg.subset, cfg.split, parse),
    )


def good_documents(
    items: Iterable[Any], on_bad: str, skipped: SkipCounter, max_docs: int | None = None
) -> Iterator[Any]:
    """Apply the bad-document policy; empty documents are always skipped (and counted). Items
    other than Document/BadDocument (conversations) pass as they are."""
    count = 0
    for item in items:
        if isinstance(item, Document) and not item.text:
            item = BadDocument(item.origin, "empty text")
        elif isinstance(item, BadDocument) and on_bad == "error":
            raise DataPrepError(f"{item.origin}: {item.reason} (--on-bad-doc skip skips such documents)")
        if isinstance(item, BadDocument):
            skipped.add(item)
            continue
        yield item
        count += 1
        if max_docs is not None and count >= max_docs:
            return
