"""Training losses. Each returns a sum and the count it is normalised by, so that the
trainer can normalise by the global number of valid tokens (across data-parallel
ranks and gradient accumulation), never by a per-micro-batch mean (docs/architecture.md#34-loss-normalisation-and-parameter-groups)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.models.exits import exit_entropy, exit_probabilities

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    total: torch.Tensor  # what to backpropagate (already divided by the normaliser)
    num_tokens: torch.Tensor  # valid tokens in this micro-batch (local count)
    metrics: dict = field(default_factory=dict)  # detached scalars for logging (per-token means)
    # the local token count a metric is a mean over, where it is not num_tokens (a distillation part
    # taken on other tokens): the step's logged mean weights each micro-batch by it
    metric_tokens: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenCounts:
    """What a step's losses are divided by: token counts summed over its micro-batches and every
    data-parallel rank (the trainer's all-reduce), so the split never changes the gradient."""

    labelled: float  # positions with a next-token label: CE (and, by default, distillation's KL)
    real: float  # real (not padding) positions: distillation's attention alignment by default

    @classmethod
    def of(cls, batch: dict) -> "TokenCounts":
        """This micro-batch's own counts (before the sums)."""
        return cls(
            float(labelled_positions(batch["labels"]).sum()),
            float(real_positions(batch).sum()),
        )


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: position i has a next-token label (labels[i + 1] is not IGNORE_INDEX)."""
    return shift_labels(labels) != IGNORE_INDEX


def real_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, S] bool: real tokens, not padding. Left-padded rows (synthetic tasks) say it with their
    attention mask; right-padded ones (chat, segment id 0 on padding) with their segment ids, since
    no real token attends to what follows it and the models need no mask there; every token of an
    unpadded batch is real."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    if batch.get("segment_ids") is not None:
        return batch["segment_ids"] != 0
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: labels align with input_ids; position i predicts labels[i + 1]."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE in float32, 0 where targets == IGNORE_INDEX: [B, S, V], [B, S] -> [B, S]."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)


def _normaliser(valid: torch.Tensor, normalizer: Optional[torch.Tensor | float]) -> torch.Tensor:
    if normalizer is None:
        return valid.sum().clamp_min(1).float()
    return torch.as_tensor(normalizer, dtype=torch.float32, device=valid.device)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: Optional[torch.Tensor | float] = None
) -> LossOutput:
    targets = shift_labels(labels)
    valid = targets != IGNORE_INDEX
    ce = token_cross_entropy(logits, targets)
    norm = _normaliser(valid, normalizer)
    count = valid.sum()
    return LossOutput(ce.sum() / norm, count, {"ce": (ce.sum() / count.clamp_min(1)).detach()})


def ouro_stage1_loss(
    loop_logits: Sequence[torch.Tensor],
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    beta: float = 0.1,
    normalizer: Optional[torch.Tensor | float] = None,
) -> LossOutput:
    """Ouro stage I: sum_t p_t * CE_t - beta * H(p), per valid token.

    loop_logits: T tensors [B, S, V]; exit_logits: T tensors [B, S]; labels [B, S] (-100 masked).
    """
    targets = shift_labels(labels)
    valid = targets != IGNORE_INDEX
    probs = exit_probabilities(exit_logits)  # [T, B, S]
    ce = torch.stack([token_cross_entropy(lg, targets) for lg in loop_logits])  # [T, B, S]
    entropy = exit_entropy(probs)  # [B, S]
    per_token = (probs * ce).sum(0) - beta * entropy
    mask = valid.float()
    norm = _normaliser(valid, normalizer)
    count = valid.sum()
    mean = lambda x: (x * mask).sum() / count.clamp_min(1)  # noqa: E731  (logging only)
    metrics = {"expected_ce": mean((probs * ce).sum(0)).detach(), "exit_entropy": mean(entropy).detach()}
    for t in range(ce.shape[0]):
        metrics[f"ce_loop{t + 1}"] = mean(ce[t]).detach()
        metrics[f"exit_prob_loop{t + 1}"] = mean(probs[t]).detach()
    return LossOutput((per_token * mask).sum() / norm, count, metrics)


def ouro_stage2_gate_loss(
    loop_logits: Sequence[torch.Tensor],
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    slope: float = 50.0,
    threshold: float = 0.005,
    normalizer: Optional[torch.Tensor | float] = None,
) -> LossOutput:
    """Ouro stage II (adaptive exit): train the gate to continue while a loop still helps.

    With detached per-loop CE L_t, improvement I_t = max(0, L_{t-1} - L_t) and ideal
    continuation w_t = sigmoid(slope * (I_t - threshold)); BCE between the gate's
    continuation probability 1 - lambda_{t-1} and w_t, averaged over loops 2..T. Only
    the exit gate should be trainable in this stage.
    """
    if len(loop_logits) < 2:
        raise ValueError("the stage-II gate loss needs at least 2 loops")
    targets = shift_labels(labels)
    valid = targets != IGNORE_INDEX
    with torch.no_grad():
        ce = torch.stack([token_cross_entropy(lg, targets) for lg in loop_logits])
        improvement = (ce[:-1] - ce[1:]).clamp_min(0)  # [T-1, B, S]
        cont_target = torch.sigmoid(slope * (improvement - threshold))
    gate = torch.stack([g.float() for g in exit_logits[:-1]])  # decide at loop t whether to go on to t+1
    # continuation probability is 1 - sigmoid(gate) = sigmoid(-gate)
    bce = F.binary_cross_entropy_with_logits(-gate, cont_target, reduction="none").mean(0)
    mask = valid.float()
    norm = _normaliser(valid, normalizer)
    count = valid.sum()
    return LossOutput(
        (bce * mask).sum() / norm, count, {"gate_bce": ((bce * mask).sum() / count.clamp_min(1)).detach()}
    )


def last_loop_lm_loss(
    loop_logits: Sequence[torch.Tensor],
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    beta: float = 0.1,
    normalizer: Optional[torch.Tensor | float] = None,
) -> LossOutput:
    """Next-token CE of the last loop (the full-depth output), with the stage-I metrics (per-loop
    CE, exit distribution and its entropy) computed without gradients for logging."""
    out = causal_lm_loss(loop_logits[-1], labels, normalizer)
    with torch.no_grad():
        metrics = ouro_stage1_loss(
            [lg.detach() for lg in loop_logits], [g.detach() for g in exit_logits], labels, beta=beta
        ).metrics
    out.metrics.update(metrics)
    return out
