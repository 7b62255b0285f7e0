"""One training micro-step of a run config, measured in live bytes (real or fake tensors).

The step is the trainer's: the phase's model (LoopLM for pretrain, MELT for transition and
distill) with the phase's trainable selection and activation checkpointing, the phase's own
`micro_step` (teacher forward under no_grad in distill, the phase's loss), then backward.
Gradients are released as soon as they are accumulated (a post-accumulate-grad hook), as
ZeRO-3 and FSDP2 do after reduce-scattering them, so `activations` holds no parameter
gradients; `grads` gives the full model's gradient bytes separately.

With `fake=True` everything runs under `FakeTensorMode` on CPU: no memory is allocated and
the bytes are those real tensors would take (validated against real tensors in
tests/planning/test_plan.py). Regions (teacher, forward, loss, backward) are peaked separately so
that a depth extrapolation can take each region's line and then the maximum.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from pipeline.models.cache import tensor_bytes
from pipeline.planning.inputs import StepInputs, step_inputs
from pipeline.planning.live_bytes import LiveBytes
from pipeline.training.config import DistillPhaseSection, RunConfig, TransitionPhaseSection
from pipeline.training.losses import TokenCounts

REGIONS = ("teacher", "forward", "loss", "backward")


@dataclass
class StepBytes:
    """Bytes of one micro-step at `layers` decoder layers (all counts in bytes)."""

    layers: int
    params: int  # the trained model's parameters (all of them, unsharded)
    frozen: int  # the frozen teacher's parameters (distill), unsharded
    grads: int  # gradients of the trainable parameters (the full model's)
    activations: int  # peak live bytes above params + frozen + batch, gradients released as produced
    regions: dict[str, int] = field(default_factory=dict)  # the activation peak inside each region
    ops: int = 0  # operators dispatched
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class PlanFrozenModel:
    """The distill teacher as the phase sees it (engine.build_frozen's interface): eval mode,
    no gradients, called like the model."""

    def __init__(self, model: nn.Module, on_call: Optional[Callable] = None):
        self._model = model.eval().requires_grad_(False)
        self._on_call = on_call

    @property
    def module(self) -> nn.Module:
        return self._model

    def __call__(self, **inputs) -> Any:
        with self._on_call() if self._on_call else contextlib.nullcontext(), torch.no_grad():
            return self._model(**inputs)


def build_models(cfg: RunConfig, inputs: StepInputs, layers: Optional[int]):
    """(phase, model, teacher or None), built in the current tensor mode and default dtype."""
    from pipeline.models import LoopLMForCausalLM, MeltConfig, MeltForCausalLM
    from pipeline.training.phases import build_phase

    phase = build_phase(cfg)
    source = inputs.model.looplm_config(layers)
    model: LoopLMForCausalLM | MeltForCausalLM
    if inputs.phase == "pretrain":
        model = LoopLMForCausalLM(source)
    elif inputs.phase == "transition":
        p = cfg.phase
        assert isinstance(p, TransitionPhaseSection)  # inputs.phase is cfg's
        config = MeltConfig.from_looplm_config(
            source, gate=p.gate, chunk_size=p.chunk_size, alpha=inputs.alpha, **p.melt_options
        )
        model = MeltForCausalLM(config)
    else:
        from pipeline.training.phases.distill import DistillPhase

        assert isinstance(phase, DistillPhase)  # build_phase(cfg) of cfg's phase, which inputs.phase names
        model = MeltForCausalLM(phase.melt_config(source))
    teacher = LoopLMForCausalLM(inputs.teacher.looplm_config(layers)) if inputs.teacher is not None else None
    return phase, model, teacher


def make_batch(inputs: StepInputs, vocab_size: int) -> dict[str, torch.Tensor]:
    """input_ids and labels (a copy, as the trainer's collate makes) of micro_batch x seq_len."""
    ids = torch.randint(0, vocab_size, (inputs.micro_batch, inputs.seq_len))
    return {"input_ids": ids, "labels": ids.clone()}


def release_grads_on_accumulate(model: nn.Module) -> list:
    """Free each parameter's gradient as soon as it is accumulated (ZeRO-3 / FSDP2 reduce-scatter it
    and keep only their partition, counted in the engine's state instead)."""

    def drop(param):
        param.grad = None

    return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]


def _without_gate_stats(out):
    # gate statistics are read back with .tolist() for logging: not possible on fake tensors
    if getattr(out, "gate_stats", None) is not None:
        out.gate_stats = None
    return out


# ----------------------------------------------------------------------------- measuring


def run_step(
    cfg: RunConfig, inputs: StepInputs, layers: Optional[int] = None, release_grads: bool = True, seed: int = 0
) -> StepBytes:
    """Build the models and run one micro-step in the current tensor mode (real or fake), counted."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    with default_dtype(inputs.dtype):
        phase, model, teacher = build_models(cfg, inputs, layers)
    phase.parameter_groups(model)  # the phase's trainable selection (requires_grad)
    model.train()
    if cfg.engine.activation_checkpointing:  # as the trainer enables it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if inputs.alpha is not None and hasattr(model, "set_alpha"):
        model.set_alpha(inputs.alpha)  # what phase.begin_step sets for the measured step
    hooks = release_grads_on_accumulate(model) if release_grads else []
    batch = make_batch(inputs, model.config.vocab_size)
    params = tensor_bytes(*model.parameters())
    grads = tensor_bytes(*(p for p in model.parameters() if p.requires_grad))
    frozen = tensor_bytes(*teacher.parameters()) if teacher is not None else 0

    live = LiveBytes()
    held = [*model.parameters(), *model.buffers(), *batch.values()]
    if teacher is not None:
        held += [*teacher.parameters(), *teacher.buffers()]
    base = live.adopt(held)
    if teacher is not None:
        assert isinstance(cfg.phase, DistillPhaseSection)  # only distill has a teacher
        phase.teacher = PlanFrozenModel(teacher, on_call=lambda: live.label("teacher"))
        if cfg.phase.teacher_forcing:
            from pipeline.training.phases.distill import LayerInputRecorder

            phase.recorder = LayerInputRecorder(teacher.model.layers)

    def forward(**kwargs):
        with live.label("forward"):
            return _without_gate_stats(model(**kwargs))

    counts = TokenCounts(
        labelled=float(inputs.micro_batch * (inputs.seq_len - 1)), real=float(inputs.micro_batch * inputs.seq_len)
    )
    with live:
        with live.label("loss"):  # micro_step: the teacher and the forward have their own labels
            out = phase.micro_step(forward, batch, counts)
        with live.label("backward"):  # the trainer holds `out` (loss and metrics) through its backward
            out.losses.total.backward()
        del out
    for hook in hooks:
        hook.remove()
    regions = {name: max(live.marks.get(name, base) - base, 0) for name in REGIONS if name in live.marks}
    return StepBytes(
        layers=model.config.num_hidden_layers,
        params=params,
        frozen=frozen,
        grads=grads,
        activations=max(live.peak - base, 0),
        regions=regions,
        ops=live.ops,
        seconds=time.perf_counter() - started,
    )


def measure_step(
    run_config: RunConfig,
    seq_len: Optional[int] = None,
    layers: Optional[int] = None,
    fake: bool = True,
    inputs: Optional[StepInputs] = None,
    release_grads: bool = True,
    device: Optional[str | torch.device] = None,
    **resolve,
) -> StepBytes:
    """One micro-step of `run_config` at `layers` decoder layers (default: the model's depth).

    fake=True: under FakeTensorMode on CPU (any size, no memory); fake=False: real tensors (small
    shapes) on `device` (default CPU). `inputs` (from `inputs.step_inputs`) fixes the architecture,
    sequence length, alpha and dtype; otherwise they are resolved from the run config (`resolve`:
    model_config, known, alpha, dtype) with `seq_len`. release_grads=False keeps every gradient in
    `.grad` (a single unsharded device): `activations` then includes them as they accumulate.
    """
    if inputs is None:
        inputs = step_inputs(run_config, seq_len=seq_len, **resolve)
    elif seq_len is not None:
        inputs = replace(inputs, seq_len=seq_len)
    if not fake:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return run_step(run_config, inputs, layers, release_grads)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        return run_step(run_config, inputs, layers, release_grads)


# ----------------------------------------------------------------------------- depth


@dataclass
class DepthEstimate:
    """The step at full depth, extrapolated linearly in the number of layers from two measurements."""

    step: StepBytes  # at the model's depth (extrapolated)
    measured: list[StepBytes]  # the measured runs
    method: str


def extrapolate(a: StepBytes, b: StepBytes, depth: int) -> StepBytes:
    """Each part on the line through (a.layers, a) and (b.layers, b), evaluated at `depth`; the
    activation peak is the largest of the regions' extrapolated peaks."""
    span = b.layers - a.layers

    def line(x: int, y: int) -> int:
        return int(round(x + (y - x) * (depth - a.layers) / span))

    regions = {r: line(a.regions.get(r, 0), b.regions.get(r, 0)) for r in REGIONS if r in a.regions or r in b.regions}
    # the step's peak is one region's peak: the largest of the extrapolated regions
    activations = max(regions.values()) if regions else line(a.activations, b.activations)
    return StepBytes(
        layers=depth,
        params=line(a.params, b.params),
        frozen=line(a.frozen, b.frozen),
        grads=line(a.grads, b.grads),
        activations=activations,
        regions=regions,
        ops=line(a.ops, b.ops),
        seconds=a.seconds + b.seconds,
    )


def measure_depth(
    run_config: RunConfig,
    inputs: StepInputs,
    fake: bool = True,
    layers: tuple[int, int] = (1, 2),
    progress: Optional[Callable[[str], None]] = None,
) -> DepthEstimate:
    """The step at the model's depth from runs at `layers` (default 1 and 2), linear in depth;
    a model no deeper than the largest of them is measured directly."""
    depth = inputs.model.num_layers
    if depth <= max(layers):
        step = measure_step(run_config, layers=depth, fake=fake, inputs=inputs)
        if progress:
            progress(f"measured {depth} layer(s) directly: {step.seconds:.1f} s, {step.ops} ops")
        return DepthEstimate(step, [step], f"measured at the full depth ({depth} layers)")
    runs = []
    for n in layers:
        runs.append(measure_step(run_config, layers=n, fake=fake, inputs=inputs))
        if progress:
            progress(f"measured {n} layer(s): {runs[-1].seconds:.1f} s, {runs[-1].ops} ops")
    step = extrapolate(runs[0], runs[1], depth)
    return DepthEstimate(
        step,
        runs,
        f"{'fake' if fake else 'real'} tensors at {layers[0]} and {layers[1]} layers, "
        f"each region extrapolated linearly to {depth} layers",
    )
