"""MELT's chunk-wise training reads the prefix in place: gradients exact, memory linear in length.

Memory is counted with LiveBytes (bytes of live tensor storages, the planner's counter) on real
CPU tensors: deterministic byte counts, not timings.
"""

from typing import Any

import pytest
import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltConfig, MeltForCausalLM
from pipeline.planning.live_bytes import LiveBytes
from tests.model_helpers import tiny_looplm

from .test_melt import random_gates


def reference_melt_logits(melt, ids, attention_mask):
    """MELT's last-loop logits as docs/melt.md section 2 states them, under plain autograd with
    copies: chunk by chunk, a query at loop t reads, for each token j of an earlier chunk,
    lerp(k_j(t), final slot_j, alpha), and for its own chunk lerp(k_j(t), slot_j(t), alpha);
    slot_j(1) = k_j(1), slot_j(t) = lerp(k_j(t), slot_j(t - 1), g). Mixed at every read here,
    where the model stores each token's mix once."""
    import torch.nn.functional as F

    from pipeline.models.layers import causal_padding_mask

    model, cfg = melt.model, melt.config
    inputs = model.begin_forward(ids, None, attention_mask, None, None, 0)
    bsz = ids.shape[0]
    own_keys: dict[tuple[int, int], list] = {}  # (loop, layer) -> each earlier chunk's loop-t keys/values
    final_slots: dict[int, list] = {}  # layer -> each earlier chunk's final slots
    outputs = []
    for start, end in model._chunk_bounds(ids.shape[1], 0, None):
        hidden, chunk = inputs.hidden[:, start:end], end - start
        mask = causal_padding_mask(attention_mask[:, :end], torch.arange(start, end), end)
        slots: dict[int, Any] = {}
        for loop in range(cfg.total_ut_steps):
            for index, layer in enumerate(model.layers):

                def attend(x, q, k, v, layer=layer, index=index, loop=loop):
                    new = torch.stack([k, v])
                    slots[index] = new if loop == 0 else torch.lerp(new, slots[index], layer.kv_gate(x, loop))
                    earlier = [
                        torch.lerp(own, slot, cfg.alpha)
                        for own, slot in zip(own_keys.get((loop, index), []), final_slots.get(index, []))
                    ]
                    own_keys.setdefault((loop, index), []).append(new)
                    kv = torch.cat([*earlier, torch.lerp(new, slots[index], cfg.alpha)], dim=3)
                    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=True)
                    return out.transpose(1, 2).reshape(bsz, chunk, -1)

                hidden, _ = layer(hidden, inputs.cos[:, start:end], inputs.sin[:, start:end], attend)
            hidden = model.norm(hidden)
        for index, slot in slots.items():
            final_slots.setdefault(index, []).append(slot)
        outputs.append(hidden)
    return melt.lm_head(torch.cat(outputs, dim=1))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kernels", ["cpu-flash", "recompute"])
def test_logits_and_gradients_equal_a_plain_autograd_reference(monkeypatch, alpha, checkpointing, kernels):
    """float64, 4 chunks (2, 3, 3, 3), GQA, left padding: the last loop's logits and every gradient
    equal those of a plain-autograd reference that copies and mixes the prefix at every read; with
    the CPU flash kernel's own backward and with the recomputing backward that other devices use."""
    import pipeline.models.prefix_attention as prefix_module

    if kernels == "recompute":
        monkeypatch.setattr(prefix_module, "_cpu_kernels", lambda q: False)
    lm = tiny_looplm().double()
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads  # GQA
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    weights = torch.randn(2, 11, 97, dtype=torch.float64)  # a loss that reaches every logit
    results = []
    for reference in (False, True):
        melt = random_gates(MeltForCausalLM.from_looplm(lm, chunk_size=3, alpha=alpha)).train()
        if checkpointing:
            melt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        logits = reference_melt_logits(melt, ids, mask) if reference else melt(ids, attention_mask=mask).logits
        (logits * weights).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in melt.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = results
    real = mask.bool()  # left padding's logits are never read
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-12, rtol=1e-10)
    assert grads["model.layers.0.kv_gate.proj.weight"].abs().sum() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-12, rtol=1e-10, msg=name)


