"""The run configuration: one typed, validated object per training run.

A run config is YAML with the sections below (`configs/smoke/pretrain.yaml` is a
small complete example). Loading:

1. the YAML is read; any mapping with a `_base_: <path>` key is merged onto that
   file's content (paths relative to the including file; the including keys win);
2. an experiment file (a top-level mapping whose sections are run configs, one per
   phase: `transition:`, `distill:`, ...) is reduced to the section `phase` names;
3. command-line overrides `dotted.key=value` (values parsed as YAML) are applied;
4. pydantic validates everything: an unknown key or a bad value raises ConfigError
   naming the key, before any process group starts.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import config_loader

PHASE_NAMES = ("pretrain", "transition", "distill")


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (names the offending key)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- sections


class ModelSection(Section):
    config: Optional[dict[str, Any]] = None  # LoopLMConfig keyword arguments (pretrain: a model from scratch)
    init_from: Optional[str] = None  # a LoopLM checkpoint: HF export directory or hub name (transition)

    @field_validator("config")
    @classmethod
    def _known_looplm_keys(cls, value):
        if value is None:
            return value
        from pipeline.models import LoopLMConfig

        known = set(inspect.signature(LoopLMConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown LoopLM config key(s) {unknown}; known: {sorted(known)}")
        LoopLMConfig(**value)  # runs the architecture checks
        return value


class DataSection(Section):
    path: str  # dataset directory (index.json, MDS shards, manifest.json)
    micro_batch_size: int = Field(4, gt=0)  # per rank and micro-step
    global_batch_size: int = Field(16, gt=0)  # = micro_batch_size * world size * gradient accumulation steps
    num_canonical_nodes: int = Field(1, gt=0)  # pinned: the sample order does not depend on the node count
    shuffle: bool = True
    shuffle_seed: Optional[int] = None  # default: the run's seed
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _batch_multiple(self):
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        return self


class LossSection(Section):
    kind: Literal["ouro_stage1", "last_loop_ce"] = "ouro_stage1"
    beta: float = Field(0.1, ge=0)  # entropy weight of the Ouro stage-I loss
    # false (last_loop_ce only): only the last loop's logits are computed; no per-loop CE / exit
    # metrics, but T - 1 fewer [batch, seq, vocab] tensors (GBs at Ouro's vocabulary and length)
    per_loop_metrics: bool = True

    @model_validator(mode="after")
    def _stage1_needs_every_loop(self):
        if self.kind == "ouro_stage1" and not self.per_loop_metrics:
            raise ValueError("per_loop_metrics: false needs kind last_loop_ce (the Ouro stage-I loss uses every loop)")
        return self


class PretrainPhaseSection(Section):
    """A LoopLM from scratch (model.config), Ouro stage-I loss."""

    name: Literal["pretrain"]
    loss: LossSection = LossSection(kind="ouro_stage1")


class AlphaRampSection(Section):
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)
    ramp_fraction: float = Field(0.5, ge=0, le=1)  # of the phase's total steps; alpha stays at `end` after
    shape: Literal["linear", "cosine"] = "linear"


class TransitionPhaseSection(Section):
    """MELT from a LoopLM checkpoint (model.init_from), chunk-wise, alpha ramped start -> end."""

    name: Literal["transition"]
    gate: Literal["elementwise", "headwise", "overwrite", "mean"] = "elementwise"
    chunk_size: int = Field(64, gt=0)
    alpha: AlphaRampSection = AlphaRampSection()
    loss: LossSection = LossSection(kind="last_loop_ce")
    trainable: Literal["all", "gates", "gates+attention"] = "all"
    melt_options: dict[str, Any] = {}  # passed on to MeltForCausalLM.from_looplm


class KDSection(Section):
    """Logit distillation: KL(teacher || student) (forward), KL(student || teacher) (reverse) or JSD."""

    kind: Literal["forward", "reverse", "jsd"] = "forward"
    temperature: float = Field(1.0, gt=0)
    top_k: Optional[int] = Field(None, gt=0)  # both distributions restricted to the teacher's top-k tokens
    all_loops: bool = False  # average over every loop (else the last loop only)


class DistillPhaseSection(Section):
    """MELT student (alpha = 1) from model.init_from (a transition's MELT export, or a LoopLM: then
    fresh gates), frozen LoopLM teacher (teacher.init_from); loss =
    w_attn * attention alignment + w_kd * logit distillation + w_ce * CE."""

    name: Literal["distill"]
    w_attn: float = Field(1.0, ge=0)
    w_kd: float = Field(1.0, ge=0)
    w_ce: float = Field(0.0, ge=0)
    kd: KDSection = KDSection()
    # which tokens each part is taken on: "real" = every token but padding (the attention mask),
    # "labelled" = those with a next-token label (as CE). Alignment defaults to real: an unlabelled
    # token's slot (a prompt token, a document's last token) still feeds every later token.
    align_tokens: Literal["real", "labelled"] = "real"
    kd_tokens: Literal["labelled", "real"] = "labelled"
    teacher_forcing: bool = False  # each student layer gets the teacher's input to that (loop, layer)
    per_loop_metrics: bool = True  # false: both models compute the last loop's logits only (see LossSection)
    chunk_size: int = Field(64, gt=0)
    trainable: Literal["all", "gates", "gates+attention"] = "all"
    gate: Optional[Literal["elementwise", "headwise", "overwrite", "mean"]] = None  # None: the MELT checkpoint's
    melt_options: dict[str, Any] = {}  # MeltConfig overrides (gate_init_bias for a LoopLM student, ...)

    @model_validator(mode="after")
    def _some_loss(self):
        if self.w_attn == self.w_kd == self.w_ce == 0:
            raise ValueError("w_attn, w_kd and w_ce are all 0: nothing to train on")
        owned = sorted({"alpha", "chunk_size", "gate"} & set(self.melt_options))
        if owned:
            raise ValueError(
                f"melt_options may not set {owned} (distill runs at alpha 1; use phase.chunk_size, phase.gate)"
            )
        if self.kd.all_loops and not self.per_loop_metrics:
            raise ValueError("kd.all_loops needs every loop's logits: set per_loop_metrics: true")
        return self


PhaseSection = Annotated[
    Union[PretrainPhaseSection, TransitionPhaseSection, DistillPhaseSection], Field(discriminator="name")
]


class TeacherSection(Section):
    """The frozen LoopLM teacher of phase distill (partitioned across all ranks, inference only)."""

    init_from: str  # an Ouro/LoopLM checkpoint: HF export directory or hub name
    offload_params: bool = False  # keep the teacher's parameter partitions in CPU memory
    verify_unchanged: bool = True  # at the end, check the held weights against init_from (digests)


class GroupSection(Section):
    lr: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)


class OptimizerSection(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # applied to matrices only (not to norms and biases)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    groups: dict[str, GroupSection] = {}  # per parameter group (the phase names its groups): lr, weight_decay

    @field_validator("betas")
    @classmethod
    def _betas(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {value}")
        return value


class ScheduleSection(Section):
    total_steps: int = Field(gt=0)  # optimizer steps of the whole phase
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0)  # reached at total_steps (for optimizer.lr; other groups in proportion)
    stop_at_step: Optional[int] = Field(None, gt=0)  # end this invocation there (checkpointed); rerun to go on

    @model_validator(mode="after")
    def _steps(self):
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than total_steps={self.total_steps}")
        return self


class FsdpSection(Section):
    """Options of the FSDP2 engine (engine.name: fsdp; launched with torchrun)."""

    reshard_after_forward: bool = True  # free each layer's gathered parameters after its forward
    #   (re-gathered per loop and for backward); false: fewer
    #   all-gathers for looped models, more memory
    reduce_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # gradient reduce-scatter with bf16
    #   compute; auto: bf16 (fp32 compute reduces in fp32)


class EngineSection(Section):
    name: Literal["deepspeed", "fsdp"] = "deepspeed"  # fsdp: FSDP2 (fully_shard), launched with torchrun
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    activation_checkpointing: bool = False
    # how long a rank waits for the others in a collective: past it (a lost node, a hung peer) the
    # run stops with an error (exit 4) instead of hanging, and can be requeued; checkpoint saves and
    # the first step's set-up must fit in it
    collective_timeout_s: int = Field(1800, gt=0)
    deepspeed: dict[str, Any] = {}  # DeepSpeed config (usually `_base_: configs/deepspeed/zero3.yaml`)
    fsdp: FsdpSection = FsdpSection()  # FSDP2 options (engine.name: fsdp)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value):
        """`engine: fsdp` is `engine: {name: fsdp}` (as users and the README write it)."""
        return {"name": value} if isinstance(value, str) else value

    @field_validator("deepspeed")
    @classmethod
    def _trainer_owned_keys(cls, value):
        owned = {
            "optimizer": "optimizer.*",
            "scheduler": "schedule.*",
            "gradient_clipping": "engine.grad_clip",
            "train_batch_size": "data.global_batch_size",
            "train_micro_batch_size_per_gpu": "data.micro_batch_size",
            "gradient_accumulation_steps": "data.global_batch_size",
        }
        clash = {key: where for key, where in owned.items() if key in value}
        if clash:
            raise ValueError(
                "these DeepSpeed keys are set by the trainer from the run config: "
                + ", ".join(f"{k} (use {w})" for k, w in clash.items())
            )
        stage = value.get("zero_optimization", {}).get("stage", 3)
        if stage != 3:
            raise ValueError(f"zero_optimization.stage must be 3 (got {stage})")
        return value


class LoggingSection(Section):
    every: int = Field(1, gt=0)  # steps between TensorBoard / JSONL / console records
    tensorboard: bool = True


class CheckpointingSection(Section):
    every: int = Field(100, gt=0)  # steps between checkpoints (and one at the end)
    keep_last: int = Field(2, gt=0)
    export: bool = True  # Hugging Face export under <run_dir>/export at the end
    # also an export every this many steps before the end, <run_dir>/exports/step_<8 digits>/ (to evaluate
    # the model along the run); kept, unlike checkpoints
    export_every: Optional[int] = Field(None, gt=0)
    export_dtype: Literal["float32", "bfloat16"] = "float32"  # float32: the master weights, exactly


class GuardsSection(Section):
    nonfinite: Literal["stop", "skip"] = "stop"  # non-finite loss: stop the run, or skip the optimizer step
    inject_nonfinite_at_step: Optional[int] = None  # testing aid: make the loss NaN at this step (rank 0)


class RunConfig(Section):
    run_dir: str
    seed: int = 0
    model: ModelSection
    data: DataSection
    phase: PhaseSection
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection
    engine: EngineSection = EngineSection()
    logging: LoggingSection = LoggingSection()
    checkpointing: CheckpointingSection = CheckpointingSection()
    guards: GuardsSection = GuardsSection()
    teacher: Optional[TeacherSection] = None  # phase distill only

    @model_validator(mode="after")
    def _cross_checks(self):
        name = self.phase.name
        if name == "pretrain" and (self.model.config is None or self.model.init_from is not None):
            raise ValueError("phase pretrain builds a LoopLM from scratch: set model.config, not model.init_from")
        if name == "transition" and (self.model.init_from is None or self.model.config is not None):
            raise ValueError("phase transition starts from a LoopLM checkpoint: set model.init_from, not model.config")
        if name == "distill" and (self.model.init_from is None or self.model.config is not None):
            raise ValueError(
                "phase distill starts from a MELT (or LoopLM) checkpoint: set model.init_from, not model.config"
            )
        if name == "distill" and self.teacher is None:
            raise ValueError("phase distill needs a teacher: set teacher.init_from (a LoopLM checkpoint)")
        if name != "distill" and self.teacher is not None:
            raise ValueError(f"teacher is only used by phase distill (this is phase {name}): remove it")
        if self.schedule.min_lr > self.optimizer.lr:
            raise ValueError(f"schedule.min_lr={self.schedule.min_lr} exceeds optimizer.lr={self.optimizer.lr}")
        if self.schedule.stop_at_step is not None and self.schedule.stop_at_step > self.schedule.total_steps:
            raise ValueError("schedule.stop_at_step exceeds schedule.total_steps")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading

# Sections that may be written as their name alone: `engine: fsdp` (YAML) and `engine=fsdp` (command
# line) mean `engine.name: fsdp`, merged into the section like any other key (the rest of the
# section, e.g. engine.precision from a _base_ file, stays).
NAMED_SECTIONS = ("engine",)


def load_yaml_with_includes(path: str | Path) -> Any:
    """A YAML file with its `_base_` includes resolved and named sections expanded (ConfigError if not)."""
    return config_loader.load_yaml_with_includes(path, named_sections=NAMED_SECTIONS, error=ConfigError)


def phase_sections(raw: dict) -> dict[str, dict]:
    """The run configs of an experiment file: top-level sections that hold a `phase` mapping."""
    return {k: v for k, v in raw.items() if isinstance(v, dict) and isinstance(v.get("phase"), dict)}


def select_phase(raw: Any, phase: Optional[str], source: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    if "phase" in raw:  # a run config
        found = raw["phase"].get("name") if isinstance(raw["phase"], dict) else None
        if phase is not None and found != phase:
            raise ConfigError(f"{source}: --phase {phase} asked for, but the config's phase.name is {found!r}")
        return raw
    sections = phase_sections(raw)
    if not sections:
        raise ConfigError(
            f"{source}: neither a run config (no `phase` section) nor an experiment (no section holding a run config)"
        )
    if phase is None:
        if len(sections) > 1:
            raise ConfigError(f"{source} is an experiment with phases {sorted(sections)}: choose one with --phase")
        phase = next(iter(sections))
    if phase not in sections:
        raise ConfigError(f"{source}: no phase {phase!r} in this experiment (has {sorted(sections)})")
    return sections[phase]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with the command line's `dotted.key=value` overrides (ConfigError for a malformed one)."""
    return config_loader.apply_overrides(raw, overrides, named_sections=NAMED_SECTIONS, error=ConfigError)


def validate_run_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = config_loader.format_validation_errors(
            err,
            key_label="config key {!r}",
            tags={"phase": PHASE_NAMES},
            hidden_inputs=(dict,),
            bare_model_errors=False,
        )
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines)) from None


def load_run_config(path: str | Path, overrides: Optional[list[str]] = None, phase: Optional[str] = None) -> RunConfig:
    raw = select_phase(load_yaml_with_includes(path), phase, str(path))
    return validate_run_config(apply_overrides(raw, list(overrides or [])))


def load_run_configs_by_phase(path: str | Path) -> dict[str, RunConfig]:
    """Every phase section of a file holding one run config per phase (configs/ouro/*.yaml), validated."""
    raw = load_yaml_with_includes(path)
    sections = phase_sections(raw) if isinstance(raw, dict) else {}
    if not sections:
        raise ConfigError(f"{path}: no phase section found")
    out = {}
    for name, section in sections.items():
        try:
            out[name] = validate_run_config(section)
        except ConfigError as err:
            raise ConfigError(f"{path}, section {name!r}: {err}") from None
    return out
