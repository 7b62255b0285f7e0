"""What the phases that train a MELT model from a checkpoint share (transition, distill): the
parameter groups gates / attention / other and the partitioned load with optional fresh gates."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.melt import is_gate_parameter
from pipeline.training.config import DistillPhaseSection, TransitionPhaseSection
from pipeline.training.engines.base import Engine
from pipeline.training.phases.base import Phase
from pipeline.training.weights import CheckpointTensors, full_shapes

if TYPE_CHECKING:
    from pipeline.models import MeltForCausalLM


class MeltStudentPhase(Phase):
    """A MELT model trained from a checkpoint; parameter groups gates / attention / other."""

    group_names = ("gates", "attention", "other")
    TRAINABLE = {"all": {"gates", "attention", "other"}, "gates": {"gates"}, "gates+attention": {"gates", "attention"}}

    @property
    def section(self) -> TransitionPhaseSection | DistillPhaseSection:
        """cfg.phase, the section of this phase (build_phase picks the class by its name)."""
        section = self.cfg.phase
        assert isinstance(section, (TransitionPhaseSection, DistillPhaseSection))
        return section

    @property
    def init_from(self) -> str:
        """model.init_from, which RunConfig requires of the phases that start from a checkpoint."""
        init_from = self.cfg.model.init_from
        assert init_from is not None  # RunConfig's cross-check
        return init_from

    def role(self, param_name: str) -> str:
        if is_gate_parameter(param_name):
            return "gates"
        if ".self_attn." in param_name:
            return "attention"
        return "other"

    def trainable_roles(self) -> set[str]:
        return self.TRAINABLE[self.section.trainable]

    def load_melt(self, engine: Engine, directory, config, fresh_gates: bool) -> MeltForCausalLM:
        """MELT built partitioned; the checkpoint's tensors loaded by name; with fresh_gates (a LoopLM
        checkpoint) the gates are initialised instead."""
        from pipeline.models import MeltForCausalLM

        with engine.init_context():
            model = MeltForCausalLM(config)
        tensors = CheckpointTensors(directory)
        shapes = full_shapes(model, engine.full_shape)
        tensors.check_fits(shapes, may_be_missing=[n for n in shapes if fresh_gates and self.role(n) == "gates"])
        if fresh_gates:
            for name, module in model.named_modules():
                if name.endswith(".kv_gate"):
                    engine.init_weights(module, model._init_weights, prefix=name)
        engine.load_weights(model, tensors)
        return model
