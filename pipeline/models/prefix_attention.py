"""Attention of one chunk's queries over the stored prefix plus the chunk's own keys/values.

MELT's chunk c at loop t attends to the final slots of tokens [0, P) (earlier chunks) and
to its own current keys/values. Building `cat([prefix, own])` per (chunk, loop, layer) and
letting autograd keep it makes training memory quadratic in the sequence length. Here the
prefix is read in place from the cache's buffer (SlotLayer.data) and never saved: the
forward saves the chunk's queries, own keys/values, output and log-sum-exp; the backward
rebuilds the keys/values view, runs the attention's backward kernel and sends the prefix's
gradient to the pieces (the graph-carrying aliases of earlier chunks' writes). Nothing per
chunk grows with the prefix. On CPU the flash kernel's forward/backward ops are called
directly (bit-identical to SDPA's autograd); on other devices the backward recomputes the
attention forward first (one more attention forward per call).

The prefix is one cache entry: the layer's final slots, or while alpha < 1 the loop-t entry
that holds `lerp(loop-t keys, slots, alpha)` of every stored token (mixed once, when its chunk
was stored: MeltCache), so a call never mixes or copies the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .cache import SlotLayer


@dataclass
class PrefixSpec:
    """Where a chunk's prefix lives and how to attend (everything but the tensors that need gradients)."""

    entry: SlotLayer  # the cache entry this chunk reads; its tokens [0, prefix) are final
    prefix: int  # P: tokens before this chunk
    mask: Optional[torch.Tensor]  # bool [B|1, 1, C, P + C], True = may attend
    is_causal: bool
    enable_gqa: bool
    # filled by prefix_attention: the region [start, end) of each piece it sends gradients to
    piece_regions: tuple[tuple[int, int], ...] = ()

    def keys_values(self, own: torch.Tensor):
        """Keys and values [B, kv_heads, P + C, D] for the chunk (own: [2, B, kv_heads, C, D]), and a
        function that undoes the borrowing of the entry's buffer: the own keys/values are placed in
        its next C positions for the call, so that keys and values are one view without a copy of
        the prefix (what was there, later chunks during a checkpointed replay or the backward, is
        put back)."""
        P, C = self.prefix, own.shape[3]
        if P == 0:
            return own[0], own[1], lambda: None
        assert self.entry.data is not None  # the prefix is stored
        work = self.entry.data[:, :, :, : P + C]
        kept = work[:, :, :, P:].clone() if self.entry.length > P else None
        work[:, :, :, P:].copy_(own)

        def restore():
            if kept is not None:
                work[:, :, :, P:].copy_(kept)

        return work[0], work[1], restore

    @property
    def causal(self) -> bool:
        """Plain causal attention (no mask given): SDPA's own is_causal."""
        return self.is_causal and self.mask is None

    def attend(self, q, keys, values):
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.mask, is_causal=self.causal, enable_gqa=self.enable_gqa
        )

    def float_mask(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The bool mask as the additive mask the CPU flash kernel takes (as SDPA converts it)."""
        if self.mask is None:
            return None
        return torch.zeros(self.mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
            ~self.mask, float("-inf")
        )


def _cpu_kernels(q: torch.Tensor) -> bool:
    return q.device.type == "cpu"


class PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, own, spec: PrefixSpec, *pieces):
        ctx.spec = spec
        with torch.no_grad():
            keys, values, restore = spec.keys_values(own)
            if _cpu_kernels(q):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, keys, values, 0.0, spec.causal, attn_mask=spec.float_mask(q)
                )
                ctx.save_for_backward(q, own, out, lse)
            else:
                out = spec.attend(q, keys, values)
                ctx.save_for_backward(q, own)
            restore()
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        spec: PrefixSpec = ctx.spec
        saved = ctx.saved_tensors  # read once (activation checkpointing unpacks each tensor once)
        q, own = saved[:2]
        with torch.no_grad():
            keys, values, restore = spec.keys_values(own)
            if _cpu_kernels(q):
                out, lse = saved[2:]
                grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_out.contiguous(), q, keys, values, out, lse, 0.0, spec.causal, attn_mask=spec.float_mask(q)
                )
            else:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_(True) for t in (q, keys, values)]
                    grad_q, grad_k, grad_v = torch.autograd.grad(spec.attend(*leaves), leaves, grad_out)
        restore()
        P = spec.prefix
        grad_own = torch.stack([grad_k[:, :, P:], grad_v[:, :, P:]])
        # the pieces' keys and values get views of the kernel's gradients, never a copy of the prefix (a
        # view keeps its tensor alive only until autograd adds the piece's next contribution, a fresh sum)
        grads: list[Optional[torch.Tensor]] = []
        for index, (start, end) in enumerate(spec.piece_regions):
            needed = ctx.needs_input_grad[3 + 2 * index], ctx.needs_input_grad[4 + 2 * index]
            grads.append(grad_k[:, :, start:end] if needed[0] else None)
            grads.append(grad_v[:, :, start:end] if needed[1] else None)
        return (
            grad_q if ctx.needs_input_grad[0] else None,
            grad_own if ctx.needs_input_grad[1] else None,
            None,
            *grads,
        )


def prefix_attention(q: torch.Tensor, own: torch.Tensor, spec: PrefixSpec) -> torch.Tensor:
    """SDPA output [B, heads, C, D] of queries q [B, heads, C, D] over the prefix and own [2, B, kv, C, D]."""
    if spec.prefix == 0:
        return spec.attend(q, own[0], own[1])  # no prefix: plain autograd
    regions, pieces = [], []
    for piece in spec.entry.pieces_before(spec.prefix):
        regions.append((piece.start, piece.end))
        pieces += [piece.keys, piece.values]
    spec.piece_regions = tuple(regions)
    return PrefixAttention.apply(q, own, spec, *pieces)
