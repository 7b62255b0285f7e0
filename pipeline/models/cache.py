"""KV caches of the transformers `Cache` API. Every cache here exposes `nbytes`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


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


class SlotLayer(CacheLayerMixin):
    """Keys and values of one MELT cache entry, in one buffer [2, B, kv_heads, capacity, D] written in place.

    Chunk after chunk, `write` copies the new tokens' keys/values after the stored ones: nothing
    ever holds a copy of the prefix (memory linear in the sequence length, in training as in
    decoding). When the written tensor carries a graph (training), `write` keeps a `Piece`: the
    region's keys and values as two aliases of the buffer that carry the graph, so that the
    attention of later chunks can send the prefix's keys' and values' gradients back to the chunk
    that wrote it, each as a view of the attention's own gradient (see prefix_attention.py).
    Reserve the whole length up front (`reserve`) to avoid regrowth.
    """

    is_sliding = False

    def __init__(self) -> None:  # no CacheLayerMixin.__init__: keys/values are views of the buffer
        self.data: Optional[torch.Tensor] = None
        self.length = 0
        self.pieces: list[Piece] = []  # the regions written with a graph
        self.is_initialized = False

    # -- storage (read-only views of the buffer, where CacheLayerMixin has plain attributes: every base method
    # that assigns them, offload, prefetch, reset and reorder_cache, is overridden below)
    @property
    def keys(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        return None if self.data is None else self.data[0, :, :, : self.length]

    @property
    def values(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        return None if self.data is None else self.data[1, :, :, : self.length]

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[3]

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def reserve(self, like: torch.Tensor, total: int) -> None:
        """Room for `total` tokens. like: [2, B, kv_heads, *, D] (shape, dtype, device). Growing keeps the
        stored tokens; past the first allocation it grows by a quarter at least (amortised decoding)."""
        if total <= self.capacity:
            return
        if not self.is_initialized:
            self.lazy_initialization(like)
        if self.length:
            total = max(total, self.capacity + self.capacity // 4 + 16)
        data = like.new_empty(*like.shape[:3], total, like.shape[4])
        if self.length:
            assert self.data is not None  # stored tokens live in the buffer
            data[:, :, :, : self.length].copy_(self.data[:, :, :, : self.length])
        self.data = data

    def write(self, kv: torch.Tensor, keep_graph: bool = True) -> None:
        """Append kv [2, B, kv_heads, C, D], keeping its graph as a Piece when it has one and keep_graph."""
        start, end = self.length, self.length + kv.shape[3]
        self.reserve(kv, end)
        self.length = end
        if keep_graph and kv.requires_grad and torch.is_grad_enabled():
            keys, values = _WriteRegion.apply(kv, self.data, start)
            self.pieces.append(Piece(start, end, keys, values))
            return
        assert self.data is not None  # reserve allocated it (a write of no tokens to an empty entry fails here)
        with torch.no_grad():
            self.data[:, :, :, start:end].copy_(kv)

    def pieces_before(self, end: int) -> list["Piece"]:
        """The pieces written with a graph that lie inside [0, end)."""
        return [p for p in self.pieces if p.end <= end]

    # -- the transformers cache-layer API
    def update(self, key_states, value_states, cache_kwargs=None):
        self.write(torch.stack([key_states, value_states]))
        return self.keys, self.values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.length + cache_position.shape[0], 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length - abs(max_length)
        if max_length < self.length:
            self.length = max(max_length, 0)
            self.pieces = [p for p in self.pieces if p.end <= self.length]

    def _rebuild(self, data: torch.Tensor) -> None:
        self.data, self.pieces = data, []  # batch surgery is for inference: no graph survives it

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.data is not None:
            self._rebuild(self.data[:, :, :, : self.length].repeat_interleave(repeats, dim=1))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.data is not None:
            self._rebuild(self.data[:, indices, :, : self.length])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.data is not None:
            self._rebuild(self.data[:, :, :, : self.length].index_select(1, beam_idx.to(self.data.device)))

    def offload(self):
        if self.data is not None:
            self.data = self.data.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.data is not None and self.data.device != self.device:
            self.data = self.data.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.length, self.pieces = 0, []


@dataclass
class Piece:
    """Tokens [start, end) of a SlotLayer, written with a graph: their keys and values [B, kv_heads,
    end - start, D], aliases of the buffer that carry the writer's graph."""

    start: int
    end: int
    keys: torch.Tensor
    values: torch.Tensor


