"""Phase `pretrain`: a LoopLM from scratch, Ouro stage-I loss."""

from __future__ import annotations

from typing import Optional

from torch import nn

from pipeline.training.engines.base import Engine
from pipeline.training.losses import TokenCounts
from pipeline.training.phases.base import MicroStepOutput, Phase, lm_loss


class PretrainPhase(Phase):
    """A LoopLM from scratch, Ouro stage-I loss."""
    name = "pretrain"
    group_names = ("all",)

    def vocab_size(self) -> tuple[Optional[int], str]:
        from pipeline.models import LoopLMConfig
        return LoopLMConfig(**self.cfg.model.config).vocab_size, "model.config.vocab_size"

    def build_model(self, engine: Engine) -> nn.Module:
        from pipeline.models import LoopLMConfig, LoopLMForCausalLM
        config = LoopLMConfig(**self.cfg.model.config)
        with engine.init_context():
            model = LoopLMForCausalLM(config)
        engine.init_weights(model, model._init_weights)
        return model

    def micro_step(self, forward, batch, counts: TokenCounts) -> MicroStepOutput:
        loss_cfg = self.cfg.phase.loss
        out = forward(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      output_loop_logits=loss_cfg.per_loop_metrics, use_cache=False)
        return MicroStepOutput(lm_loss(loss_cfg, out, batch["labels"], counts.labelled))
