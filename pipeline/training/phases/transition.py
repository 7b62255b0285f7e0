"""Phase `transition`: MELT initialised from a LoopLM checkpoint, alpha ramped start -> end, LM loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.training.config import ConfigError, TransitionPhaseSection
from pipeline.training.engines.base import Engine
from pipeline.training.losses import TokenCounts
from pipeline.training.phases.base import MicroStepOutput, check_checkpoint_source, gate_stats, lm_loss
from pipeline.training.phases.melt_student import MeltStudentPhase
from pipeline.training.schedules import ramp
from pipeline.training.weights import resolve_checkpoint_dir

if TYPE_CHECKING:
    from pipeline.models import MeltForCausalLM


class TransitionPhase(MeltStudentPhase):
    """MELT initialised from a LoopLM checkpoint; alpha ramps start -> end; LM loss."""

    name = "transition"

    @property
    def section(self) -> TransitionPhaseSection:
        """cfg.phase, the section of this phase (build_phase picks the class by its name)."""
        section = self.cfg.phase
        assert isinstance(section, TransitionPhaseSection)
        return section

    def check_inputs(self) -> None:
        phase = self.section
        if phase.trainable == "gates" and phase.alpha.start == phase.alpha.end == 0.0:
            raise ConfigError(
                "config key 'phase.trainable': gates only at alpha fixed to 0 trains nothing "
                "(the gates do not touch the output at alpha 0)"
            )
        check_checkpoint_source(self.init_from, "model.init_from")

    def vocab_size(self) -> tuple[Optional[int], str]:
        config = Path(self.init_from) / "config.json"
        if not config.is_file():
            return None, ""
        return json.loads(config.read_text()).get("vocab_size"), "model.init_from"

    def melt_config(self, directory):
        from pipeline.models import LoopLMConfig, MeltConfig

        phase = self.section
        return MeltConfig.from_looplm_config(
            LoopLMConfig.from_pretrained(str(directory)),
            gate=phase.gate,
            chunk_size=phase.chunk_size,
            alpha=phase.alpha.start,
            **phase.melt_options,
        )

    def build_model(self, engine: Engine) -> MeltForCausalLM:
        """MELT built partitioned; the LoopLM's tensors loaded by name; the new gates initialised."""
        directory = resolve_checkpoint_dir(self.init_from)
        return self.load_melt(engine, directory, self.melt_config(directory), fresh_gates=True)

    def alpha(self, step: int) -> float:
        """Alpha for step `step` (0-based): the ramp's value at the end of that step, so a ramp from 0
        reaches its end after ramp_fraction x total_steps steps and no step runs at alpha exactly 0
        (where the gates do not touch the output) unless alpha is fixed at 0."""
        a = self.section.alpha
        return ramp(step + 1, self.cfg.schedule.total_steps, a.start, a.end, a.ramp_fraction, a.shape)

    def begin_step(self, model, step) -> dict[str, float]:
        alpha = self.alpha(step)
        model.set_alpha(alpha)
        return {"alpha": alpha}

    def micro_step(self, forward, batch, counts: TokenCounts) -> MicroStepOutput:
        loss_cfg = self.section.loss
        out = forward(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            output_loop_logits=loss_cfg.per_loop_metrics,
            use_cache=False,
        )
        return MicroStepOutput(lm_loss(loss_cfg, out, batch["labels"], counts.labelled), gate_stats(out))
