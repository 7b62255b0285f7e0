"""Step-indexed schedules: the learning-rate multiplier and MELT's interpolation alpha."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of every group's base lr for optimizer step `step` (0-based: the update made at step+1).

    Linear warmup from 1/warmup to 1 over `warmup_steps`, then cosine / linear decay to
    `min_ratio` at `total_steps`, or constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps - 1)  # the last step uses the minimum
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def ramp(step: int, total_steps: int, start: float, end: float, fraction: float, shape: str = "linear") -> float:
    """A value going from `start` (step 0) to `end` over the first `fraction` of `total_steps`, then flat."""
    length = fraction * total_steps
    progress = 1.0 if length <= 0 else min(1.0, max(0.0, step / length))
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif shape != "linear":
        raise ValueError(f"unknown ramp shape {shape!r}")
    return start + (end - start) * progress
