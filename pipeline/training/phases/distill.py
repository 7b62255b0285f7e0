"""Phase `distill` (docs/architecture.md#33-distill): attention-aligned distillation from a frozen LoopLM.

Student: MELT at alpha = 1 from `model.init_from` (a transition's MELT export; or a LoopLM
checkpoint, then with fresh gates), trained by the engine. Teacher: the LoopLM of
`teacher.init_from`, built partitioned and wrapped by `engine.build_frozen` (DeepSpeed:
a second, optimizer-less ZeRO-3 engine; optionally with its parameters offloaded to CPU).
Neither model is ever whole on one rank; the teacher never has gradients or optimizer
state and is not checkpointed (it is reloaded from `teacher.init_from` on resumption).

Every micro-step runs the teacher, then the student, on the same batch on every rank:

    loss = w_attn * attention alignment + w_kd * logit distillation + w_ce * CE

each a sum over its tokens divided by their global count (TokenCounts). Attention is aligned
on every real token (`align_tokens: real`): a prompt token or a document's last token has no
label, but its slot feeds every later token. KL is taken where CE is (`kd_tokens: labelled`). The
teacher's attention outputs (before o_proj) come from the same forward that gives its
logits. With `teacher_forcing`, each student layer gets the teacher's input to that
(loop, layer) (captured by forward pre-hooks on the teacher's layers during that same
forward), so every layer learns to match the teacher's attention given the teacher's
state. Logged: train/align (+ per layer), train/kl (+ per loop), train/ce (+ per loop),
gate statistics, and the teacher's forward time (perf/teacher_tokens_per_s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import nn

from pipeline.training import comm
from pipeline.training.checkpointing import write_durable
from pipeline.training.config import ConfigError, DistillPhaseSection, LossSection, RunConfig, TeacherSection
from pipeline.training.distill_losses import attention_alignment_loss, logit_distillation_loss
from pipeline.training.engines.base import Engine, FrozenModel
from pipeline.training.losses import LossOutput, TokenCounts, labelled_positions, real_positions
from pipeline.training.phases.base import MicroStepOutput, check_checkpoint_source, gate_stats, lm_loss
from pipeline.training.phases.melt_student import MeltStudentPhase
from pipeline.training.weights import CheckpointTensors, full_shapes, resolve_checkpoint_dir

if TYPE_CHECKING:
    from pipeline.models import LoopLMForCausalLM, MeltForCausalLM

log = logging.getLogger("melt.train")

# what teacher and student must share: alignment needs the same (loop, layer) grid and attention
# width, distillation the same vocabulary, teacher forcing the same hidden size
MATCHING_KEYS = ("num_hidden_layers", "total_ut_steps", "num_attention_heads", "head_dim", "hidden_size", "vocab_size")
TEACHER_CHECK = "teacher_check.json"


def read_config_json(path: str) -> Optional[dict]:
    """A local checkpoint's config.json (None for a hub name not resolved yet)."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def load_config(directory, key: str):
    """LoopLMConfig or MeltConfig of a checkpoint directory, by its model_type."""
    from pipeline.models import LoopLMConfig, MeltConfig

    raw = read_config_json(str(directory)) or {}
    kind = raw.get("model_type")
    if kind not in (LoopLMConfig.model_type, MeltConfig.model_type):
        raise ConfigError(
            f"config key {key!r}: {directory} holds a {kind!r} model, not a LoopLM "
            f"({LoopLMConfig.model_type!r}) or MELT ({MeltConfig.model_type!r}) checkpoint"
        )
    cls = MeltConfig if kind == MeltConfig.model_type else LoopLMConfig
    return cls.from_pretrained(str(directory))


