"""Phases on one process: the transition at alpha = 0 is the LoopLM, parameter groups and freezing."""

import contextlib
from pathlib import Path

import pytest
import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM
from pipeline.training.config import ConfigError, load_run_config
from pipeline.training.initialization import initialize
from pipeline.training.losses import TokenCounts
from pipeline.training.phases import build_phase
from pipeline.training.phases.pretrain import PretrainPhase

REPO = Path(__file__).resolve().parents[2]


class LocalEngine:
    """What a phase asks of an engine to build its model, for one process without partitioning."""

    def init_context(self):
        return contextlib.nullcontext()

    def init_weights(self, root, init_fn, prefix=""):
        initialize(root, init_fn, seed=0, prefix=prefix)

    def full_shape(self, param):
        return tuple(param.shape)

    def load_weights(self, model, tensors):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in tensors:
                    param.copy_(tensors(name))


@pytest.fixture(scope="module")
def looplm_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LoopLMForCausalLM(
        LoopLMConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            total_ut_steps=3,
            max_position_embeddings=64,
            rope_theta=10000.0,
        )
    )
    with torch.no_grad():  # make every loop and the exit distribution matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "early_exit_gate" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("looplm")
    model.save_pretrained(path)
    return path


def transition_cfg(looplm_dir, *overrides):
    return load_run_config(
        REPO / "configs/smoke/transition.yaml",
        [f"model.init_from={looplm_dir}", "data.path=/unused", "run_dir=/unused", *overrides],
    )


def batch(seed=1, size=(3, 24)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, size, generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # masked prompt
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("kind", ["last_loop_ce", "ouro_stage1"])
def test_transition_at_alpha_zero_gives_the_looplm_loss(looplm_dir, kind):
    cfg = transition_cfg(
        looplm_dir, "phase.alpha.start=0", "phase.alpha.end=0", "phase.chunk_size=5", f"phase.loss.kind={kind}"
    )
    phase = build_phase(cfg)
    melt = phase.build_model(LocalEngine())
    assert phase.begin_step(melt, 7) == {"alpha": 0.0} and melt.config.alpha == 0.0
    looplm = LoopLMForCausalLM.from_pretrained(looplm_dir)
    reference = PretrainPhase.__new__(PretrainPhase)
    reference.cfg = cfg  # the same loss settings, on the LoopLM
    b = batch()
    normalizer = TokenCounts(57.0, 69.0)
    got = phase.micro_step(melt, b, normalizer)
    want = reference.micro_step(looplm, b, normalizer)
    torch.testing.assert_close(got.losses.total, want.losses.total, rtol=1e-5, atol=1e-6)
    assert int(got.losses.num_tokens) == int(want.losses.num_tokens) == 3 * 23 - 4
    for name, value in want.losses.metrics.items():
        torch.testing.assert_close(got.losses.metrics[name], value, rtol=1e-5, atol=1e-6)
    # gate statistics are reported per layer; the gates start near sigmoid(gate_init_bias)
    assert set(got.stats) == {f"gates/layer{i}/{s}" for i in range(2) for s in ("mean", "min", "max")}
    assert got.stats["gates/layer0/mean"][1] == "mean" and got.stats["gates/layer1/max"][1] == "max"
    bias = torch.sigmoid(torch.tensor(melt.config.gate_init_bias)).item()
    assert got.stats["gates/layer0/mean"][0] == pytest.approx(bias, rel=1e-4)
    # and at alpha = 1 it is a different model
    phase.cfg = transition_cfg(looplm_dir, "phase.alpha.start=1", f"phase.loss.kind={kind}")
    phase.begin_step(melt, 0)
    assert not torch.allclose(phase.micro_step(melt, b, normalizer).losses.total, want.losses.total)


def test_transition_alpha_ramp_follows_the_config(looplm_dir):
    phase = build_phase(transition_cfg(looplm_dir, "schedule.total_steps=10", "phase.alpha.ramp_fraction=0.4"))
    model = phase.build_model(LocalEngine())
    alphas = [phase.begin_step(model, s)["alpha"] for s in range(10)]
    assert alphas[:4] == [0.25, 0.5, 0.75, 1.0] and set(alphas[3:]) == {1.0}  # reached after 0.4 x 10 steps
    assert model.config.alpha == 1.0


@pytest.mark.parametrize(
    "trainable, roles",
    [("all", {"gates", "attention", "other"}), ("gates", {"gates"}), ("gates+attention", {"gates", "attention"})],
)
def test_transition_parameter_groups(looplm_dir, trainable, roles):
    cfg = transition_cfg(
        looplm_dir, f"phase.trainable={trainable}", "optimizer.weight_decay=0.1", "optimizer.groups.attention.lr=5e-4"
    )
    phase = build_phase(cfg)
    model = phase.build_model(LocalEngine())
    groups = phase.parameter_groups(model)
    assert {g.name for g in groups} == roles
    by_name = {g.name: g for g in groups}
    assert by_name["gates"].lr == 1e-2 and by_name["gates"].weight_decay == 0.1
    if "attention" in by_name:
        assert by_name["attention"].lr == 5e-4
    trainable_ids = {id(p) for g in groups for p in g.params + g.no_decay}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trainable_ids) == (phase.role(name) in roles), name
    # matrices decay, vectors (biases, norms) do not
    assert all(p.dim() >= 2 for g in groups for p in g.params)
    assert all(p.dim() == 1 for g in groups for p in g.no_decay)
    # LoopLM weights were loaded, gates initialised as MELT does (weight 0)
    looplm = LoopLMForCausalLM.from_pretrained(looplm_dir)
    torch.testing.assert_close(
        model.model.layers[1].self_attn.q_proj.weight, looplm.model.layers[1].self_attn.q_proj.weight, rtol=0, atol=0
    )
    assert float(model.model.layers[0].kv_gate.proj.weight.detach().abs().max()) == 0.0


