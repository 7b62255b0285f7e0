"""MELT: exact LoopLM at alpha 0, the zero-shot last-loop baseline, chunk-wise decoding,
constant cache size, gradients, gates, exits, generation and bad input."""

import pytest
import torch

from pipeline.models import LoopLMCache, MeltCache, MeltConfig, MeltForCausalLM
from tests.model_helpers import random_gates, tiny_looplm

TOL = dict(atol=1e-5, rtol=1e-5)


def melt_from(lm, **kw):
    return MeltForCausalLM.from_looplm(lm, **kw).eval()


@pytest.mark.parametrize("chunk", [1, 3, 11])
def test_alpha_zero_is_the_looplm(chunk):
    lm = tiny_looplm()
    melt = random_gates(melt_from(lm, chunk_size=chunk, alpha=0.0))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = lm(ids, output_loop_logits=True, use_cache=False)
        out = melt(ids, output_loop_logits=True)
    for a, b in zip(out.loop_logits, ref.loop_logits):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(out.exit_logits, ref.exit_logits):
        torch.testing.assert_close(a, b, **TOL)


def lastkv_looplm_logits(lm, ids):
    """LoopLM decoding token by token where every earlier token is seen through its last loop's
    keys/values only: after each token, copy its last-loop KV over its other loops' entries."""
    cfg = lm.config
    cache = LoopLMCache(cfg.num_hidden_layers, cfg.total_ut_steps)
    logits = []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            logits.append(lm(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
            for layer in range(cfg.num_hidden_layers):
                last = cache.layers[cache.slot(cfg.total_ut_steps - 1, layer)]
                for loop in range(cfg.total_ut_steps - 1):
                    entry = cache.layers[cache.slot(loop, layer)]
                    entry.keys[:, :, i] = last.keys[:, :, i]
                    entry.values[:, :, i] = last.values[:, :, i]
    return torch.cat(logits, dim=1)


def test_overwrite_chunk1_is_looplm_with_last_loop_kv():
    lm = tiny_looplm()
    melt = melt_from(lm, gate="overwrite", chunk_size=1, alpha=1.0)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = melt(ids)
        full = lm(ids, use_cache=False)
    reference = lastkv_looplm_logits(lm, ids)
    torch.testing.assert_close(out.logits, reference, **TOL)
    assert not torch.allclose(out.logits, full.logits, atol=1e-3)  # and it is not the LoopLM itself


@pytest.mark.parametrize("gate", ["elementwise", "headwise", "mean"])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_incremental_decoding_equals_chunk1_forward(gate, alpha):
    melt = random_gates(melt_from(tiny_looplm(), gate=gate, chunk_size=1, alpha=alpha))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        whole = melt(ids, use_cache=False, output_loop_logits=True)
        cache = None
        steps = []
        for i in range(10):
            out = melt(ids[:, i : i + 1], past_key_values=cache, use_cache=True, output_loop_logits=True)
            cache = out.past_key_values
            steps.append(out)
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), whole.logits, **TOL)
    torch.testing.assert_close(torch.cat([s.exit_logits[-1] for s in steps], 1), whole.exit_logits[-1], **TOL)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_prefill_chunked_then_decode_equals_forward_with_same_chunks(alpha):
    melt = random_gates(melt_from(tiny_looplm(), chunk_size=4, alpha=alpha))
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        prefill = melt(ids[:, :10], use_cache=True)  # chunks 2, 4, 4 (aligned to the end)
        steps = [prefill.logits]
        cache = prefill.past_key_values
        for i in range(10, 13):
            out = melt(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        reference = melt(ids, chunk_size=[2, 4, 4, 1, 1, 1], use_cache=False)
        other = melt(ids, chunk_size=[4, 4, 2, 1, 1, 1], use_cache=False)
    torch.testing.assert_close(torch.cat(steps, 1), reference.logits, **TOL)
    assert not torch.allclose(other.logits[:, 3:], reference.logits[:, 3:], atol=1e-4)  # chunking matters


def test_cache_bytes_do_not_depend_on_loops_and_equal_a_standard_transformer():
    ids = torch.randint(0, 97, (2, 12))
    sizes = {}
    for loops in (1, 2, 4, 8):
        melt = melt_from(tiny_looplm(total_ut_steps=loops), chunk_size=4)
        with torch.no_grad():
            cache = melt.generate(
                ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0
            ).past_key_values
        assert isinstance(cache, MeltCache)
        sizes[loops] = cache.nbytes
    standard = tiny_looplm(total_ut_steps=1)
    with torch.no_grad():
        std_cache = standard.generate(
            ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0
        ).past_key_values
    looplm = tiny_looplm(total_ut_steps=4)
    with torch.no_grad():
        loop_cache = looplm.generate(
            ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0
        ).past_key_values
    assert len(set(sizes.values())) == 1
    assert sizes[1] == std_cache.nbytes > 0
    assert loop_cache.nbytes == 4 * sizes[4]


def test_gradients_reach_gates_and_earlier_chunks_unless_truncated():
    lm = tiny_looplm()
    for truncate in (False, True):
        melt = random_gates(melt_from(lm, chunk_size=4, alpha=1.0, truncate_chunk_gradients=truncate)).train()
        embeds = melt.model.embed_tokens(torch.randint(0, 97, (1, 8))).detach().requires_grad_(True)
        out = melt(inputs_embeds=embeds)
        out.logits[:, 4:].sum().backward()  # loss on the second chunk only
        grad_first_chunk = embeds.grad[:, :4].abs().sum().item()
        gate_grad = melt.model.layers[0].kv_gate.proj.weight.grad.abs().sum().item()
        assert gate_grad > 0
        if truncate:
            assert grad_first_chunk == 0
        else:
            assert grad_first_chunk > 0


def test_activation_checkpointing_per_chunk_gives_the_same_gradients():
    lm = tiny_looplm()
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for ckpt in (False, True):
        melt = random_gates(melt_from(lm, chunk_size=3, alpha=0.5)).train()
        if ckpt:
            melt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        melt(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in melt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def _single_layer_slot(gate, loops):
    """Run a 1-layer MELT over one whole-sequence chunk; return (slot keys, per-loop rotated keys,
    per-loop normalised attention inputs, the model)."""
    lm = tiny_looplm(total_ut_steps=loops, num_hidden_layers=1)
    melt = random_gates(melt_from(lm, gate=gate, chunk_size=6, alpha=1.0))
    ids = torch.randint(0, 97, (1, 6))
    layer = melt.model.layers[0]
    keys, inputs = [], []
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o)),
        layer.input_layernorm.register_forward_hook(lambda m, i, o: inputs.append(o)),
    ]
    with torch.no_grad():
        out = melt(ids, use_cache=True)
    for h in hooks:
        h.remove()
    cfg = lm.config
    cos, sin = melt.model.rotary_emb(keys[0], torch.arange(6)[None])
    from pipeline.models.layers import apply_rotary

    rot = [apply_rotary(k.view(1, 6, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2), cos, sin) for k in keys]
    return out.past_key_values.layers[0].keys, rot, inputs, melt


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_learned_gates_by_hand(gate):
    """T = 2: slot = g * k1 + (1 - g) * k2 with g = sigmoid(W x2 + b) from loop 2's normalised input."""
    slot, (k1, k2), (_, x2), melt = _single_layer_slot(gate, loops=2)
    cfg = melt.config
    proj = melt.model.layers[0].kv_gate.proj
    g = torch.sigmoid(proj(x2))[..., : proj.out_features // 2]  # the key half
    per_head = cfg.head_dim if gate == "elementwise" else 1
    g = g.view(1, 6, cfg.num_key_value_heads, per_head).transpose(1, 2)
    torch.testing.assert_close(slot, g * k1 + (1 - g) * k2, **TOL)


def test_fresh_gates_start_overwrite_like():
    lm = tiny_looplm()
    melt = melt_from(lm, gate="elementwise", gate_init_bias=-3.0)
    assert melt.model.layers[0].kv_gate.proj.out_features == 2 * lm.config.num_key_value_heads * lm.config.head_dim
    assert torch.count_nonzero(melt.model.layers[1].kv_gate.proj.weight) == 0
    assert melt(torch.randint(0, 97, (1, 5))).gate_stats is None  # eval mode: not collected unless asked
    out = melt(torch.randint(0, 97, (1, 5)), output_gate_stats=True)
    torch.testing.assert_close(out.gate_stats, torch.sigmoid(torch.tensor(-3.0)).expand(2, 3))


def test_mean_gate_is_the_average_of_the_loop_keys():
    slot, rot, _, _ = _single_layer_slot("mean", loops=3)
    torch.testing.assert_close(slot, sum(rot) / 3, **TOL)


def test_overwrite_gate_keeps_the_last_loop_key():
    slot, rot, _, _ = _single_layer_slot("overwrite", loops=3)
    torch.testing.assert_close(slot, rot[-1], **TOL)


def test_exit_at_loop_and_q_exit_freeze_the_slot():
    lm = tiny_looplm(total_ut_steps=3)
    melt = random_gates(melt_from(lm, chunk_size=1))
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        two = melt(ids, exit_at_loop=2, use_cache=True)
        melt2 = melt_from(tiny_looplm(total_ut_steps=3), chunk_size=1)
        melt2.load_state_dict(melt.state_dict())
        melt2.config.total_ut_steps = 2
        two_loops = melt2(ids, use_cache=True)
        torch.testing.assert_close(two.logits, two_loops.logits, **TOL)
        torch.testing.assert_close(two.past_key_values.layers[0].keys, two_loops.past_key_values.layers[0].keys)
        # Q-exit: q = 0 exits every token after loop 1 -> the same as exit_at_loop=1
        q0 = melt(ids, exit_threshold=0.0, use_cache=True)
        one = melt(ids, exit_at_loop=1, use_cache=True)
        torch.testing.assert_close(q0.logits, one.logits, **TOL)
        torch.testing.assert_close(q0.past_key_values.layers[1].values, one.past_key_values.layers[1].values, **TOL)
        assert (q0.exit_loop == 1).all()
        q1 = melt(ids, exit_threshold=1.0)
        assert (q1.exit_loop == 3).all()
        torch.testing.assert_close(q1.logits, melt(ids).logits, **TOL)
        mid = melt(ids, exit_threshold=0.5)
        assert mid.exit_loop.min() >= 1 and mid.exit_loop.max() <= 3


def test_generate_greedy_sampling_and_left_padded_batches():
    melt = random_gates(melt_from(tiny_looplm(), chunk_size=3))
    melt.generation_config.pad_token_id = 0
    prompts = [torch.randint(3, 97, (n,)) for n in (8, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batch = melt.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, p in enumerate(prompts):
        alone = melt.generate(p[None], max_new_tokens=6, do_sample=False)
        assert batch[i, width:].tolist() == alone[0, len(p) :].tolist()
    torch.manual_seed(0)
    a = melt.generate(prompts[0][None], max_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(0)
    b = melt.generate(prompts[0][None], max_new_tokens=6, do_sample=True, top_k=0)
    assert a.tolist() == b.tolist() and a.shape == (1, 14)


def test_generate_without_cache_matches_with_cache():
    melt = random_gates(melt_from(tiny_looplm(), chunk_size=1))
    prompt = torch.randint(3, 97, (1, 5))
    with_cache = melt.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    without = melt.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.tolist() == without.tolist()


def test_save_load_round_trip_and_from_looplm_path(tmp_path):
    lm = tiny_looplm()
    lm.save_pretrained(tmp_path / "looplm")
    melt = random_gates(
        MeltForCausalLM.from_looplm(tmp_path / "looplm", gate="headwise", chunk_size=2, alpha=0.25, gate_init_bias=-2.0)
    )
    assert melt.config.gate == "headwise" and melt.config.alpha == 0.25 and melt.config.model_type == "melt"
    melt.save_pretrained(tmp_path / "melt")
    again = MeltForCausalLM.from_pretrained(tmp_path / "melt")
    assert again.config.gate == "headwise" and again.config.chunk_size == 2 and again.config.gate_init_bias == -2.0
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(melt.eval()(ids).logits, again.eval()(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="model_type 'melt'.*'ouro'"):
        MeltForCausalLM.from_pretrained(tmp_path / "looplm")


def test_bad_input_is_refused():
    lm = tiny_looplm()
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        MeltForCausalLM.from_looplm(lm, chunk_size=0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        MeltForCausalLM.from_looplm(lm, alpha=1.5)
    with pytest.raises(ValueError, match="gate='sticky' is not one of"):
        MeltConfig(gate="sticky")
    melt = melt_from(lm)
    with pytest.raises(ValueError, match="alpha must be a number"):
        melt.set_alpha(-0.1)
    with pytest.raises(ValueError, match="sum to 5, not the sequence length 6"):
        melt(torch.zeros(1, 6, dtype=torch.long), chunk_size=[2, 3])
    cache = melt(torch.zeros(1, 3, dtype=torch.long), use_cache=True).past_key_values
    melt.set_alpha(0.5)
    with pytest.raises(ValueError, match="needs per-loop keys"):
        melt(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache)
    # the per-loop entries are stored mixed at one alpha: another alpha cannot continue them
    cache = melt(torch.zeros(1, 3, dtype=torch.long), use_cache=True).past_key_values
    melt.set_alpha(0.25)
    with pytest.raises(ValueError, match=r"mixed at alpha=0.5; a forward at alpha=0.25 cannot continue it"):
        melt(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache)
    assert cache.get_seq_length() == 3  # nothing was written


def test_configured_chunk_sizes_apply_to_inputs_they_cover():
    melt = random_gates(melt_from(tiny_looplm(), chunk_size=4, chunk_sizes=[5, 1, 1], prompt_chunk_size=5))
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        configured = melt(ids).logits
        explicit = melt(ids, chunk_size=[5, 1, 1]).logits
        default = melt(ids, chunk_size=4).logits
        prefill = melt(ids[:, :5], use_cache=True)  # 5 tokens: prompt_chunk_size, one chunk
        cache, steps = prefill.past_key_values, [prefill.logits]
        for i in (5, 6):
            out = melt(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(configured, explicit, atol=0, rtol=0)
    assert not torch.allclose(configured, default, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), configured, **TOL)
    # generate runs the prompt as one chunk too (and transformers' own prefill chunking stays off)
    generated = melt.generate(ids[:, :5], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7) and generated[:, 5].tolist() == configured[:, 4].argmax(-1).tolist()
    with pytest.raises(ValueError, match="chunk_sizes entries must be an integer >= 1"):
        MeltConfig(chunk_sizes=[3, 0])
