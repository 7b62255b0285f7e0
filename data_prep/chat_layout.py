"""Rows of rendered conversations (chat_render.py), columns ``input_ids``, ``loss_mask``
(uint8: 1 on assistant tokens) and ``segment_ids`` (the conversation's number in its row,
1, 2, ...; 0 on padding: a conversation starts where the number changes).

- packed: greedy, in input order: a conversation goes into the current row if it fits whole,
  else it starts a new row; a conversation is never split across rows. The rest of each row
  is padding (pad id, loss_mask 0, segment 0).
- pad: one conversation per row, padded the same way.
A conversation longer than a row (``--long``) is dropped, or with ``truncate`` cut to its
first seq_len tokens, alone in its row; a cut that keeps no assistant token is dropped all
the same (nothing to train on). The plan counts both, by reason, for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np

from .errors import DataPrepError
from .mds import ndarray_column
from .windows import TokenStore

TOO_LONG = "longer than seq_len"
NO_ASSISTANT_LEFT = "no assistant token within seq_len"


@dataclass(frozen=True)
class Rows:
    """Row r holds conversations ``order[bounds[r]:bounds[r + 1]]``; slicing keeps that form."""

    order: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, rows: slice) -> Rows:
        lo, hi = int(self.bounds[rows.start]), int(self.bounds[rows.stop])
        return Rows(self.order[lo:hi], self.bounds[rows.start : rows.stop + 1] - lo)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.order[self.bounds[r] : self.bounds[r + 1]] for r in range(len(self)))


def greedy_bounds(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    """Row boundaries of whole items (each <= seq_len) packed in order: a new row when the next
    item does not fit in the current one."""
    bounds = [0]
    used = 0
    for i, size in enumerate(sizes.tolist()):
        if used + size > seq_len:
            bounds.append(i)
            used = 0
        used += size
    if len(sizes):
        bounds.append(len(sizes))
    return np.asarray(bounds, dtype=np.int64)


@dataclass(frozen=True)
class ChatLayout:
    mode: Literal["packed", "pad"]
    long: Literal["drop", "truncate"]
    seq_len: int
    dtype: str
    pad_id: int

    @property
    def segment_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.seq_len < 1 << 16 else np.uint32)

    @property
    def columns(self) -> dict[str, str]:
        return {
            "input_ids": ndarray_column(self.dtype, self.seq_len),
            "loss_mask": ndarray_column(np.uint8, self.seq_len),
            "segment_ids": ndarray_column(self.segment_dtype, self.seq_len),
        }

    @property
    def bytes_per_window(self) -> int:
        return self.seq_len * (np.dtype(self.dtype).itemsize + 1 + self.segment_dtype.itemsize)

    def plan(self, store: TokenStore) -> tuple[dict[str, Any], Rows]:
        n = self.seq_len
        lengths = store.document_lengths()
        assistant = store.document_mask_sums()
        long = lengths > n
        dropped = {TOO_LONG: 0, NO_ASSISTANT_LEFT: 0}
        if self.long == "drop":
            keep = ~long
            dropped[TOO_LONG] = int(long.sum())
        else:
            keep = np.ones(len(lengths), dtype=bool)
            for d in np.flatnonzero(long):
                assistant[d] = int(store.document_mask(d)[:n].sum())
                keep[d] = assistant[d] > 0
            dropped[NO_ASSISTANT_LEFT] = int((~keep).sum())
        order = np.flatnonzero(keep)
        if not len(order):
            raise DataPrepError(
                f"all {len(lengths)} conversations were dropped (--seq-len {n}, --long {self.long}: "
                f"{dropped[TOO_LONG]} {TOO_LONG}, {dropped[NO_ASSISTANT_LEFT]} with "
                f"{NO_ASSISTANT_LEFT}); raise --seq-len"
            )
        sizes = np.minimum(lengths[order], n)
        bounds = greedy_bounds(sizes, n) if self.mode == "packed" else np.arange(len(order) + 1)
        rows = len(bounds) - 1
        counts = {
            "windows": rows,
            "dropped_tokens": int(lengths.sum() - sizes.sum()),
            "padding_tokens": int(rows * n - sizes.sum()),
            "assistant_tokens": int(assistant[order].sum()),
            "truncated_conversations": int((long & keep).sum()),
            "dropped_conversations": {"total": sum(dropped.values()), "by_reason": dropped},
        }
        return counts, Rows(order, bounds)

    def samples(self, store: TokenStore, rows: Rows) -> Iterator[dict[str, np.ndarray]]:
        n = self.seq_len
        for conversations in rows:
            ids = np.full(n, self.pad_id, dtype=self.dtype)
            mask = np.zeros(n, dtype=np.uint8)
            segments = np.zeros(n, dtype=self.segment_dtype)
            at = 0
            for number, d in enumerate(conversations, start=1):
                tokens = store.document(d)[:n]
                end = at + len(tokens)
                ids[at:end] = tokens
                mask[at:end] = store.document_mask(d)[:n]
                segments[at:end] = number
                at = end
            yield {"input_ids": ids, "loss_mask": mask, "segment_ids": segments}
