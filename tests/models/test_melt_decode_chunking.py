"""MELT's uncached paths chunk as cached decoding does (issue 15, item 1), and early exit at
alpha < 1 keeps a cache exact (item 2). Float64 throughout: the comparisons are tight."""

import pytest
import torch

from pipeline.evaluation.contenders import Contender
from pipeline.evaluation.data import EvalSplit
from pipeline.evaluation.metrics import evaluate, teacher_forced
from pipeline.evaluation.report import markdown_table
from pipeline.models import LoopLMCache, MeltForCausalLM
from pipeline.training.losses import token_cross_entropy
from tests.model_helpers import random_gates, tiny_looplm

EXACT = dict(atol=1e-12, rtol=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def melt_model(gate="elementwise", alpha=1.0, **options):
    """A tiny float64 MELT whose gates really mix (away from their overwrite-like init)."""
    return random_gates(MeltForCausalLM.from_looplm(tiny_looplm().double(), gate=gate, alpha=alpha, **options).eval())


def left_padded(lengths, seed=3):
    """Prompts of the given lengths, left-padded with 0 to the longest: (ids, attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 97, (n,), generator=gen)
    return ids, (ids != 0).long()


def greedy(melt, ids, mask, new_tokens, use_cache):
    return melt.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_logits=True,
    )


def cached_decoding_logits(melt, ids, mask, prompt):
    """Logits of prefill (its last position) and of each later token fed one by one with the cache."""
    out = melt(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    logits = [out.logits[:, -1:]]
    for i in range(prompt, ids.shape[1]):
        out = melt(
            ids[:, i : i + 1], attention_mask=mask[:, : i + 1], past_key_values=out.past_key_values, use_cache=True
        )
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize(
    "gate, options",
    [
        ("elementwise", dict(chunk_size=1)),
        ("elementwise", dict(chunk_size=4)),
        ("elementwise", dict(chunk_size=7)),
        ("elementwise", dict(chunk_size=4, chunk_sizes=[5, 4])),  # covers the 9-token prompt: prefill uses it
        ("elementwise", dict(chunk_size=4, prompt_chunk_size=3)),
        ("headwise", dict(chunk_size=4)),
        ("mean", dict(chunk_size=7)),
        ("overwrite", dict(chunk_size=4)),
    ],
)
def test_uncached_generation_and_decode_chunked_forward_equal_cached_decoding(gate, options):
    melt = melt_model(gate, **options)
    ids, mask = left_padded((9, 5, 7))
    new = 4
    with torch.no_grad():
        cached = greedy(melt, ids, mask, new, use_cache=True)
        uncached = greedy(melt, ids, mask, new, use_cache=False)
        whole = cached.sequences
        whole_mask = torch.cat([mask, torch.ones(3, new, dtype=torch.long)], 1)
        steps = cached_decoding_logits(melt, whole, whole_mask, 9)
        decode = melt(whole, attention_mask=whole_mask, decode_from=9).logits[:, 8:]
        rechunked = melt(whole, attention_mask=whole_mask).logits[:, 8:]
    assert uncached.sequences.tolist() == cached.sequences.tolist()
    # generate hands out float32 logits; decoding's own, in float64, are compared below
    torch.testing.assert_close(torch.stack(uncached.logits, 1), torch.stack(cached.logits, 1), atol=0, rtol=0)
    torch.testing.assert_close(decode, steps, **EXACT)
    if options["chunk_size"] > 1:  # the model's own chunking of the whole row is another computation
        assert not torch.allclose(rechunked, steps, atol=1e-6)


def test_decode_from_chunk_plan():
    sizes = lambda melt, *args: melt.model._chunk_sizes(*args)  # noqa: E731
    melt = melt_model(chunk_size=4)
    assert sizes(melt, 12, 0, None, 9) == [1, 4, 4, 1, 1, 1]  # prompt as prefill (aligned to its end)
    assert sizes(melt, 1, 10, None, 9) == [1]  # a decoding step
    assert sizes(melt, 3, 10, None, 9) == [1, 1, 1]  # several answer tokens after a cache
    assert sizes(melt, 3, 0, None, 0) == [1, 1, 1]
    assert sizes(melt, 9, 0, None, 9) == sizes(melt, 9, 0, None, None) == [1, 4, 4]
    assert sizes(melt_model(chunk_size=4, chunk_sizes=[5, 4]), 11, 0, None, 9) == [5, 4, 1, 1]
    assert sizes(melt_model(chunk_size=4, prompt_chunk_size=3), 11, 0, None, 9) == [3, 3, 3, 1, 1]
    with pytest.raises(ValueError, match="at most one of chunk_size and decode_from"):
        melt(torch.ones(1, 4, dtype=torch.long), chunk_size=2, decode_from=2)
    with pytest.raises(ValueError, match="decode_from must be an integer >= 0, got -1"):
        melt(torch.ones(1, 4, dtype=torch.long), decode_from=-1)


def scoring_split(prompt_widths=(6, 6, 5, 5, 6), seq=9, seed=7):
    """Rows of prompt (left-padded to its width) + answer up to seq tokens; answers labelled."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(prompt_widths), seq), generator=gen)
    ids[0, :2] = 0
    ids[2, :1] = 0
    labels = torch.full_like(ids, -100)
    for row, width in enumerate(prompt_widths):
        labels[row, width:] = ids[row, width:]
    return EvalSplit(ids, labels, torch.ones(len(ids), dtype=torch.long), torch.tensor(prompt_widths), {})


def cached_answer_ce(melt, split) -> torch.Tensor:
    """Cross-entropies of every answer token under prefill + token-by-token cached decoding."""
    ces = []
    with torch.no_grad():
        for row in range(len(split)):
            ids, width = split.input_ids[row : row + 1], int(split.prompt_length[row])
            mask = (ids.cumsum(-1) > 0).long()  # the leading zeros are padding
            logits = cached_decoding_logits(melt, ids[:, :-1], mask[:, :-1], width)
            ces.append(token_cross_entropy(logits, ids[:, width:])[0])
    return torch.cat(ces).double()


def test_teacher_forced_scores_answers_as_decoding_and_says_so():
    melt = melt_model(chunk_size=4)
    split = scoring_split()
    contender = Contender("melt", melt, melt.config.total_ut_steps, 0)
    reference = cached_answer_ce(melt, split)
    result = evaluate(contender, split, batch_size=8, generation=False)
    assert result["scoring_chunking"] == "decode" and result["scored_tokens"] == reference.numel()
    assert result["perplexity"] == pytest.approx(reference.mean().exp().item(), rel=1e-9)
    assert "(decode) |" in markdown_table({"melt": result})
    forward = teacher_forced(contender, split, 8, 0.9, chunking="forward")  # the old scoring, on request only
    assert forward["scoring_chunking"] == "forward"
    assert forward["perplexity"] != pytest.approx(result["perplexity"], rel=1e-6)
    lm = tiny_looplm().double()
    assert teacher_forced(Contender("looplm", lm, 3, 0), split, 8, 0.9)["scoring_chunking"] == "unchunked"
    text = EvalSplit(split.input_ids, split.input_ids.clone(), None, None, {})  # no prompts: nothing decoded
    assert teacher_forced(contender, text, 8, 0.9)["scoring_chunking"] == "forward"
    with pytest.raises(ValueError, match="'decode' needs an eval split with prompt_length"):
        teacher_forced(contender, text, 8, 0.9, chunking="decode")
    with pytest.raises(ValueError, match="is not one of"):
        teacher_forced(contender, split, 8, 0.9, chunking="rechunk")


# -- item 2: early exit with a cache while alpha < 1


def prefilled(melt, ids):
    return melt(ids, use_cache=True).past_key_values


def test_exit_at_loop_step_between_full_depth_steps_at_alpha_below_one():
    """Full-depth prefill, a step with exit_at_loop=2, a full-depth step: the token that stopped at loop 2
    keeps its loop-2 keys for loops 3.., exactly as a Q-exit at loop 2 leaves it."""
    melt = melt_model(chunk_size=4, alpha=0.5, total_ut_steps=4)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        cache = prefilled(melt, ids[:, :10])
        stopped = melt(ids[:, 10:11], past_key_values=cache, use_cache=True, exit_at_loop=2)
        after = melt(ids[:, 11:12], past_key_values=cache, use_cache=True)  # crashed before the fix
        assert {layer.get_seq_length() for layer in cache.layers} == {12}
        # the same token with a Q-exit threshold between its exit CDF after loops 1 and 2
        probe = melt(ids[:, 10:11], past_key_values=prefilled(melt, ids[:, :10]), use_cache=True)
        cdf = probe.exit_probs[:, 0, 0].cumsum(0)
        q_cache = prefilled(melt, ids[:, :10])
        q_exit = melt(ids[:, 10:11], past_key_values=q_cache, use_cache=True, exit_threshold=float(cdf[:2].mean()))
        q_after = melt(ids[:, 11:12], past_key_values=q_cache, use_cache=True)
    assert q_exit.exit_loop.item() == 2
    torch.testing.assert_close(q_exit.logits, stopped.logits, **EXACT)
    torch.testing.assert_close(q_after.logits, after.logits, **EXACT)
    for a, b in zip(cache.layers, q_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, **EXACT)
        torch.testing.assert_close(a.values, b.values, **EXACT)
    for layer in range(melt.config.num_hidden_layers):
        at_exit = cache.layers[cache.loop_entry(1, layer)].keys[:, :, 10]
        for loop in (2, 3):
            torch.testing.assert_close(cache.layers[cache.loop_entry(loop, layer)].keys[:, :, 10], at_exit, **EXACT)


def test_q_exit_cached_decoding_equals_the_decode_chunked_forward_at_alpha_below_one():
    melt = melt_model(chunk_size=4, alpha=0.5)
    prompt, mask = left_padded((7, 5))
    answer = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    ids, full_mask = torch.cat([prompt, answer], 1), torch.cat([mask, torch.ones_like(answer)], 1)
    q = 0.5
    with torch.no_grad():
        out = melt(prompt, attention_mask=mask, use_cache=True, exit_threshold=q)
        logits, exits = [out.logits], [out.exit_loop]
        for i in range(7, 10):
            out = melt(
                ids[:, i : i + 1],
                attention_mask=full_mask[:, : i + 1],
                past_key_values=out.past_key_values,
                use_cache=True,
                exit_threshold=q,
            )
            logits.append(out.logits)
            exits.append(out.exit_loop)
        whole = melt(ids[:, :10], attention_mask=full_mask[:, :10], decode_from=7, exit_threshold=q)
    exits = torch.cat(exits, 1)
    real = full_mask[:, :10].bool()
    assert exits[real].min() < 3 and exits[real].max() == 3  # some tokens exit early, some run every loop
    torch.testing.assert_close(whole.exit_loop, exits)
    torch.testing.assert_close(whole.logits[real], torch.cat(logits, 1)[real], **EXACT)


def looplm_exit_with_frozen_kv(lm, ids, q):
    """Independent reference at alpha = 0: the LoopLM token by token with a Q-exit, where a token that
    exits at loop e has its keys/values of loops after e replaced by its loop-e keys/values."""
    cfg = lm.config
    T, N = cfg.total_ut_steps, cfg.num_hidden_layers
    cache = LoopLMCache(N, T)
    logits, exits = [], []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            out = lm(ids[:, i : i + 1], past_key_values=cache, use_cache=True, exit_threshold=q)
            logits.append(out.logits)
            exits.append(out.exit_loop)
            for row, e in enumerate(out.exit_loop[:, 0].tolist()):
                for layer in range(N):
                    src = cache.layers[cache.slot(e - 1, layer)]
                    for loop in range(e, T):
                        dst = cache.layers[cache.slot(loop, layer)]
                        dst.keys[row, :, i] = src.keys[row, :, i]
                        dst.values[row, :, i] = src.values[row, :, i]
    return torch.cat(logits, 1), torch.cat(exits, 1)


def test_q_exit_freezes_the_per_loop_keys_alpha_zero_is_the_looplm_with_frozen_kv():
    lm = tiny_looplm().double()
    melt = MeltForCausalLM.from_looplm(lm, chunk_size=1, alpha=0.0).eval()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    reference, ref_exits = looplm_exit_with_frozen_kv(lm, ids, q=0.5)
    with torch.no_grad():
        out = melt(ids, exit_threshold=0.5)
    assert ref_exits.min() < 3 and ref_exits.max() == 3
    torch.testing.assert_close(out.exit_loop, ref_exits)
    torch.testing.assert_close(out.logits, reference, atol=1e-10, rtol=1e-10)
