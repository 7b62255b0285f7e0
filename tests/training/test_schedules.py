"""Learning-rate multiplier (warmup + cosine to a minimum) and MELT's alpha ramp."""

import math

import pytest

from pipeline.training.schedules import lr_multiplier, ramp


def test_warmup_then_cosine_to_the_minimum_at_the_last_step():
    total, warmup, floor = 12, 2, 0.1
    lrs = [lr_multiplier(s, total, warmup, "cosine", floor) for s in range(total)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(floor)
    mid = 2 + (total - warmup - 1) / 2
    assert lr_multiplier(int(mid), total, warmup, "cosine", 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 2) / 9))
    )


def test_linear_and_constant_decay():
    assert [lr_multiplier(s, 5, 0, "linear", 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert {lr_multiplier(s, 5, 1, "constant") for s in range(1, 5)} == {1.0}
    with pytest.raises(ValueError):
        lr_multiplier(3, 5, 0, "step")


def test_alpha_ramp_linear_cosine_and_flat_after():
    values = [ramp(s, 10, 0.0, 1.0, 0.5, "linear") for s in range(10)]
    assert values[:6] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and set(values[5:]) == {1.0}
    cos = [ramp(s, 10, 0.0, 1.0, 0.5, "cosine") for s in range(6)]
    assert cos[0] == 0.0 and cos[5] == 1.0 and cos[1] < values[1] and cos[4] > values[4]
    assert ramp(3, 10, 0.0, 0.0, 0.5) == 0.0  # fixed alpha
    assert ramp(0, 10, 0.2, 1.0, 0.0) == 1.0  # no ramp: at the end value at once
    with pytest.raises(ValueError):
        ramp(1, 10, 0, 1, 0.5, "step")
