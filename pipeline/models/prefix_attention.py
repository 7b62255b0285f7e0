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

While alpha < 1 the prefix is `lerp(loop-t keys, slots, alpha)` (docs/melt.md, section 2.3), built in a
temporary per call; its gradient goes to both, weighted (1 - alpha) and alpha.
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

    slots: SlotLayer  # the layer's gated slots; tokens [0, prefix) are final
    loop_kv: Optional[SlotLayer]  # the layer's loop-t keys/values (alpha < 1 only)
    prefix: int  # P: tokens before this chunk
    alpha: float
    mask: Optional[torch.Tensor]  # bool [B|1, 1, C, P + C], True = may attend
    is_causal: bool
    enable_gqa: bool
    # filled by prefix_attention: each piece's region [start, end) and the weight of its gradient
    piece_regions: tuple = ()

    def keys_values(self, own: torch.Tensor):
        """Keys and values [B, kv_heads, P + C, D] for the chunk (own: [2, B, kv_heads, C, D]), and a
        function that undoes any borrowing of the slot buffer."""
        P, C = self.prefix, own.shape[3]
        if P == 0:
            return own[0], own[1], lambda: None
        assert self.slots.data is not None  # the prefix is stored
        if self.loop_kv is None:  # alpha = 1: borrow the slot buffer's next C positions for the own keys
            work = self.slots.data[:, :, :, : P + C]
            kept = work[:, :, :, P:].clone() if self.slots.length > P else None
            work[:, :, :, P:].copy_(own)

            def restore():
                if kept is not None:
                    work[:, :, :, P:].copy_(kept)

            return work[0], work[1], restore
        assert self.loop_kv.data is not None
        work = own.new_empty(*own.shape[:3], P + C, own.shape[4])
        torch.lerp(self.loop_kv.data[:, :, :, :P], self.slots.data[:, :, :, :P], self.alpha, out=work[:, :, :, :P])
        work[:, :, :, P:].copy_(own)
        return work[0], work[1], lambda: None

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
        # one tensor for every gradient; the pieces get views of it (a view keeps it alive only until
        # autograd adds the piece's next contribution, which makes a fresh sum)
        full = torch.stack([grad_k, grad_v])
        grad_own = full[:, :, :, P:]
        weighted: dict[float, torch.Tensor] = {1.0: full}
        grads: list[Optional[torch.Tensor]] = []
        for index, (start, end, weight) in enumerate(spec.piece_regions):
            if not ctx.needs_input_grad[3 + index]:
                grads.append(None)
                continue
            if weight not in weighted:
                weighted[weight] = full[:, :, :, :P] * weight
            grads.append(weighted[weight][:, :, :, start:end])
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
    # the prefix is lerp(loop-t keys, slots, alpha): each gets its share of the gradient (none at weight 0)
    sources = (
        [(spec.slots, 1.0)] if spec.loop_kv is None else [(spec.slots, spec.alpha), (spec.loop_kv, 1 - spec.alpha)]
    )
    regions, pieces = [], []
    for layer, weight in sources:
        if weight == 0.0:
            continue
        for start, end, piece in layer.pieces_before(spec.prefix):
            regions.append((start, end, weight))
            pieces.append(piece)
    spec.piece_regions = tuple(regions)
    return PrefixAttention.apply(q, own, spec, *pieces)