def test_alpha_zero_gradients_equal_the_looplm_gradients():
    """At alpha 0 MELT is the LoopLM: its loss and every shared parameter's gradient are the LoopLM's,
    for chunked training with activation checkpointing (the gates get no gradient)."""
    lm = tiny_looplm().train()
    melt = random_gates(MeltForCausalLM.from_looplm(lm, chunk_size=3, alpha=0.0)).train()
    melt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 11))
    ref = lm(ids, labels=ids, use_cache=False)
    ref.loss.backward()
    out = melt(ids, labels=ids, use_cache=False)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    lm_grads = dict(lm.named_parameters())
    for name, param in melt.named_parameters():
        if ".kv_gate." in name:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, lm_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def tiny_config(seq: int, **overrides) -> LoopLMConfig:
    kw: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        total_ut_steps=4,
        max_position_embeddings=seq,
    )
    kw.update(overrides)
    return LoopLMConfig(**kw)


def step_activation_bytes(kind: str, seq: int, alpha: float = 1.0, chunk: int = 32) -> int:
    """Peak live bytes of one training step (forward + backward, checkpointing) above the parameters."""
    torch.manual_seed(0)
    config = tiny_config(seq)
    model = (
        LoopLMForCausalLM(config)
        if kind == "looplm"
        else MeltForCausalLM(MeltConfig.from_looplm_config(config, chunk_size=chunk, alpha=alpha))
    )
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (1, seq))
    with LiveBytes() as live:
        live.adopt(model.parameters())
        base = live.current
        model(ids, labels=ids, use_cache=False).loss.backward()
    return live.peak - base


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_training_step_memory_is_linear_in_sequence_length(alpha):
    """Doubling the sequence at a fixed chunk size at most doubles a MELT step's activation bytes (+10%);
    at 512 tokens MELT holds at most 1.5x the LoopLM's at alpha 1 and 3x mid-ramp. (Before the
    prefix was read in place, each chunk kept its own copy of the prefix: x2.6 / x3.2 per doubling.)"""
    short, long = step_activation_bytes("melt", 256, alpha), step_activation_bytes("melt", 512, alpha)
    assert long <= 2.2 * short, (short, long)
    looplm = step_activation_bytes("looplm", 512)
    assert long <= (1.5 if alpha == 1.0 else 3.0) * looplm, (long, looplm)


def prefill_bytes(layers: int) -> tuple[int, int]:
    """(peak live bytes, cache bytes) of prefilling 256 tokens in chunks of 16."""
    torch.manual_seed(0)
    melt = MeltForCausalLM(
        MeltConfig.from_looplm_config(tiny_config(256, num_hidden_layers=layers), chunk_size=16)
    ).eval()
    ids = torch.randint(0, 128, (1, 256))
    with torch.no_grad(), LiveBytes() as live:
        params = live.adopt(melt.parameters())
        cache = melt(ids, use_cache=True, logits_to_keep=1).past_key_values
    assert cache.allocated_bytes == cache.nbytes  # reserved exactly for the prompt
    return live.peak - params, cache.nbytes


def test_chunked_prefill_holds_no_copy_of_the_prefix():
    """Inference: what a chunked prefill holds beside its cache grows with the depth by one chunk's
    slots per layer (1/16 of the cache here, twice: the slots and the new keys), not by a copy of
    the prefix per layer (up to the cache's size again)."""
    (peak2, cache2), (peak8, cache8) = prefill_bytes(2), prefill_bytes(8)
    assert cache8 == 4 * cache2
    assert (peak8 - cache8) - (peak2 - cache2) < 0.25 * (cache8 - cache2), (peak2, cache2, peak8, cache8)
