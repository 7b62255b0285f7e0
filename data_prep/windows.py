"""Packing tokenized documents into fixed windows.

The tokenized documents live in per-task files; ``TokenStore`` addresses them as one global
token stream (and one global list of documents), so the windows do not depend on how the
documents were split into tasks:
- concat: window w holds tokens [w*N, (w+1)*N) of the stream (documents joined, each ended
  by EOS); the final tail shorter than N is dropped and counted.
- pad: window d holds document d (with its EOS), truncated to N (the rest counted as
  dropped) and padded; ``loss_mask`` is 1 on the document's tokens, 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np


@dataclass(frozen=True)
class TokenPart:
    """One tokenization task's output: flat ids (.npy) and each document's end offset (.npy)."""

    tokens_path: str
    ends_path: str
    documents: int
    tokens: int


class TokenStore:
    def __init__(self, parts: list[TokenPart]):
        self.parts = parts
        self.token_starts = np.concatenate([[0], np.cumsum([p.tokens for p in parts])]).astype(np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum([p.documents for p in parts])]).astype(np.int64)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        return {**self.__dict__, "_open": {}}

    @property
    def total_tokens(self) -> int:
        return int(self.token_starts[-1])

    @property
    def total_documents(self) -> int:
        return int(self.doc_starts[-1])

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._open:
            part = self.parts[i]
            self._open[i] = (np.load(part.tokens_path, mmap_mode="r"), np.load(part.ends_path, mmap_mode="r"))
        return self._open[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the global stream."""
        first = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        chunks = []
        i = first
        while start < stop:
            base = int(self.token_starts[i])
            end = min(stop, int(self.token_starts[i + 1]))
            chunks.append(self._arrays(i)[0][start - base:end - base])
            start = end
            i += 1
        return np.concatenate(chunks) if len(chunks) != 1 else np.asarray(chunks[0])

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (ending with EOS)."""
        i = int(np.searchsorted(self.doc_starts, d, side="right")) - 1
        tokens, ends = self._arrays(i)
        local = d - int(self.doc_starts[i])
        return np.asarray(tokens[(int(ends[local - 1]) if local else 0):int(ends[local])])

    def document_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(self._arrays(i)[1], prepend=0) for i in range(len(self.parts))])


@dataclass(frozen=True)
class Packing:
    mode: Literal["concat", "pad"]
    seq_len: int
    dtype: str
    pad_id: int

    @property
    def columns(self) -> dict[str, str]:
        from .mds import ndarray_column

        columns = {"input_ids": ndarray_column(self.dtype, self.seq_len)}
        if self.mode == "pad":
            columns["loss_mask"] = ndarray_column(np.uint8, self.seq_len)
        return columns

    @property
    def bytes_per_window(self) -> int:
        return self.seq_len * (np.dtype(self.dtype).itemsize + (self.mode == "pad"))

    def plan(self, store: TokenStore) -> dict[str, int]:
        """Window count and the tokens that do not make it into a window."""
        if self.mode == "concat":
            windows = store.total_tokens // self.seq_len
            return {"windows": windows, "dropped_tokens": store.total_tokens - windows * self.seq_len,
                    "truncated_documents": 0}
        over = np.maximum(store.document_lengths() - self.seq_len, 0)
        return {"windows": store.total_documents, "dropped_tokens": int(over.sum()),
                "truncated_documents": int((over > 0).sum())}

    def samples(self, store: TokenStore, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
        """Windows [start, stop) as MDS samples."""
        n = self.seq_len
        if self.mode == "concat":
            yield from ({"input_ids": row} for row in store.read(start * n, stop * n).reshape(-1, n))
            return
        for d in range(start, stop):
            doc = store.document(d)[:n]
            ids = np.full(n, self.pad_id, dtype=self.dtype)
            ids[:len(doc)] = doc
            mask = np.zeros(n, dtype=np.uint8)
            mask[:len(doc)] = 1
            yield {"input_ids": ids, "loss_mask": mask}
