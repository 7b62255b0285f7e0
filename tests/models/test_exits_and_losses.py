"""Exit distribution, exit options at inference, and Ouro's stage-I / stage-II losses."""

import math

import pytest
import torch

from pipeline.models import exit_probabilities, q_exit_loop
from pipeline.training.losses import causal_lm_loss, ouro_stage1_loss, ouro_stage2_gate_loss
from tests.model_helpers import tiny_looplm


def test_exit_distribution_by_hand():
    gates = [torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]]), torch.tensor([[5.0]])]  # lambda .5, .75, -
    p = exit_probabilities(gates)[:, 0, 0]
    torch.testing.assert_close(p, torch.tensor([0.5, 0.375, 0.125]))
    assert q_exit_loop(p[:, None, None], 0.5).item() == 0
    assert q_exit_loop(p[:, None, None], 0.8).item() == 1
    assert q_exit_loop(p[:, None, None], 1.0).item() == 2


def test_exit_options_pick_the_right_loop():
    model = tiny_looplm(total_ut_steps=3)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        full = model(ids, output_loop_logits=True)
        at2 = model(ids, exit_at_loop=2)
        q = model(ids, exit_threshold=0.6)
        expected = model(ids, expected_logits=True)
    torch.testing.assert_close(at2.logits, full.loop_logits[1])
    probs = exit_probabilities(full.exit_logits)
    first = (probs.cumsum(0) >= 0.6).int().argmax(0)
    for b in range(2):
        for s in range(7):
            torch.testing.assert_close(q.logits[b, s], full.loop_logits[first[b, s]][b, s])
    assert torch.equal(q.exit_loop, first + 1)
    manual = sum(probs[t].unsqueeze(-1) * full.loop_logits[t] for t in range(3))
    torch.testing.assert_close(expected.logits, manual)
    with pytest.raises(ValueError, match="exit_at_loop must be in 1..3"):
        model(ids, exit_at_loop=4)
    with pytest.raises(ValueError, match="at most one"):
        model(ids, exit_at_loop=1, expected_logits=True)


def test_stage1_loss_by_hand_with_masking():
    torch.manual_seed(0)
    T, B, S, V = 3, 2, 5, 7
    loop_logits = [torch.randn(B, S, V) for _ in range(T)]
    exit_logits = [torch.randn(B, S) for _ in range(T)]
    labels = torch.randint(0, V, (B, S))
    labels[0, 2] = -100
    beta = 0.05
    out = ouro_stage1_loss(loop_logits, exit_logits, labels, beta=beta)
    p = exit_probabilities(exit_logits)
    total, count = 0.0, 0
    for b in range(B):
        for s in range(S - 1):
            y = labels[b, s + 1].item()
            if y == -100:
                continue
            ce = [-torch.log_softmax(loop_logits[t][b, s], -1)[y] for t in range(T)]
            ent = -sum(p[t, b, s] * torch.log(p[t, b, s]) for t in range(T))
            total += sum(p[t, b, s] * ce[t] for t in range(T)) - beta * ent
            count += 1
    assert out.num_tokens.item() == count == 2 * (S - 1) - 1
    torch.testing.assert_close(out.total, total / count)
    # a global normaliser divides the same sum
    torch.testing.assert_close(
        ouro_stage1_loss(loop_logits, exit_logits, labels, beta, normalizer=4.0).total, total / 4.0
    )


def test_stage1_loss_trains_the_model_and_the_gate():
    model = tiny_looplm(total_ut_steps=2).train()
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, output_loop_logits=True, use_cache=False)
    ouro_stage1_loss(out.loop_logits, out.exit_logits, ids, beta=0.1).total.backward()
    assert model.model.early_exit_gate.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_stage2_gate_loss_targets():
    # loop 2 improves CE a lot -> the gate after loop 1 should say "continue" (target ~1)
    V = 5
    labels = torch.tensor([[0, 3]])
    bad = torch.zeros(1, 2, V)
    good = torch.zeros(1, 2, V)
    good[0, 0, 3] = 10.0
    gate = torch.zeros(1, 2, requires_grad=True)
    out = ouro_stage2_gate_loss([bad, good], [gate, torch.zeros(1, 2)], labels)
    out.total.backward()
    assert gate.grad[0, 0] > 0  # lowering the exit logit (continuing) lowers the loss
    # no improvement -> target ~0 -> gradient pushes towards exiting
    gate2 = torch.zeros(1, 2, requires_grad=True)
    ouro_stage2_gate_loss([good, good], [gate2, torch.zeros(1, 2)], labels).total.backward()
    assert gate2.grad[0, 0] < 0
    with pytest.raises(ValueError, match="at least 2 loops"):
        ouro_stage2_gate_loss([good], [gate], labels)


def test_forward_labels_give_plain_next_token_ce():
    model = tiny_looplm()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids).total)
