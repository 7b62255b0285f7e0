"""Phase `pretrain`: a LoopLM from scratch, Ouro stage-I loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from pipeline.training.config import PretrainPhaseSection, TransitionPhaseSection
from pipeline.training.engines.base import Engine
from pipeline.training.losses import TokenCounts
from pipeline.training.phases.base import MicroStepOutput, Phase, lm_loss

if TYPE_CHECKING:
    from pipeline.models import LoopLMForCausalLM


class PretrainPhase(Phase):
    """A LoopLM from scratch, Ouro stage-I loss."""

    name = "pretrain"
    group_names = ("all",)

    @property
    def model_config(self) -> dict[str, Any]:
        """model.config, which RunConfig requires of phase pretrain (LoopLMConfig keyword arguments)."""
        config = self.cfg.model.config
        assert config is not None  # RunConfig's cross-check
        return config

    def vocab_size(self) -> tuple[Optional[int], str]:
        from pipeline.models import LoopLMConfig

        return LoopLMConfig(**self.model_config).vocab_size, "model.config.vocab_size"

    def build_model(self, engine: Engine) -> LoopLMForCausalLM:
        from pipeline.models import LoopLMConfig, LoopLMForCausalLM

        config = LoopLMConfig(**self.model_config)
        with engine.init_context():
            model = LoopLMForCausalLM(config)
        engine.init_weights(model, model._init_weights)
        return model

    def micro_step(self, forward, batch, counts: TokenCounts) -> MicroStepOutput:
        section = self.cfg.phase
        # this phase's section, or a transition's (whose LM loss the tests reproduce on a LoopLM with this step)
        assert isinstance(section, (PretrainPhaseSection, TransitionPhaseSection))
        loss_cfg = section.loss
        out = forward(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            output_loop_logits=loss_cfg.per_loop_metrics,
            use_cache=False,
        )
        return MicroStepOutput(lm_loss(loss_cfg, out, batch["labels"], counts.labelled))
