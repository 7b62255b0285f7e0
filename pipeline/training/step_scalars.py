"""The scalars logged for one optimizer step, from what the trainer measured and reduced."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.training.engines.base import StepResult


@dataclass
class StepOutcome:
    """What one optimizer step produced, as the trainer saw it."""

    step: int  # the step's number (1-based)
    phase_scalars: dict[str, float]  # the phase's own scalars for the step (begin_step), e.g. alpha
    learning_rates: dict[str, float]  # per parameter group, those the step's update used
    result: StepResult
    samples_per_step: int  # the global batch
    seq_len: int
    elapsed_s: float  # the whole step
    compute_s: float  # every micro-step's micro_step + backward
    side_s: dict[str, float]  # the phase's work besides the trained model's (e.g. "teacher"), by name


def step_scalars(outcome: StepOutcome, losses: dict[str, float], memory: dict[str, float]) -> dict[str, float]:
    """train/* (the phase's scalars, then `losses`: StepMetrics.reduce()), lr/*, perf/*, then memory/*
    (`memory`: Engine.memory_stats())."""
    o = outcome
    tokens_per_step = o.samples_per_step * o.seq_len
    scalars = {f"train/{k}": v for k, v in o.phase_scalars.items()}
    scalars.update(losses)
    scalars.update({f"lr/{k}": v for k, v in o.learning_rates.items()})
    scalars.update(
        {
            "train/grad_norm": o.result.grad_norm,
            "train/step_applied": float(o.result.applied),
            "train/samples_seen": float(o.step * o.samples_per_step),
            "perf/tokens_per_s": tokens_per_step / o.elapsed_s,
            "perf/step_time_s": o.elapsed_s,
        }
    )
    if o.side_s:  # the trained model's forward + backward, apart from the phase's other work
        student_s = max(o.compute_s - sum(o.side_s.values()), 1e-9)
        scalars.update(
            {"perf/student_tokens_per_s": tokens_per_step / student_s, "perf/student_forward_backward_s": student_s}
        )
        for name, seconds in o.side_s.items():
            scalars.update(
                {f"perf/{name}_tokens_per_s": tokens_per_step / max(seconds, 1e-9), f"perf/{name}_forward_s": seconds}
            )
    scalars.update({f"memory/{k}": v for k, v in memory.items()})
    return scalars
