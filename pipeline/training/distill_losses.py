"""Distillation losses (phase 2): attention alignment and logit distillation.

Like every loss in pipeline.training.losses they return a sum over valid tokens divided by
a normaliser (the global count of the tokens they are taken on, from the trainer), and per-token
means for logging. Which tokens is the caller's choice (`positions`, [B, S] bool): the distill phase
aligns attention on every real token by default (their slots feed every later token, labelled or
not) and distils the logits on the labelled ones (`phase.align_tokens`, `phase.kd_tokens`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.training.losses import LossOutput, _normaliser

KD_KINDS = ("forward", "reverse", "jsd")


def attention_alignment_loss(
    student: Sequence[Sequence[torch.Tensor]],
    teacher: Sequence[Sequence[torch.Tensor]],
    positions: torch.Tensor,
    num_heads: int,
    normalizer=None,
    eps: float = 1e-6,
) -> LossOutput:
    """Per (loop, layer) and head: ||s - t||^2 / ||t||^2 per token (attention outputs before o_proj),
    averaged over heads, loops and layers; summed over `positions` / normaliser.

    student/teacher: [loop][layer] -> [B, S, heads * head_dim]. Also returns per-layer errors.
    """
    valid = positions
    mask = valid.float()
    count = valid.sum()
    per_token = torch.zeros_like(mask)
    metrics: dict[str, torch.Tensor] = {}
    loops, layers = len(teacher), len(teacher[0])
    for t in range(loops):
        for layer in range(layers):
            s = student[t][layer].float().unflatten(-1, (num_heads, -1))
            g = teacher[t][layer].detach().float().unflatten(-1, (num_heads, -1))
            err = ((s - g).pow(2).sum(-1) / (g.pow(2).sum(-1) + eps)).mean(-1)  # [B, S]
            per_token = per_token + err / (loops * layers)
            key = f"align/layer{layer}"
            metrics[key] = metrics.get(key, 0.0) + ((err * mask).sum() / count.clamp_min(1)).detach() / loops
    norm = _normaliser(valid, normalizer)
    metrics["align"] = ((per_token * mask).sum() / count.clamp_min(1)).detach()
    return LossOutput((per_token * mask).sum() / norm, count, metrics)


def _kd_per_token(student_logits, teacher_logits, temperature: float, kind: str, top_k: Optional[int]):
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    if top_k:
        # restrict both distributions to the teacher's top-k tokens (renormalised there)
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "forward":  # KL(teacher || student)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse":  # KL(student || teacher)
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), 0) - torch.log(torch.tensor(2.0))
        kl = 0.5 * ((log_t.exp() * (log_t - log_m)).sum(-1) + (log_s.exp() * (log_s - log_m)).sum(-1))
    else:
        raise ValueError(f"unknown KD kind {kind!r}; choose from {KD_KINDS}")
    return kl * temperature**2


def logit_distillation_loss(
    student_loop_logits: Sequence[torch.Tensor],
    teacher_loop_logits: Sequence[torch.Tensor],
    positions: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "forward",
    top_k: Optional[int] = None,
    all_loops: bool = False,
    normalizer=None,
    loop_numbers: Optional[Sequence[int]] = None,
) -> LossOutput:
    """KL between teacher and student next-token distributions on `positions`, on the last loop
    (or averaged over every loop with all_loops). Per-loop values are logged either way.
    loop_numbers: the loop of each entry, for the metric names (default 1..T; e.g. [T] when only
    the last loop's logits were computed)."""
    valid = positions
    mask = valid.float()
    count = valid.sum()
    loops = range(len(teacher_loop_logits)) if all_loops else [len(teacher_loop_logits) - 1]
    per_token = torch.zeros_like(mask)
    metrics = {}
    for t in range(len(teacher_loop_logits)):
        use = t in loops
        with torch.set_grad_enabled(use and torch.is_grad_enabled()):
            kl = _kd_per_token(student_loop_logits[t], teacher_loop_logits[t], temperature, kind, top_k)
        metrics[f"kl_loop{loop_numbers[t] if loop_numbers else t + 1}"] = (
            (kl * mask).sum() / count.clamp_min(1)
        ).detach()
        if use:
            per_token = per_token + kl / len(loops)
    norm = _normaliser(valid, normalizer)
    metrics["kl"] = ((per_token * mask).sum() / count.clamp_min(1)).detach()
    return LossOutput((per_token * mask).sum() / norm, count, metrics)
