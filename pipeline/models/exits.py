"""The early-exit distribution of a looped model, and how outputs are picked from it.

lambda_t = sigmoid(gate_t); p_t = lambda_t * prod_{s<t}(1 - lambda_s) for t < T, and
p_T takes the remaining mass (docs/melt.md, section 1.3).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def exit_probabilities(exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """exit_logits: T tensors [B, S] -> p: [T, B, S] in float32, summing to 1 over T."""
    lam = torch.sigmoid(torch.stack([g.float() for g in exit_logits]))
    survive = torch.cumprod(1.0 - lam, dim=0)  # survive[t] = prod_{s<=t} (1 - lambda_s)
    before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]], dim=0)
    p = lam * before
    return torch.cat([p[:-1], before[-1:]], dim=0)  # p_T = prod_{s<T} (1 - lambda_s)


def exit_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of the exit distribution per token: [T, B, S] -> [B, S]."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(0)


def q_exit_loop(p: torch.Tensor, q: float) -> torch.Tensor:
    """0-based index of the first loop whose exit CDF reaches q, per token: [T, B, S] -> [B, S]."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold must lie in [0, 1], got {q}")
    reached = torch.cumsum(p, dim=0) >= q
    reached[-1] = True  # the last loop always ends it, whatever the float rounding
    return reached.int().argmax(dim=0)


def validate_exit_options(
    num_loops: int, exit_at_loop: Optional[int], exit_threshold: Optional[float], expected_logits: bool
) -> None:
    chosen = sum([exit_at_loop is not None, exit_threshold is not None, bool(expected_logits)])
    if chosen > 1:
        raise ValueError("choose at most one of exit_at_loop, exit_threshold and expected_logits")
    if exit_at_loop is not None and not 1 <= exit_at_loop <= num_loops:
        raise ValueError(f"exit_at_loop must be in 1..{num_loops} (1-based), got {exit_at_loop}")
    if exit_threshold is not None and not 0.0 <= exit_threshold <= 1.0:
        raise ValueError(f"exit_threshold must lie in [0, 1], got {exit_threshold}")


def select_by_loop(per_loop: torch.Tensor, loop_index: torch.Tensor) -> torch.Tensor:
    """per_loop: [T, B, S, ...], loop_index: [B, S] -> [B, S, ...] taken from each token's loop."""
    idx = loop_index.to(per_loop.device).long()
    idx = idx.view(1, *idx.shape, *([1] * (per_loop.dim() - 3))).expand(1, *per_loop.shape[1:])
    return per_loop.gather(0, idx).squeeze(0)
