"""Packing tokenized documents into fixed windows.

The tokenized documents live in per-task files; ``TokenStore`` addresses them as one global
token stream (and one global list of documents), so the windows do not depend on how the
documents were split into tasks:
- concat: window w holds tokens [w*N, (w+1)*N) of the stream (documents joined, each ended
  by EOS); the final tail shorter than N is dropped and counted.
- pad: window d holds document d (with its EOS), truncated to N (the rest counted as
  dropped) and padded; ``loss_mask`` is 1 on the document's tokens, 0 on padding.

A layout (``Packing`` here, ``ChatLayout`` in chat_layout.py) plans its rows once over the
whole store, as a sliceable sequence (one item per output row), and turns any slice of it
into MDS samples; the write pass hands each output part one slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from .errors import DataPrepError


@dataclass(frozen=True)
class TokenPart:
    """One tokenization task's output: flat ids (.npy), each document's end offset (.npy) and,
    for chat, the flat loss mask (.npy)."""

    tokens_path: str
    ends_path: str
    documents: int
    tokens: int
    mask_path: str | None = None


def save_part(
    scratch: str, index: int, flat: np.ndarray, ends: np.ndarray, mask: np.ndarray | None = None
) -> TokenPart:
    paths = {kind: os.path.join(scratch, f"{index:06d}.{kind}.npy") for kind in ("ids", "ends", "mask")}
    np.save(paths["ids"], flat)
    np.save(paths["ends"], ends)
    if mask is not None:
        np.save(paths["mask"], mask)
    return TokenPart(paths["ids"], paths["ends"], len(ends), len(flat), paths["mask"] if mask is not None else None)


class TokenStore:
    def __init__(self, parts: list[TokenPart]):
        self.parts = parts
        self.token_starts = np.concatenate([[0], np.cumsum([p.tokens for p in parts])]).astype(np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum([p.documents for p in parts])]).astype(np.int64)
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        return {**self.__dict__, "_open": {}}

    @property
    def total_tokens(self) -> int:
        return int(self.token_starts[-1])

    @property
    def total_documents(self) -> int:
        return int(self.doc_starts[-1])

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if i not in self._open:
            part = self.parts[i]
            mask = np.load(part.mask_path, mmap_mode="r") if part.mask_path else None
            self._open[i] = (np.load(part.tokens_path, mmap_mode="r"), np.load(part.ends_path, mmap_mode="r"), mask)
        return self._open[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the global stream."""
        first = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        chunks = []
        i = first
        while start < stop:
            base = int(self.token_starts[i])
            end = min(stop, int(self.token_starts[i + 1]))
            chunks.append(self._arrays(i)[0][start - base : end - base])
            start = end
            i += 1
        return np.concatenate(chunks) if len(chunks) != 1 else np.asarray(chunks[0])

    def _span(self, d: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], slice]:
        i = int(np.searchsorted(self.doc_starts, d, side="right")) - 1
        arrays = self._arrays(i)
        local = d - int(self.doc_starts[i])
        ends = arrays[1]
        return arrays, slice(int(ends[local - 1]) if local else 0, int(ends[local]))

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (ending with EOS for text)."""
        arrays, span = self._span(d)
        return np.asarray(arrays[0][span])

    def document_mask(self, d: int) -> np.ndarray:
        """Document d's loss mask (stores written with masks only)."""
        arrays, span = self._span(d)
        assert arrays[2] is not None, "a store written with loss masks"
        return np.asarray(arrays[2][span])

    def document_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(self._arrays(i)[1], prepend=0) for i in range(len(self.parts))])

    def document_mask_sums(self) -> np.ndarray:
        """Per document, how many of its tokens the mask keeps."""
        sums = []
        for i in range(len(self.parts)):
            _, ends, mask = self._arrays(i)
            assert mask is not None, "a store written with loss masks"
            total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            sums.append(np.diff(total[np.asarray(ends)], prepend=0))
        return np.concatenate(sums)


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

    def plan(self, store: TokenStore) -> tuple[dict[str, int], range]:
        """Counts for the manifest (windows, tokens left out of every window) and the rows:
        window indices (concat) or document indices (pad)."""
        if self.mode == "concat":
            windows = store.total_tokens // self.seq_len
            if windows == 0:
                raise DataPrepError(
                    f"the input has {store.total_tokens} tokens, fewer than one window of --seq-len {self.seq_len}"
                )
            return (
                {
                    "windows": windows,
                    "dropped_tokens": store.total_tokens - windows * self.seq_len,
                    "truncated_documents": 0,
                },
                range(windows),
            )
        over = np.maximum(store.document_lengths() - self.seq_len, 0)
        return (
            {
                "windows": store.total_documents,
                "dropped_tokens": int(over.sum()),
                "truncated_documents": int((over > 0).sum()),
            },
            range(store.total_documents),
        )

    def samples(self, store: TokenStore, rows: range) -> Iterator[dict[str, np.ndarray]]:
        """The planned rows ``rows`` (a slice of plan()'s) as MDS samples."""
        n = self.seq_len
        if self.mode == "concat":
            yield from ({"input_ids": row} for row in store.read(rows.start * n, rows.stop * n).reshape(-1, n))
            return
        for d in rows:
            doc = store.document(d)[:n]
            ids = np.full(n, self.pad_id, dtype=self.dtype)
            ids[: len(doc)] = doc
            mask = np.zeros(n, dtype=np.uint8)
            mask[: len(doc)] = 1
            yield {"input_ids": ids, "loss_mask": mask}