def test_transition_refuses_a_checkpoint_that_does_not_fit(looplm_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(looplm_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.extra"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    phase = build_phase(transition_cfg(bad))
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]; unexpected tensors"):
        phase.build_model(LocalEngine())


def test_phases_pass_the_batch_attention_mask(looplm_dir):
    """Left-padded rows (synthetic tasks): the phase runs the model with the batch's attention mask,
    so training sees padding exactly as evaluation does."""
    cfg = transition_cfg(looplm_dir, "phase.alpha.start=0", "phase.alpha.end=0")
    looplm = LoopLMForCausalLM.from_pretrained(looplm_dir)
    reference = PretrainPhase.__new__(PretrainPhase)
    reference.cfg = cfg
    b = batch()
    b["input_ids"][:, :4] = 0
    b["labels"][:, :5] = -100  # nothing is predicted from the padding
    b["attention_mask"] = (torch.arange(24) >= 4).long().expand(3, 24)
    with torch.no_grad():
        masked = reference.micro_step(looplm, b, TokenCounts(10.0, 10.0)).losses.total
        unmasked = reference.micro_step(
            looplm, {k: v for k, v in b.items() if k != "attention_mask"}, TokenCounts(10.0, 10.0)
        ).losses.total
        alone = reference.micro_step(
            looplm, {"input_ids": b["input_ids"][:, 4:], "labels": b["labels"][:, 4:]}, TokenCounts(10.0, 10.0)
        ).losses.total
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-6)  # the padded rows score as if unpadded
    assert not torch.allclose(masked, unmasked)


def test_transition_with_last_loop_logits_only(looplm_dir):
    """loss.per_loop_metrics false: the same last-loop CE without computing the other loops' logits;
    the Ouro stage-I loss needs every loop, so that combination is refused."""
    losses = {}
    for per_loop in (True, False):
        cfg = transition_cfg(looplm_dir, "phase.alpha.start=0.5", f"phase.loss.per_loop_metrics={per_loop}")
        phase = build_phase(cfg)
        melt = phase.build_model(LocalEngine())
        phase.begin_step(melt, 0)
        losses[per_loop] = phase.micro_step(melt, batch(), TokenCounts(50.0, 50.0)).losses
    torch.testing.assert_close(losses[False].total, losses[True].total, rtol=1e-6, atol=1e-7)
    assert "ce_loop1" in losses[True].metrics and not losses[False].metrics.keys() & {"ce_loop1", "ce_loop2"}
    with pytest.raises(ConfigError, match="per_loop_metrics: false needs kind last_loop_ce"):
        transition_cfg(looplm_dir, "phase.loss.kind=ouro_stage1", "phase.loss.per_loop_metrics=false")
