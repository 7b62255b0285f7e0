"""Building blocks shared by the LoopLM and MELT: Ouro's "sandwich" decoder layer.

The math follows the original Ouro code exactly (docs/melt.md, section 1.1); the attention step
is a callable handed in by the model so that LoopLM (per-loop cache) and MELT (gated
slots) can share every parameter and every other line of the layer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (Ouro/Qwen2 order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin computed in float32 and cast to the activations' dtype."""

    inv_freq: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, head_dim: int, rope_theta: float):
        super().__init__()
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.float().to(like.device)
        inv = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        device_type = like.device.type if like.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv @ pos).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(like.dtype), sin.to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    """q/k/v/o projections (no bias) and SDPA; where keys/values come from is the caller's business."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, S, H] -> q [B, heads, S, D], k/v [B, kv_heads, S, D], RoPE applied to q and k."""
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q, k, v, mask: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
        """SDPA -> [B, S, heads * D] (before o_proj). mask: bool [B|1, 1, Sq, Sk], True = may attend."""
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        bsz, _, seq, _ = out.shape
        return out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)


# attention step: (normalised input x, q, k, v) -> attention output before o_proj, [B, S, heads*D]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    """Ouro's decoder layer with four sandwich norms."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.self_attn = SelfAttention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.mlp = SwiGLU(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.input_layernorm_2 = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm_2 = RMSNorm(h, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn):
        """Returns (new hidden state, attention output before o_proj)."""
        x = self.input_layernorm(hidden)
        q, k, v = self.self_attn.project(x, cos, sin)
        attn_out = attend(x, q, k, v)
        hidden = hidden + self.input_layernorm_2(self.self_attn.o_proj(attn_out))
        hidden = hidden + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(hidden)))
        return hidden, attn_out


def causal_padding_mask(
    attention_mask: Optional[torch.Tensor], query_positions: torch.Tensor, key_length: int
) -> Optional[torch.Tensor]:
    """Bool mask [B|1, 1, Q, K]: key j visible to the query at cache position p iff j <= p and not padding.

    query_positions are absolute cache positions ([Q]); attention_mask covers all K keys
    ([B, K], 1 = real token). Query rows with nothing visible (left padding) are opened up
    entirely so that SDPA stays finite; such rows are padding and never read.
    """
    keys = torch.arange(key_length, device=query_positions.device)
    mask = (keys[None, :] <= query_positions[:, None])[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but there are {key_length} keys "
                "(past + new tokens)"
            )
        mask = mask & attention_mask[:, None, None, :].bool()
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask
