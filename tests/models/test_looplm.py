"""The Ouro-compatible LoopLM: conformance with the original code's outputs, caching,
padding, loading and saving, exit options, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pipeline.models import LoopLMCache, LoopLMConfig, LoopLMForCausalLM
from tests.model_helpers import FIXTURE, tiny_looplm

from .model_reference import reference_loop_states


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE / "reference_outputs.npz")


@pytest.fixture(scope="module")
def ouro():
    return LoopLMForCausalLM.from_pretrained(FIXTURE).eval()


def test_reproduces_original_ouro_outputs(ouro, reference):
    with torch.no_grad():
        out = ouro(torch.tensor(reference["input_ids"]), output_loop_logits=True)
    np.testing.assert_allclose(torch.stack(out.loop_logits).numpy(), reference["loop_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch.stack(out.exit_logits).numpy(), reference["gate_logits"], atol=1e-5, rtol=0)
    assert torch.equal(out.logits, out.loop_logits[-1])


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_match_original(ouro, reference, use_cache):
    prompt = torch.tensor(reference["greedy_prompt"])
    tokens = ouro.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=use_cache)
    assert tokens.tolist() == reference["greedy_tokens"].tolist()


def test_loads_through_auto_class_without_remote_code(reference):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    assert isinstance(model, LoopLMForCausalLM)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # GQA, 3 loops
        dict(num_key_value_heads=1, total_ut_steps=2, num_hidden_layers=3),
        dict(total_ut_steps=1, num_key_value_heads=4),  # a standard transformer
        dict(head_dim=12, hidden_size=40, num_attention_heads=4, num_key_value_heads=2),
    ],
)
def test_matches_independent_reference(overrides):
    model = tiny_looplm(**overrides)
    ids = torch.randint(0, 97, (11,))
    with torch.no_grad():
        out = model(ids[None], output_loop_logits=True, use_cache=False)
    sd = model.state_dict()
    states = reference_loop_states(sd, model.config, ids)
    assert len(out.loop_logits) == model.config.total_ut_steps
    for t, h in enumerate(states):
        torch.testing.assert_close(out.loop_logits[t][0], h @ sd["lm_head.weight"].T, atol=1e-5, rtol=1e-5)
        gate = h @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"]
        torch.testing.assert_close(out.exit_logits[t][0], gate[:, 0], atol=1e-5, rtol=1e-5)


def test_single_loop_is_a_standard_transformer():
    model = tiny_looplm(total_ut_steps=1)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        out = model(ids, output_loop_logits=True, use_cache=True)
    assert len(out.loop_logits) == 1 and len(out.past_key_values.layers) == model.config.num_hidden_layers
    # what a standard decoder cache holds: layers x 2 x kv_heads x seq x head_dim floats
    cfg = model.config
    assert out.past_key_values.nbytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 9 * cfg.head_dim * 4


def test_cache_holds_every_loop_and_layer():
    model = tiny_looplm(total_ut_steps=3)
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 5)), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, LoopLMCache) and len(cache.layers) == 3 * 2
    cfg = model.config
    assert cache.nbytes == 3 * 2 * 2 * 2 * cfg.num_key_value_heads * 5 * cfg.head_dim * 4
    # loops really keep separate keys: loop 0 and loop 1 of layer 0 differ
    assert not torch.allclose(cache.layers[cache.slot(0, 0)].keys, cache.layers[cache.slot(1, 0)].keys)


def test_cached_decoding_equals_uncached_forward():
    model = tiny_looplm()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False, output_loop_logits=True)
        out = model(ids[:, :5], use_cache=True, output_loop_logits=True)
        steps = [out]
        cache = out.past_key_values
        for i in range(5, 12):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True, output_loop_logits=True)
            steps.append(out)
        two = model(ids[:, :9], use_cache=True)  # multi-token continuation on a cache
        rest = model(ids[:, 9:], past_key_values=two.past_key_values, use_cache=True)
    stepped = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(stepped, full.logits, atol=1e-5, rtol=1e-5)
    for t in range(3):
        torch.testing.assert_close(
            torch.cat([s.loop_logits[t] for s in steps], 1), full.loop_logits[t], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(rest.logits, full.logits[:, 9:], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_decodes_as_each_sequence_alone():
    model = tiny_looplm()
    model.generation_config.pad_token_id = 0
    prompts = [torch.randint(3, 97, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
        assert batch[i, width:].tolist() == alone[0, len(p) :].tolist()
        with torch.no_grad():
            alone_logits = model(p[None]).logits[0]
        torch.testing.assert_close(padded_logits[i, width - len(p) :], alone_logits, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_uses_the_distribution():
    model = tiny_looplm()
    prompt = torch.randint(0, 97, (1, 4))
    torch.manual_seed(3)
    a = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(3)
    b = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist() and a.shape == (1, 16)
    many = {tuple(model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=0)[0].tolist()) for _ in range(5)}
    assert len(many) > 1 or tuple(greedy[0, :10].tolist()) not in many


def test_save_load_round_trip_keeps_ouro_names_and_keys(tmp_path, ouro):
    ouro.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURE / "config.json").read_text())
    assert config["model_type"] == "ouro"
    assert set(original) - {"transformers_version", "architectures", "dtype"} <= set(config)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(FIXTURE / "model.safetensors"))
    again = LoopLMForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(ouro.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_and_sharded_checkpoints_load(tmp_path, ouro, reference):
    ouro.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    sharded = LoopLMForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.tensor(reference["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids).logits, ouro(ids).logits, atol=0, rtol=0)
    LoopLMForCausalLM.from_pretrained(FIXTURE).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = LoopLMForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = bf16(ids).logits.float()
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == torch.tensor(reference["loop_logits"][-1]).argmax(-1)).float().mean() > 0.8


def test_config_overrides_at_load(ouro):
    model = LoopLMForCausalLM.from_pretrained(FIXTURE, total_ut_steps=2)
    assert model.config.total_ut_steps == 2
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7]]), output_loop_logits=True)
        full = ouro(torch.tensor([[5, 6, 7]]), output_loop_logits=True)
    assert len(out.loop_logits) == 2
    torch.testing.assert_close(out.loop_logits[1], full.loop_logits[1])


def _copy_fixture(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def test_wrong_tensor_shape_is_named(tmp_path):
    ckpt = _copy_fixture(tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 48)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as err:
        LoopLMForCausalLM.from_pretrained(ckpt)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "100" in msg and "128" in msg


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    ckpt = _copy_fixture(tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"missing tensors: \['model.norm.weight'\].*unexpected tensors: "
        r"\['model.extra.weight'\]",
    ):
        LoopLMForCausalLM.from_pretrained(ckpt)


def test_unknown_model_type_is_refused(tmp_path):
    ckpt = _copy_fixture(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'ouro'.*'llama'"):
        LoopLMForCausalLM.from_pretrained(ckpt)


def test_sequence_longer_than_max_positions_is_refused():
    model = tiny_looplm(max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    out = model(torch.zeros(1, 10, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=r"past 10 \+ new 7"):
        model(torch.zeros(1, 7, dtype=torch.long), past_key_values=out.past_key_values)


def test_unsupported_architecture_options_are_refused():
    with pytest.raises(ValueError, match="rope_scaling"):
        LoopLMConfig(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LoopLMConfig(num_attention_heads=4, num_key_value_heads=3)
