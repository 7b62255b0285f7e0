"""An independent, deliberately plain re-implementation of Ouro's forward (docs/melt.md#1-looplm-ouro),
written from the description rather than from pipeline.models, to check it against."""

import math

import torch


def rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def reference_loop_states(sd, cfg, ids, kv_of_loop=None):
    """Per-loop normalised states for one unpadded sequence ids [S].

    kv_of_loop(t) -> which loop's keys/values loop t attends to (default: its own);
    the test of MELT's zero-shot baseline uses it to keep only the last loop's KV.
    """
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, eps, N, T = cfg.head_dim, cfg.rms_norm_eps, cfg.num_hidden_layers, cfg.total_ut_steps
    S = ids.shape[0]
    pos = torch.arange(S)
    h = sd["model.embed_tokens.weight"][ids]
    states, kv = [], {}
    for t in range(T):
        for l in range(N):  # noqa: E741  (the layer index, as in the formulas)
            p = f"model.layers.{l}."
            x = rms(h, sd[p + "input_layernorm.weight"], eps)
            q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(S, nh, hd).transpose(0, 1)
            k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(S, nkv, hd).transpose(0, 1)
            v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(S, nkv, hd).transpose(0, 1)
            q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
            kv[(t, l)] = (k, v)
            k, v = kv[(kv_of_loop(t) if kv_of_loop else t, l)]
            k = k.repeat_interleave(nh // nkv, 0)
            v = v.repeat_interleave(nh // nkv, 0)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(S, nh * hd)
            h = h + rms(a @ sd[p + "self_attn.o_proj.weight"].T, sd[p + "input_layernorm_2.weight"], eps)
            y = rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            m = torch.nn.functional.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)
            h = h + rms(m @ sd[p + "mlp.down_proj.weight"].T, sd[p + "post_attention_layernorm_2.weight"], eps)
        h = rms(h, sd["model.norm.weight"], eps)
        states.append(h)
    return states
