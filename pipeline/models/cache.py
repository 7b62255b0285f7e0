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
