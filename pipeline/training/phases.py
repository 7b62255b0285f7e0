"""Training phases (DESIGN.md 3): what model a phase trains, which parameters, and its loss.

A phase never sees the engine's type: it builds its model through the `Engine`
interface (partitioned construction / loading) and computes its loss through a
`forward` callable. The trainer drives it:

    phase = build_phase(cfg)
    model = phase.build_model(engine)                   # inside the engine's partitioning
    groups = phase.parameter_groups(model)              # freezes the rest
    every step:    scalars = phase.begin_step(model, step)          # e.g. MELT's alpha
    every micro:   out = phase.micro_step(engine.forward, batch, counts)  # counts: the step's TokenCounts
    at the end:    phase.after_fit(run_dir)                         # collective

The `distill` phase (phases_distill.py) plugs in the same way: its build_model also
builds the frozen teacher partitioned (engine.frozen_init_context + engine.load_weights)
and has the engine wrap it for inference (engine.build_frozen); it names it in
frozen_models() (the trainer records its partition); its micro_step runs teacher and
student on the same batch, returns the summed losses (each normalised by the global
count of the tokens it is taken on), logs the parts through LossOutput.metrics and reports the
teacher's forward time in MicroStepOutput.timings.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from pipeline.models.melt import is_gate_parameter
from pipeline.training.config import ConfigError, LossSection, RunConfig
from pipeline.training.engines.base import Engine, FrozenModel, ParamGroup
from pipeline.training.losses import LossOutput, TokenCounts, causal_lm_loss, last_loop_lm_loss, ouro_stage1_loss
from pipeline.training.schedules import ramp
from pipeline.training.weights import CheckpointTensors, full_shape, full_shapes, resolve_checkpoint_dir

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class MicroStepOutput:
    loss: LossOutput                        # .loss is backpropagated; .metrics are per-token means
    stats: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (value, "mean" | "min" | "max")
    # seconds spent in micro_step on work other than the trained model's forward, by name (e.g. "teacher")
    timings: dict[str, float] = field(default_factory=dict)


def lm_loss(cfg: LossSection, outputs, labels: torch.Tensor, normalizer) -> LossOutput:
    if cfg.kind == "ouro_stage1":
        return ouro_stage1_loss(outputs.loop_logits, outputs.exit_logits, labels, beta=cfg.beta, normalizer=normalizer)
    if cfg.kind == "last_loop_ce":
        if not cfg.per_loop_metrics:  # the forward computed the last loop's logits only
            return causal_lm_loss(outputs.logits, labels, normalizer)
        return last_loop_lm_loss(outputs.loop_logits, outputs.exit_logits, labels, beta=cfg.beta,
                                 normalizer=normalizer)
    raise ValueError(f"unknown loss kind {cfg.kind!r}")


class Phase(ABC):
    name: ClassVar[str]
    group_names: ClassVar[tuple[str, ...]]  # parameter groups this phase forms (optimizer.groups.<name>)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        unknown = sorted(set(cfg.optimizer.groups) - set(self.group_names))
        if unknown:
            raise ConfigError(f"config key 'optimizer.groups.{unknown[0]}': phase {self.name} has no parameter "
                              f"group {unknown[0]!r} (groups: {list(self.group_names)})")

    def check_inputs(self) -> None:
        """Raise ConfigError for an input that cannot exist (called before any process group)."""

    def vocab_size(self) -> tuple[Optional[int], str]:
        """The model's vocabulary size when known before building it, and the config key it comes from."""
        return None, ""

    @abstractmethod
    def build_model(self, engine: Engine) -> nn.Module: ...

    def role(self, param_name: str) -> str:
        return self.group_names[0]

    def trainable_roles(self) -> set[str]:
        return set(self.group_names)

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        """One group per role (with optimizer.groups.<role> overrides); frozen roles get requires_grad False."""
        opt = self.cfg.optimizer
        trainable = self.trainable_roles()
        groups = {}
        for name, param in model.named_parameters():
            role = self.role(name)
            if role not in trainable:
                param.requires_grad_(False)
                continue
            if role not in groups:
                over = opt.groups.get(role)
                lr = over.lr if over is not None and over.lr is not None else opt.lr
                wd = over.weight_decay if over is not None and over.weight_decay is not None else opt.weight_decay
                groups[role] = ParamGroup(role, [], lr, wd)
            (groups[role].params if len(full_shape(param)) >= 2 else groups[role].no_decay).append(param)
        if not groups:
            raise ConfigError(f"phase {self.name}: no trainable parameter")
        return [groups[r] for r in self.group_names if r in groups]

    def begin_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Called before step `step` (0-based) on every rank; returns scalars to log."""
        return {}

    @abstractmethod
    def micro_step(self, forward: Callable, batch: dict, counts: TokenCounts) -> MicroStepOutput:
        """This micro-batch's loss; `counts` are the whole step's (all micro-batches, all ranks)."""

    def resume_identity(self) -> dict[str, str]:
        """What must not change between a checkpoint and its resumption besides the data, by config key
        (e.g. the distillation teacher); saved in trainer_state.json."""
        return {}

    def check_resume(self, saved: dict[str, str], where: str) -> None:
        """ConfigError when an input named in resume_identity() differs from the checkpoint's."""
        current = self.resume_identity()
        diffs = [f"config key {k!r}: checkpoint {saved[k]}, now {current[k]}" for k in sorted(saved)
                 if k in current and saved[k] != current[k]]
        if diffs:
            raise ConfigError(f"refusing to resume from {where}: " + "; ".join(diffs)
                              + ". Resume with the original inputs, or use a new run_dir.")

    def frozen_models(self) -> dict[str, FrozenModel]:
        """Frozen models this phase holds besides the trained one (e.g. {"teacher": ...}), by name."""
        return {}

    def after_fit(self, run_dir: Path) -> None:
        """Collective: called on every rank when the trainer's loop has ended (also at stop_at_step)."""


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


