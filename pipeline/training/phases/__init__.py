"""Training phases (docs/architecture.md#3-the-trainer-and-its-phases): what model a phase trains, which parameters, and its loss.

A phase never sees the engine's type: it builds its model through the `Engine`
interface (partitioned construction / loading) and computes its loss through a
`forward` callable. The trainer drives it:

    phase = build_phase(cfg)
    model = phase.build_model(engine)                   # inside the engine's partitioning
    groups = phase.parameter_groups(model, engine)      # freezes the rest
    every step:    scalars = phase.begin_step(model, step)          # e.g. MELT's alpha
    every micro:   out = phase.micro_step(engine.forward, batch, counts)  # counts: the step's TokenCounts
    at the end:    phase.after_fit(run_dir)                         # collective

One module per phase (pretrain.py, transition.py, distill.py) over base.py (the `Phase` base
class and the helpers phases share) and melt_student.py (what transition and distill share).
The `distill` phase also builds the frozen teacher partitioned (engine.frozen_init_context +
engine.load_weights) and has the engine wrap it for inference (engine.build_frozen); it names
it in frozen_models() (the trainer records its partition); its micro_step runs teacher and
student on the same batch, returns the summed losses (each normalised by the global count of
the tokens it is taken on), logs the parts through LossOutput.metrics and reports the
teacher's forward time in MicroStepOutput.timings.
"""

from __future__ import annotations

from pipeline.training.config import ConfigError, RunConfig
from pipeline.training.phases.base import Phase
from pipeline.training.phases.distill import DistillPhase
from pipeline.training.phases.pretrain import PretrainPhase
from pipeline.training.phases.transition import TransitionPhase

PHASES: dict[str, type[Phase]] = {p.name: p for p in (PretrainPhase, TransitionPhase, DistillPhase)}


def build_phase(cfg: RunConfig) -> Phase:
    try:
        cls = PHASES[cfg.phase.name]
    except KeyError:
        raise ConfigError(f"config key 'phase.name': phase {cfg.phase.name!r} is not implemented yet") from None
    return cls(cfg)


__all__ = ["PHASES", "DistillPhase", "Phase", "PretrainPhase", "TransitionPhase", "build_phase"]
