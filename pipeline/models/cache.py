"""KV caches of the transformers `Cache` API. Every cache here exposes `nbytes`."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class LoopLMCache(Cache):
    """The LoopLM's cache: one K/V slot per (loop, layer), T x N in all.

    Slot index is loop * num_layers + layer (the upstream Ouro cache is sized N and
    silently mixes loops; this one is not).
    """

    def __init__(self, num_layers: int, num_loops: int):
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers * num_loops)])
        self.num_layers, self.num_loops = num_layers, num_loops

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.layers if layer.is_initialized)


class MeltCache(Cache):
    """MELT's cache: one final K/V slot per token per layer, whatever the loop count.

    Entries 0..N-1 hold the gated slots. Only while alpha < 1 (phase 1, interpolating
    towards the LoopLM) does a token also need its own per-loop keys/values; those live
    in entries N + loop * N + layer and exist only when `keep_loop_kv` is set.
    """

    def __init__(self, num_layers: int, num_loops: int, keep_loop_kv: bool = False):
        entries = num_layers * (1 + (num_loops if keep_loop_kv else 0))
        super().__init__(layers=[DynamicLayer() for _ in range(entries)])
        self.num_layers, self.num_loops, self.keep_loop_kv = num_layers, num_loops, keep_loop_kv

    def loop_entry(self, loop: int, layer: int) -> int:
        return self.num_layers + loop * self.num_layers + layer

    def prefix(self, entry: int):
        layer = self.layers[entry]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return None, None
        return layer.keys, layer.values

    def append(self, entry: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layers[entry].update(keys, values)

    def replace(self, entry: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install already-concatenated prefix + new tensors (saves one copy per layer when decoding)."""
        layer = self.layers[entry]
        if not layer.is_initialized:
            layer.lazy_initialization(keys)
        layer.keys, layer.values = keys, values

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.layers if layer.is_initialized)