def check_checkpoint_source(path: str, key: str) -> None:
    """A local directory with config.json, or something shaped like a hub name."""
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"config key {key!r}: {path} has no config.json (not a Hugging Face checkpoint)")
    elif not HUB_NAME.match(path) or path.startswith((".", "/")):
        raise ConfigError(f"config key {key!r}: {path} does not exist (and is not a hub name like org/model)")


def gate_stats(out) -> dict[str, tuple[float, str]]:
    """MELT's per-layer gate statistics of one forward (train mode), as MicroStepOutput.stats."""
    stats: Optional[torch.Tensor] = getattr(out, "gate_stats", None)
    result = {}
    if stats is not None:
        for layer, (mean, low, high) in enumerate(stats.tolist()):
            result[f"gates/layer{layer}/mean"] = (mean, "mean")
            result[f"gates/layer{layer}/min"] = (low, "min")
            result[f"gates/layer{layer}/max"] = (high, "max")
    return result


class MeltStudentPhase(Phase):
    """A MELT model trained from a checkpoint; parameter groups gates / attention / other."""
    group_names = ("gates", "attention", "other")
    TRAINABLE = {"all": {"gates", "attention", "other"}, "gates": {"gates"},
                 "gates+attention": {"gates", "attention"}}

    def role(self, param_name: str) -> str:
        if is_gate_parameter(param_name):
            return "gates"
        if ".self_attn." in param_name:
            return "attention"
        return "other"

    def trainable_roles(self) -> set[str]:
        return self.TRAINABLE[self.cfg.phase.trainable]

    def load_melt(self, engine: Engine, directory, config, fresh_gates: bool) -> nn.Module:
        """MELT built partitioned; the checkpoint's tensors loaded by name; with fresh_gates (a LoopLM
        checkpoint) the gates are initialised instead."""
        from pipeline.models import MeltForCausalLM
        with engine.init_context():
            model = MeltForCausalLM(config)
        tensors = CheckpointTensors(directory)
        shapes = full_shapes(model)
        tensors.check_fits(shapes, may_be_missing=[n for n in shapes if fresh_gates and self.role(n) == "gates"])
        if fresh_gates:
            for name, module in model.named_modules():
                if name.endswith(".kv_gate"):
                    engine.init_weights(module, model._init_weights, prefix=name)
        engine.load_weights(model, tensors)
        return model


class TransitionPhase(MeltStudentPhase):
    """MELT initialised from a LoopLM checkpoint; alpha ramps start -> end; LM loss."""
    name = "transition"

    def check_inputs(self) -> None:
        phase = self.cfg.phase
        if phase.trainable == "gates" and phase.alpha.start == phase.alpha.end == 0.0:
            raise ConfigError("config key 'phase.trainable': gates only at alpha fixed to 0 trains nothing "
                              "(the gates do not touch the output at alpha 0)")
        check_checkpoint_source(self.cfg.model.init_from, "model.init_from")

    def vocab_size(self) -> tuple[Optional[int], str]:
        config = Path(self.cfg.model.init_from) / "config.json"
        if not config.is_file():
            return None, ""
        return json.loads(config.read_text()).get("vocab_size"), "model.init_from"

    def melt_config(self, directory):
        from pipeline.models import LoopLMConfig, MeltConfig
        phase = self.cfg.phase
        return MeltConfig.from_looplm_config(LoopLMConfig.from_pretrained(str(directory)), gate=phase.gate,
                                             chunk_size=phase.chunk_size, alpha=phase.alpha.start,
                                             **phase.melt_options)

    def build_model(self, engine: Engine) -> nn.Module:
        """MELT built partitioned; the LoopLM's tensors loaded by name; the new gates initialised."""
        directory = resolve_checkpoint_dir(self.cfg.model.init_from)
        return self.load_melt(engine, directory, self.melt_config(directory), fresh_gates=True)

    def alpha(self, step: int) -> float:
        """Alpha for step `step` (0-based): the ramp's value at the end of that step, so a ramp from 0
        reaches its end after ramp_fraction x total_steps steps and no step runs at alpha exactly 0
        (where the gates do not touch the output) unless alpha is fixed at 0."""
        a = self.cfg.phase.alpha
        return ramp(step + 1, self.cfg.schedule.total_steps, a.start, a.end, a.ramp_fraction, a.shape)

    def begin_step(self, model, step) -> dict[str, float]:
        alpha = self.alpha(step)
        model.set_alpha(alpha)
        return {"alpha": alpha}

    def micro_step(self, forward, batch, counts: TokenCounts) -> MicroStepOutput:
        loss_cfg = self.cfg.phase.loss
        out = forward(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      output_loop_logits=loss_cfg.per_loop_metrics, use_cache=False)
        return MicroStepOutput(lm_loss(loss_cfg, out, batch["labels"], counts.labelled), gate_stats(out))


PHASES: dict[str, type[Phase]] = {p.name: p for p in (PretrainPhase, TransitionPhase)}


def build_phase(cfg: RunConfig) -> Phase:
    if cfg.phase.name == "distill" and "distill" not in PHASES:
        from pipeline.training.phases_distill import DistillPhase  # imports this module
        PHASES["distill"] = DistillPhase
    try:
        cls = PHASES[cfg.phase.name]
    except KeyError:
        raise ConfigError(f"config key 'phase.name': phase {cfg.phase.name!r} is not implemented yet") from None
    return cls(cfg)
