"""What one training micro-step of a run config runs on: the models' architectures, the sequence
length, alpha and the dtype, resolved from the run config without loading any weights.

Architectures come from (first that applies): a local checkpoint directory's config.json; a
location an earlier phase will produce (`known`, e.g. the launcher's map of exports); a hub
name's config.json in the local Hugging Face cache (never downloaded); the Ouro hub names in
`HUB_ARCHITECTURES`; a `--model-config` file; for the distill student only, the teacher's
architecture (the distill phase requires them to match); else a ConfigError naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from pipeline.training.config import ConfigError, RunConfig, TransitionPhaseSection

REPO = Path(__file__).resolve().parents[2]

# Ouro checkpoints by hub name -> our copy of their architecture (the -Thinking models share it)
HUB_ARCHITECTURES = {
    "ByteDance/Ouro-1.4B": "configs/model/ouro-1.4b.yaml",
    "ByteDance/Ouro-1.4B-Thinking": "configs/model/ouro-1.4b.yaml",
    "ByteDance/Ouro-2.6B": "configs/model/ouro-2.6b.yaml",
    "ByteDance/Ouro-2.6B-Thinking": "configs/model/ouro-2.6b.yaml",
}


@dataclass(frozen=True)
class Architecture:
    config: dict  # LoopLMConfig keyword arguments (+ MELT's keys and model_type for a MELT checkpoint)
    source: str  # where it was read, for the report

    @property
    def is_melt(self) -> bool:
        return self.config.get("model_type") == "melt"

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def looplm_config(self, layers: Optional[int] = None):
        """The LoopLMConfig (or MeltConfig for a MELT checkpoint), at `layers` decoder layers if given."""
        from pipeline.models import LoopLMConfig, MeltConfig

        values = dict(self.config)
        values.pop("model_type", None)
        if layers is not None:
            values.update(num_hidden_layers=layers, layer_types=None)
        return (MeltConfig if self.is_melt else LoopLMConfig)(**values)


@dataclass(frozen=True)
class StepInputs:
    """Everything one micro-step of the run needs besides the run config itself."""

    phase: str
    seq_len: int
    micro_batch: int
    dtype: torch.dtype
    model: Architecture  # the trained model's source architecture (LoopLM or MELT)
    teacher: Optional[Architecture] = None  # distill only
    alpha: Optional[float] = None  # MELT phases: alpha of the measured step
    chunk_size: Optional[int] = None  # MELT phases
    notes: tuple[str, ...] = field(default_factory=tuple)


def read_config_file(path: str | Path, flag: str) -> dict:
    """A LoopLM config as YAML (configs/model/*.yaml, `_base_` allowed) or a config.json."""
    from pipeline.training.config import load_yaml_with_includes

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    raw = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml_with_includes(path)
    if not isinstance(raw, dict) or "hidden_size" not in raw:
        raise ConfigError(f"{flag} {path}: not a LoopLM config (a mapping with hidden_size, num_hidden_layers, ...)")
    return clean_config(raw)


def clean_config(raw: dict) -> dict:
    """config.json -> constructor arguments (Hugging Face bookkeeping keys dropped)."""
    drop = {"architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}
    return {k: v for k, v in raw.items() if k not in drop}


def hub_cache_config(name: str) -> Optional[dict]:
    """config.json of a hub model already in the local Hugging Face cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: not found
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) and Path(found).is_file() else None


def checkpoint_architecture(
    name_or_path: str,
    key: str,
    known: Optional[Mapping[str, Architecture]] = None,
    model_config: Optional[str] = None,
    fallback: Optional[Architecture] = None,
    fallback_why: str = "",
) -> Architecture:
    """The architecture of the checkpoint `name_or_path` (config key `key`), without its weights."""
    local = Path(name_or_path)
    if (local / "config.json").is_file():
        return Architecture(clean_config(json.loads((local / "config.json").read_text())), f"{local}/config.json")
    for where in (name_or_path, str(local.resolve()) if not name_or_path.startswith(("http", "s3:")) else None):
        if known and where is not None and where in known:
            return known[where]
    cached = hub_cache_config(name_or_path) if not local.exists() else None
    if cached is not None:
        return Architecture(clean_config(cached), f"{name_or_path} (Hugging Face cache)")
    if name_or_path in HUB_ARCHITECTURES:
        path = REPO / HUB_ARCHITECTURES[name_or_path]
        return Architecture(read_config_file(path, key), f"{HUB_ARCHITECTURES[name_or_path]} ({name_or_path})")
    if model_config is not None:
        return Architecture(read_config_file(model_config, "--model-config"), f"--model-config {model_config}")
    if fallback is not None:
        return Architecture(fallback.config, f"{fallback.source}, {fallback_why}")
    raise ConfigError(
        f"config key {key!r}: cannot find the architecture of {name_or_path!r} (no config.json there, not in the "
        f"Hugging Face cache, not a known hub name: {', '.join(HUB_ARCHITECTURES)}); pass --model-config FILE.yaml "
        "(a LoopLM config such as configs/model/ouro-1.4b.yaml)"
    )


def resolve_architectures(
    cfg: RunConfig, model_config: Optional[str] = None, known: Optional[Mapping[str, Architecture]] = None
) -> tuple[Architecture, Optional[Architecture]]:
    """(trained model's source architecture, teacher's architecture or None)."""
    name = cfg.phase.name
    # RunConfig's checks: pretrain sets model.config; transition and distill set model.init_from, distill a teacher
    if name == "pretrain":
        assert cfg.model.config is not None
        return Architecture(dict(cfg.model.config), "model.config"), None
    assert cfg.model.init_from is not None
    if name == "transition":
        arch = checkpoint_architecture(cfg.model.init_from, "model.init_from", known, model_config)
        if arch.is_melt:
            raise ConfigError(
                f"config key 'model.init_from': {cfg.model.init_from} is a MELT checkpoint; the "
                "transition starts from a LoopLM"
            )
        return arch, None
    assert cfg.teacher is not None
    teacher = checkpoint_architecture(cfg.teacher.init_from, "teacher.init_from", known, model_config)
    student = checkpoint_architecture(
        cfg.model.init_from,
        "model.init_from",
        known,
        model_config,
        fallback=teacher,
        fallback_why=f"model.init_from {cfg.model.init_from} not on disk yet "
        "(the distill phase requires the teacher's architecture)",
    )
    return student, teacher


def resolve_seq_len(cfg: RunConfig, seq_len: Optional[int], source: str = "--seq-len") -> tuple[int, str]:
    """`seq_len` (from `source`), else the dataset manifest's seq_len at data.path; (length, where from)."""
    if seq_len is not None:
        if seq_len < 2:
            raise ConfigError(f"{source} {seq_len}: must be at least 2")
        return seq_len, source
    manifest = Path(cfg.data.path) / "manifest.json"
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text()).get("seq_len")
        except ValueError:
            found = None
        if isinstance(found, int) and found > 1:
            return found, f"{manifest}"
    raise ConfigError(
        f"the sequence length is not in the run config: pass --seq-len N (or prepare the dataset at "
        f"config key 'data.path' = {cfg.data.path}; its manifest.json records seq_len)"
    )


def worst_alpha(cfg: RunConfig) -> tuple[float, str]:
    """Transition: alpha strictly inside (0, 1) when the ramp passes there (per-loop keys and values
    are kept, and mixed: the most memory), else its only value."""
    assert isinstance(cfg.phase, TransitionPhaseSection)  # only the transition ramps alpha
    a = cfg.phase.alpha
    low, high = sorted((a.start, a.end))
    if low < high:
        return (low + high) / 2, f"mid-ramp ({a.start} -> {a.end})"
    return low, "fixed"


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    """engine.precision auto/bf16 -> bf16 (the plan is for GPUs), fp32 -> fp32."""
    return torch.float32 if cfg.engine.precision == "fp32" else torch.bfloat16


def step_inputs(
    cfg: RunConfig,
    seq_len: Optional[int] = None,
    model_config: Optional[str] = None,
    known: Optional[Mapping[str, Architecture]] = None,
    alpha: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    seq_len_source: str = "--seq-len",
) -> StepInputs:
    """What one micro-step of `cfg` runs on (see the module docstring for the architecture sources);
    alpha and dtype default to the phase's worst alpha and the run's GPU compute dtype."""
    length, length_source = resolve_seq_len(cfg, seq_len, seq_len_source)
    model, teacher = resolve_architectures(cfg, model_config, known)
    notes = [f"sequence length {length} from {length_source}", f"model architecture from {model.source}"]
    if teacher is not None:
        notes.append(f"teacher architecture from {teacher.source}")
    chunk = getattr(cfg.phase, "chunk_size", None)
    if cfg.phase.name == "transition" and alpha is None:
        alpha, why = worst_alpha(cfg)
        notes.append(f"alpha {alpha:g} ({why})")
    elif cfg.phase.name == "distill":
        alpha = 1.0
    max_pos = int(model.config.get("max_position_embeddings", 0) or 0)
    if max_pos and length > max_pos:
        raise ConfigError(
            f"sequence length {length} exceeds the model's max_position_embeddings={max_pos} ({model.source})"
        )
    return StepInputs(
        phase=cfg.phase.name,
        seq_len=length,
        micro_batch=cfg.data.micro_batch_size,
        dtype=dtype or compute_dtype(cfg),
        model=model,
        teacher=teacher,
        alpha=alpha,
        chunk_size=chunk,
        notes=tuple(notes),
    )
