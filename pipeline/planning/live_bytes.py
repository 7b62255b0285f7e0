"""Live tensor bytes over a piece of work, counted per storage, with real or fake tensors.

A dispatch mode sees every tensor an operator returns. Each new storage is charged once
(views and in-place results share their input's storage and cost nothing) and released
when Python frees it (a weakref callback on the storage). A storage seen again with another
size (`resize_`, `set_`) is charged the difference. The same count runs on real CPU tensors
at small shapes and on fake tensors (`FakeTensorMode`) at real shapes, so the two can be
compared byte for byte; allocator rounding, fragmentation and memory a kernel allocates
internally (workspaces) are not counted.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """`with LiveBytes() as live: ...`; then live.peak, live.current (bytes), live.marks (peaks by label),
    live.ops (operators dispatched).

    Tensors that exist before the mode is entered are not counted unless passed to `adopt`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.ops = 0
        self.marks: dict[str, int] = {}
        self._label: Optional[str] = None
        self._seen: dict[int, list] = {}  # storage key -> [weakref, charged bytes]

    # ---- charging

    def _charge(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        size = storage.nbytes()
        entry = self._seen.get(key)
        if entry is not None and entry[0]() is storage:
            if entry[1] == size:
                return
            self.current += size - entry[1]  # resized in place
            entry[1] = size
        else:
            if entry is not None:  # a dead storage whose address was reused before its callback ran
                self.current -= entry[1]
            self._seen[key] = [weakref.ref(storage, functools.partial(self._release, key)), size]
            self.current += size
        if self.current > self.peak:
            self.peak = self.current
        if self._label is not None and self.current > self.marks.get(self._label, 0):
            self.marks[self._label] = self.current

    def _release(self, key: int, ref: weakref.ref) -> None:
        entry = self._seen.get(key)
        if entry is not None and entry[0] is ref:
            del self._seen[key]
            self.current -= entry[1]

    def adopt(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count tensors made before the mode (parameters, the batch); returns the bytes added."""
        before = self.current
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._charge(t)
        return self.current - before

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Record the peak reached inside the block under `name` (e.g. forward, backward)."""
        previous, self._label = self._label, name
        self.marks[name] = max(self.marks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._label = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.prim.device.default:  # a metadata query (fake tensors ask it often)
            self.ops += 1
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._charge(t)
        return out