class _WriteRegion(torch.autograd.Function):
    """Copy kv into buffer[:, :, :, start:start + C] and return aliases of that region's keys and
    values that carry kv's graph (the identity for gradients): the stored slots cost their bytes
    once, not twice. Keys and values apart, so that a reader can hand back the attention's key and
    value gradients as views, without stacking them."""

    @staticmethod
    def forward(ctx, kv, buffer, start):
        region = buffer[:, :, :, start : start + kv.shape[3]]
        region.copy_(kv)
        return region[0].detach(), region[1].detach()

    @staticmethod
    def backward(ctx, grad_keys, grad_values):  # an unread output's gradient arrives as zeros (materialized)
        return torch.stack([grad_keys, grad_values]), None, None


class MeltCache(Cache):
    """MELT's cache: one final K/V slot per token per layer, whatever the loop count.

    Entries 0..N-1 hold the gated slots. Only while alpha < 1 (phase 1, interpolating
    towards the LoopLM) does a later chunk read more for a stored token at loop t: the mix
    `lerp(its own loop-t keys/values, its final slot, alpha)`. Those mixes live in entries
    N + loop * N + layer, which exist only when `keep_loop_kv` is set; they are stored mixed
    (once per token, when its chunk is stored) so that no chunk re-mixes the whole prefix,
    and hence hold one alpha (`loop_alpha`, set by the first write). Every entry is a SlotLayer:
    one buffer per entry for the whole sequence, written chunk by chunk.
    """

    def __init__(self, num_layers: int, num_loops: int, keep_loop_kv: bool = False):
        entries = num_layers * (1 + (num_loops if keep_loop_kv else 0))
        super().__init__(layers=[SlotLayer() for _ in range(entries)])
        self.num_layers, self.num_loops, self.keep_loop_kv = num_layers, num_loops, keep_loop_kv
        self.loop_alpha: Optional[float] = None  # the alpha the per-loop entries are mixed at

    def check_alpha(self, alpha: float) -> None:
        """The per-loop entries were mixed at one alpha: a forward at another would read wrong keys."""
        if alpha < 1.0 and not self.keep_loop_kv:
            raise ValueError(f"alpha={alpha} needs per-loop keys, but this MeltCache was built at alpha = 1")
        if self.keep_loop_kv and self.get_seq_length() and self.loop_alpha != alpha:
            raise ValueError(
                f"this MeltCache's per-loop entries were mixed at alpha={self.loop_alpha}; a forward at "
                f"alpha={alpha} cannot continue it (start a new cache)"
            )
        if self.keep_loop_kv:
            self.loop_alpha = alpha

    @property
    def entries(self) -> list[SlotLayer]:
        """`layers`, typed as what they are (Cache declares them CacheLayerMixin)."""
        return cast("list[SlotLayer]", self.layers)

    def loop_entry(self, loop: int, layer: int) -> int:
        return self.num_layers + loop * self.num_layers + layer

    def append(self, entry: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.entries[entry].write(torch.stack([keys, values]))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens' keys and values (what a standard transformer's cache holds for
        them); `allocated_bytes` counts the buffers' spare room too."""
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.entries if layer.data is not None)

    @property
    def allocated_bytes(self) -> int:
        return sum(tensor_bytes(layer.data) for layer in self.entries if layer.data is not None)
