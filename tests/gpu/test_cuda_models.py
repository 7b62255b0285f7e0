"""The models on a CUDA GPU in bfloat16 (skipped without one; run by scripts/gpu_check.sh)."""

import pytest
import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def looplm(dtype, loops=4):
    torch.manual_seed(0)
    cfg = LoopLMConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        total_ut_steps=loops,
        max_position_embeddings=4096,
    )
    return LoopLMForCausalLM(cfg).to("cuda", dtype).eval()


def test_bf16_melt_alpha0_tracks_the_looplm_on_gpu():
    lm = looplm(torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    with torch.no_grad():
        ref = lm(ids, use_cache=False).logits.float()
        for chunk in (1, 64, 256):
            melt = MeltForCausalLM.from_looplm(lm, chunk_size=chunk, alpha=0.0).eval()
            out = melt(ids).logits.float()
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97
            assert (out - ref).abs().max() < 0.25


def test_bf16_generation_and_cache_sizes_on_gpu():
    lm = looplm(torch.bfloat16)
    melt = MeltForCausalLM.from_looplm(lm, chunk_size=64).eval()
    prompt = torch.randint(3, 4096, (4, 300), device="cuda")
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    a = lm.generate(prompt, **kw)
    b = melt.generate(prompt, **kw)
    assert a.sequences.shape == b.sequences.shape == (4, 332)
    assert a.past_key_values.nbytes == 4 * b.past_key_values.nbytes


def test_bf16_training_step_on_gpu():
    lm = looplm(torch.float32, loops=2)
    melt = MeltForCausalLM.from_looplm(lm, chunk_size=32, alpha=0.5).train()
    melt.gradient_checkpointing_enable()
    ids = torch.randint(0, 4096, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = melt(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and melt.model.layers[0].kv_gate.proj.weight.grad.abs().sum() > 0
