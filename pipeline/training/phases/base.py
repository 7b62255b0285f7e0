"""What every phase shares: the `Phase` base class, its micro-step output, the LM loss by
config, and the checks and statistics more than one phase uses (the package docstring says
how the trainer drives a phase)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import nn

from pipeline.training.config import ConfigError, LossSection, RunConfig
from pipeline.training.engines.base import Engine, FrozenModel, ParamGroup
from pipeline.training.losses import LossOutput, TokenCounts, causal_lm_loss, last_loop_lm_loss, ouro_stage1_loss
from pipeline.training.weights import plain_shape

if TYPE_CHECKING:
    from pipeline.models import LoopedPreTrainedModel

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class MicroStepOutput:
    losses: LossOutput  # .total is backpropagated; .metrics are per-token means
    stats: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (value, "mean" | "min" | "max")
    # seconds spent in micro_step on work other than the trained model's forward, by name (e.g. "teacher")
    timings: dict[str, float] = field(default_factory=dict)


def lm_loss(cfg: LossSection, outputs, labels: torch.Tensor, normalizer) -> LossOutput:
    if cfg.kind == "ouro_stage1":
        return ouro_stage1_loss(outputs.loop_logits, outputs.exit_logits, labels, beta=cfg.beta, normalizer=normalizer)
    if cfg.kind == "last_loop_ce":
        if not cfg.per_loop_metrics:  # the forward computed the last loop's logits only
            return causal_lm_loss(outputs.logits, labels, normalizer)
        return last_loop_lm_loss(outputs.loop_logits, outputs.exit_logits, labels, beta=cfg.beta, normalizer=normalizer)
    raise ValueError(f"unknown loss kind {cfg.kind!r}")


class Phase(ABC):
    name: ClassVar[str]
    group_names: ClassVar[tuple[str, ...]]  # parameter groups this phase forms (optimizer.groups.<name>)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        unknown = sorted(set(cfg.optimizer.groups) - set(self.group_names))
        if unknown:
            raise ConfigError(
                f"config key 'optimizer.groups.{unknown[0]}': phase {self.name} has no parameter "
                f"group {unknown[0]!r} (groups: {list(self.group_names)})"
            )

    def check_inputs(self) -> None:
        """Raise ConfigError for an input that cannot exist (called before any process group)."""

    def vocab_size(self) -> tuple[Optional[int], str]:
        """The model's vocabulary size when known before building it, and the config key it comes from."""
        return None, ""

    @abstractmethod
    def build_model(self, engine: Engine) -> LoopedPreTrainedModel:
        """The model this phase trains (a LoopLM or MELT), built through `engine`."""

    def role(self, param_name: str) -> str:
        return self.group_names[0]

    def trainable_roles(self) -> set[str]:
        return set(self.group_names)

    def parameter_groups(self, model: nn.Module, engine: Optional[Engine] = None) -> list[ParamGroup]:
        """One group per role (with optimizer.groups.<role> overrides); frozen roles get requires_grad False.
        Matrices decay, vectors do not: `engine` reads the whole shape of a model it partitioned
        (None: a model not partitioned)."""
        full_shape = engine.full_shape if engine is not None else plain_shape
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
        diffs = [
            f"config key {k!r}: checkpoint {saved[k]}, now {current[k]}"
            for k in sorted(saved)
            if k in current and saved[k] != current[k]
        ]
        if diffs:
            raise ConfigError(
                f"refusing to resume from {where}: "
                + "; ".join(diffs)
                + ". Resume with the original inputs, or use a new run_dir."
            )

    def frozen_models(self) -> dict[str, FrozenModel]:
        """Frozen models this phase holds besides the trained one (e.g. {"teacher": ...}), by name."""
        return {}

    def after_fit(self, run_dir: Path) -> None:
        """Collective: called on every rank when the trainer's loop has ended (also at stop_at_step)."""


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