def check_architectures(student, teacher, student_src: str, teacher_src: str) -> None:
    diffs = [
        f"{k}: teacher {getattr(teacher, k)}, student {getattr(student, k)}"
        for k in MATCHING_KEYS
        if getattr(teacher, k) != getattr(student, k)
    ]
    if diffs:
        raise ConfigError(
            f"config keys 'teacher.init_from' and 'model.init_from': the teacher ({teacher_src}) and "
            f"the student ({student_src}) architectures do not match: " + "; ".join(diffs)
        )


def checkpoint_identity(name_or_path: str, sample: int = 1 << 20) -> str:
    """A local checkpoint's content digest, whatever its path: config.json, and each weight file's
    name, size, first and last MiB (cheap for multi-GB files, different for different weights);
    for a hub name, the name."""
    local = Path(name_or_path)
    if not (local / "config.json").is_file():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256((local / "config.json").read_bytes())
    for weights in sorted(local.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(sample))
            handle.seek(max(size - sample, 0))
            digest.update(handle.read(sample))
    return f"sha256:{digest.hexdigest()[:16]}"


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


class LayerInputRecorder:
    """Forward pre-hooks on a looped model's decoder layers: the input of every (loop, layer) call.
    Inside `with recorder:` the i-th call of layer l is loop i (the LoopLM runs every layer once per
    loop, in order); `inputs` is then [loop][layer] -> [B, S, H]."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.calls: list[list[torch.Tensor]] = [[] for _ in layers]
        self.active = False
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._hook(index))

    def _hook(self, index: int):
        def hook(module, args):
            if self.active:
                self.calls[index].append(args[0].detach())

        return hook

    def __enter__(self):
        self.calls = [[] for _ in self.layers]
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    @property
    def inputs(self) -> list[list[torch.Tensor]]:
        loops = len(self.calls[0])
        if any(len(c) != loops for c in self.calls):
            raise RuntimeError(f"layer input capture saw uneven calls per layer: {[len(c) for c in self.calls]}")
        return [[self.calls[layer][loop] for layer in range(len(self.calls))] for loop in range(loops)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DistillPhase(MeltStudentPhase):
    """MELT student (alpha = 1) distilled from a frozen LoopLM teacher."""

    name = "distill"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.teacher: Optional[FrozenModel] = None
        self.teacher_dir: Optional[Path] = None
        self.recorder: Optional[LayerInputRecorder] = None

    @property
    def section(self) -> DistillPhaseSection:
        """cfg.phase, the section of this phase (build_phase picks the class by its name)."""
        section = self.cfg.phase
        assert isinstance(section, DistillPhaseSection)
        return section

    @property
    def teacher_section(self) -> TeacherSection:
        """cfg.teacher, which RunConfig requires of phase distill."""
        teacher = self.cfg.teacher
        assert teacher is not None  # RunConfig's cross-check
        return teacher

    # -- before any process group
    def check_inputs(self) -> None:
        check_checkpoint_source(self.init_from, "model.init_from")
        check_checkpoint_source(self.teacher_section.init_from, "teacher.init_from")
        student_dir, teacher_dir = self.init_from, self.teacher_section.init_from
        student = load_config(student_dir, "model.init_from") if read_config_json(student_dir) else None
        teacher = load_config(teacher_dir, "teacher.init_from") if read_config_json(teacher_dir) else None
        self.check_pair(student, teacher)

    def check_pair(self, student, teacher) -> None:
        from pipeline.models import MeltConfig

        if teacher is not None and isinstance(teacher, MeltConfig):
            raise ConfigError(
                f"config key 'teacher.init_from': {self.teacher_section.init_from} is a MELT checkpoint; "
                "the teacher must be a LoopLM (model_type 'ouro')"
            )
        gate = self.section.gate
        if isinstance(student, MeltConfig) and gate is not None and gate != student.gate:
            raise ConfigError(
                f"config key 'phase.gate': {gate!r}, but the MELT checkpoint {self.init_from} "
                f"has gate {student.gate!r} (leave phase.gate unset to keep it)"
            )
        if student is not None and teacher is not None:
            check_architectures(student, teacher, self.init_from, self.teacher_section.init_from)

    def vocab_size(self) -> tuple[Optional[int], str]:
        raw = read_config_json(self.init_from)
        return (raw.get("vocab_size"), "model.init_from") if raw else (None, "")

    # -- models
    def melt_config(self, source):
        """The student's MeltConfig at alpha = 1 with this phase's chunk size (and melt_options)."""
        from pipeline.models import MeltConfig

        phase = self.section
        options = dict(chunk_size=phase.chunk_size, alpha=1.0, **phase.melt_options)
        if isinstance(source, MeltConfig):
            return MeltConfig.from_looplm_config(source, **options)
        return MeltConfig.from_looplm_config(source, gate=phase.gate or "elementwise", **options)

    def build_model(self, engine: Engine) -> MeltForCausalLM:
        """The student (returned, for the engine to train) and the frozen teacher (kept here)."""
        from pipeline.models import LoopLMForCausalLM, MeltConfig

        student_dir = resolve_checkpoint_dir(self.init_from)
        self.teacher_dir = resolve_checkpoint_dir(self.teacher_section.init_from)
        source = load_config(student_dir, "model.init_from")
        teacher_config = load_config(self.teacher_dir, "teacher.init_from")
        self.check_pair(source, teacher_config)
        from_melt = isinstance(source, MeltConfig)
        student = self.load_melt(engine, student_dir, self.melt_config(source), fresh_gates=not from_melt)

        offload = self.teacher_section.offload_params
        with engine.frozen_init_context(offload):
            teacher = LoopLMForCausalLM(teacher_config)
        tensors = CheckpointTensors(self.teacher_dir)
        tensors.check_fits(full_shapes(teacher, engine.full_shape))
        engine.load_weights(teacher, tensors)
        if self.section.teacher_forcing:
            # nn.Module types its submodules Tensor | Module: the backbone's decoder layers, as built
            self.recorder = LayerInputRecorder(cast(nn.ModuleList, teacher.model.layers))
        self.teacher = engine.build_frozen(teacher, offload_params=offload)
        log.info(
            f"student: MELT from {'a MELT' if from_melt else 'a LoopLM'} checkpoint ({student_dir}), "
            f"gate {student.config.gate}, chunk {student.config.chunk_size}; teacher: {self.teacher_dir}"
            f"{' (parameters offloaded to CPU)' if offload else ''}"
        )
        return student

    def frozen_models(self) -> dict[str, FrozenModel]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def resume_identity(self) -> dict[str, str]:
        """A resumed run reloads the teacher from teacher.init_from: it must be the same teacher."""
        return {"teacher.init_from": checkpoint_identity(self.teacher_section.init_from)}

    # -- training
    def begin_step(self, model, step) -> dict[str, float]:
        if model.alpha != 1.0:
            model.set_alpha(1.0)
        return {}

    def micro_step(self, forward, batch, counts: TokenCounts) -> MicroStepOutput:
        phase = self.section
        frozen = self.teacher
        assert frozen is not None  # build_model (or the memory planner) sets it
        teacher_config = cast("LoopLMForCausalLM", frozen.module).config  # the teacher is a LoopLM
        ids, labels = batch["input_ids"], batch["labels"]
        positions = {
            "labelled": (labelled_positions(labels), counts.labelled),
            "real": (real_positions(batch), counts.real),
        }
        # left-padded rows (synthetic tasks) carry an attention mask; both models see it
        inputs: dict[str, Any] = dict(
            input_ids=ids,
            attention_mask=batch.get("attention_mask"),
            output_loop_logits=phase.per_loop_metrics,
            output_attention_outputs=phase.w_attn > 0,
            use_cache=False,
        )
        start = time.perf_counter()
        if self.recorder is not None:
            with self.recorder:
                teacher = frozen(**inputs)
            inputs["layer_inputs"] = self.recorder.inputs
        else:
            teacher = frozen(**inputs)
        synchronize(ids.device)
        teacher_s = time.perf_counter() - start

        student = forward(**inputs)
        parts: list[tuple[float, LossOutput]] = []
        if phase.w_attn > 0:
            heads = teacher_config.num_attention_heads
            align_positions, align_count = positions[phase.align_tokens]
            parts.append(
                (
                    phase.w_attn,
                    attention_alignment_loss(
                        student.attention_outputs, teacher.attention_outputs, align_positions, heads, align_count
                    ),
                )
            )
        kd = phase.kd
        if phase.per_loop_metrics:
            student_logits, teacher_logits, loop_numbers = student.loop_logits, teacher.loop_logits, None
        else:  # the last loop's logits only: `logits` is the last loop's
            student_logits, teacher_logits = (student.logits,), (teacher.logits,)
            loop_numbers = [teacher_config.total_ut_steps]
        kd_positions, kd_count = positions[phase.kd_tokens]
        with torch.set_grad_enabled(phase.w_kd > 0 and torch.is_grad_enabled()):
            parts.append(
                (
                    phase.w_kd,
                    logit_distillation_loss(
                        student_logits,
                        teacher_logits,
                        kd_positions,
                        temperature=kd.temperature,
                        kind=kd.kind,
                        top_k=kd.top_k,
                        all_loops=kd.all_loops,
                        normalizer=kd_count,
                        loop_numbers=loop_numbers,
                    ),
                )
            )
        with torch.set_grad_enabled(phase.w_ce > 0 and torch.is_grad_enabled()):
            ce = LossSection.model_validate({"kind": "last_loop_ce", "per_loop_metrics": phase.per_loop_metrics})
            parts.append((phase.w_ce, lm_loss(ce, student, labels, counts.labelled)))
        total = sum(weight * part.total for weight, part in parts if weight > 0)
        assert isinstance(total, torch.Tensor)  # some weight is > 0 (DistillPhaseSection's check)
        metrics, metric_tokens = {}, {}
        for _, part in parts:  # each part's means are over its own tokens
            metrics.update(part.metrics)
            metric_tokens.update({name: part.num_tokens for name in part.metrics})
        labelled = positions["labelled"][0].sum()
        return MicroStepOutput(
            LossOutput(total, labelled, metrics, metric_tokens), gate_stats(student), {"teacher": teacher_s}
        )

    # -- the end
    def after_fit(self, run_dir: Path) -> None:
        """The teacher's weights as held now vs its checkpoint, by sha256 per tensor (in the held
        dtype): <run_dir>/teacher_check.json, written by rank 0."""
        if self.teacher is None or not self.teacher_section.verify_unchanged:
            return
        assert self.teacher_dir is not None  # build_model sets it with the teacher
        tensors = CheckpointTensors(self.teacher_dir) if comm.rank() == 0 else None
        report = {}
        for name, held in self.teacher.full_tensors():
            if held is None:  # ranks other than 0
                continue
            assert tensors is not None  # rank 0, which holds the full tensors, reads the checkpoint
            if name not in tensors:
                continue
            report[name] = {
                "held_sha256": tensor_digest(held),
                "checkpoint_sha256": tensor_digest(tensors(name).to(held.dtype)),
                "dtype": str(held.dtype).removeprefix("torch."),
                "shape": list(held.shape),
            }
        if comm.rank() == 0:
            changed = sorted(n for n, r in report.items() if r["held_sha256"] != r["checkpoint_sha256"])
            result = {"teacher": str(self.teacher_dir), "unchanged": not changed, "changed": changed, "tensors": report}
            write_durable(Path(run_dir) / TEACHER_CHECK, json.dumps(result, indent=1, sort_keys=True))
            if changed:
                log.error(f"the teacher's weights differ from {self.teacher_dir}: {changed}")
            else:
                log.info(f"teacher unchanged: {len(report)} tensors match {self.teacher_dir} (sha256)")
        comm.barrier()
