"""Phase distill on one process: config checks, student/teacher construction, the losses of
micro_step (zero for a student identical to its teacher), normalisation, teacher forcing."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltForCausalLM
from pipeline.training.config import ConfigError, load_run_config, load_run_configs_by_phase
from pipeline.training.engines.base import FrozenModel, PartitionStats
from pipeline.training.losses import TokenCounts
from pipeline.training.metrics import StepMetrics
from pipeline.training.phases import build_phase
from pipeline.training.phases.distill import DistillPhase, LayerInputRecorder

from .test_phases import LocalEngine as PlainLocalEngine
from .test_phases import batch  # random ids, a masked prompt

REPO = Path(__file__).resolve().parents[2]
SMOKE_DISTILL = REPO / "configs/smoke/distill.yaml"
ARCH = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    total_ut_steps=3,
    max_position_embeddings=64,
    rope_theta=10000.0,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LocalFrozen(FrozenModel):
    rank = 0

    def __init__(self, model):
        self._model = model

    @property
    def module(self):
        return self._model

    def __call__(self, **inputs):
        with torch.no_grad():
            return self._model(**inputs)

    def partition_stats(self):
        n = sum(p.numel() for p in self._model.parameters())
        return PartitionStats(0, 1, n, n, 4 * n, 0, 0)

    def gather_full(self, param):
        return param.detach().clone()


class LocalEngine(PlainLocalEngine):
    """What a phase asks of an engine, for one process without partitioning, frozen models too."""

    def frozen_init_context(self, offload_params=False):
        return contextlib.nullcontext()

    def build_frozen(self, model, offload_params=False):
        model.requires_grad_(False)
        return LocalFrozen(model.eval())


def save_looplm(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LoopLMForCausalLM(LoopLMConfig(**{**ARCH, **overrides}))
    with torch.no_grad():  # every loop matters, confident predictions
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "lm_head" in name or "embed" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_looplm(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return save_looplm(tmp_path_factory.mktemp("other"), seed=1)


def distill_cfg(student, teacher, *overrides):
    return load_run_config(
        SMOKE_DISTILL,
        [
            f"model.init_from={student}",
            f"teacher.init_from={teacher}",
            "data.path=/unused",
            "run_dir=/unused",
            *overrides,
        ],
    )


def built(*overrides, student=None, teacher=None):
    phase = build_phase(distill_cfg(student, teacher, *overrides))
    phase.check_inputs()
    return phase, phase.build_model(LocalEngine())


# ----------------------------------------------------------------------------- config


def test_smoke_config_loads_with_the_launcher_keys():
    cfg = load_run_config(
        SMOKE_DISTILL,
        [
            "model.init_from=/s",
            "teacher.init_from=/t",
            "data.path=/d",
            "run_dir=/r",
            "phase.kd.kind=jsd",
            "phase.kd.top_k=8",
        ],
    )
    assert cfg.phase.name == "distill" and cfg.model.init_from == "/s" and cfg.teacher.init_from == "/t"
    assert (cfg.phase.w_attn, cfg.phase.w_kd, cfg.phase.w_ce) == (1.0, 1.0, 0.0)
    assert cfg.phase.kd.kind == "jsd" and cfg.phase.kd.top_k == 8 and not cfg.teacher.offload_params
    assert cfg.engine.deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["teacher=null"], "phase distill needs a teacher: set teacher.init_from"),
        (["teacher.offload=true"], "config key 'teacher.offload': unknown key"),
        (["phase.kd.kind=kl"], "config key 'phase.kd.kind'"),
        (["phase.kd.temperature=0"], "config key 'phase.kd.temperature'"),
        (["phase.kd.top_k=0"], "config key 'phase.kd.top_k'"),
        (["phase.w_attn=-1"], "config key 'phase.w_attn'"),
        (["phase.w_attn=0", "phase.w_kd=0"], "w_attn, w_kd and w_ce are all 0"),
        (["phase.alpha.end=1"], "config key 'phase.alpha': unknown key"),  # distill runs at alpha = 1
        (["phase.melt_options={alpha: 0.5}"], r"melt_options may not set \['alpha'\]"),
        (["model.init_from=null", "model.config={hidden_size: 8}"], "phase distill starts from a MELT"),
        (["phase.per_loop_metrics=false", "phase.kd.all_loops=true"], "kd.all_loops needs every loop's logits"),
    ],
)
def test_bad_distill_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        distill_cfg("/s", "/t", *overrides)


def test_teacher_only_for_distill():
    with pytest.raises(ConfigError, match="teacher is only used by phase distill"):
        load_run_config(REPO / "configs/smoke/transition.yaml", ["teacher.init_from=/t"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_hidden_layers=3", "num_hidden_layers: teacher 2, student 3"),
        ("total_ut_steps=2", "total_ut_steps: teacher 3, student 2"),
        ("num_attention_heads=8", "num_attention_heads: teacher 4, student 8"),
    ],
)
def test_teacher_and_student_architectures_must_match(teacher_dir, tmp_path, override, message):
    key, value = override.split("=")
    student = save_looplm(tmp_path / "student", **{key: int(value)})
    phase = build_phase(distill_cfg(student, teacher_dir))
    with pytest.raises(ConfigError, match="'teacher.init_from' and 'model.init_from'.*" + message):
        phase.check_inputs()
    with pytest.raises(ConfigError, match=message):  # also at build time (hub names are resolved only then)
        phase.build_model(LocalEngine())


def test_teacher_must_be_a_looplm_and_a_melt_student_keeps_its_gate(teacher_dir, tmp_path):
    melt = MeltForCausalLM.from_looplm(teacher_dir, gate="headwise", chunk_size=4, alpha=0.5)
    melt.save_pretrained(tmp_path / "melt")
    with pytest.raises(ConfigError, match="'teacher.init_from': .* is a MELT checkpoint"):
        build_phase(distill_cfg(teacher_dir, tmp_path / "melt")).check_inputs()
    with pytest.raises(ConfigError, match="'phase.gate': 'elementwise', but the MELT checkpoint .* 'headwise'"):
        build_phase(distill_cfg(tmp_path / "melt", teacher_dir, "phase.gate=elementwise")).check_inputs()
    with pytest.raises(ConfigError, match="'teacher.init_from': .* does not exist"):
        build_phase(distill_cfg(teacher_dir, tmp_path / "nope")).check_inputs()


def test_experiment_configs_have_a_distill_section():
    for size in ("1.4b", "2.6b"):
        runs = load_run_configs_by_phase(REPO / "configs/ouro" / f"{size}.yaml")
        cfg = runs["distill"]
        assert cfg.phase.name == "distill" and cfg.teacher.init_from == f"ByteDance/Ouro-{size.upper()}"
        assert (
            cfg.model.init_from == f"runs/ouro-{size}-melt/transition/export" == runs["transition"].run_dir + "/export"
        )
        assert cfg.run_dir == f"runs/ouro-{size}-melt/distill"
        assert cfg.engine.precision == "bf16" and cfg.engine.deepspeed["zero_optimization"]["stage"] == 3
        assert cfg.phase.chunk_size == runs["transition"].phase.chunk_size


# ----------------------------------------------------------------------------- models and losses


def test_student_from_a_looplm_gets_fresh_gates_and_the_teacher_is_frozen(teacher_dir):
    phase, student = built("phase.chunk_size=5", student=teacher_dir, teacher=teacher_dir)
    assert isinstance(student, MeltForCausalLM) and student.config.alpha == 1.0
    assert student.config.chunk_size == 5 and student.config.gate == "elementwise"
    assert float(student.model.layers[0].kv_gate.proj.weight.detach().abs().max()) == 0.0
    teacher = phase.frozen_models()["teacher"].module
    assert isinstance(teacher, LoopLMForCausalLM) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = LoopLMForCausalLM.from_pretrained(teacher_dir)
    for name, p in reference.named_parameters():
        assert torch.equal(dict(teacher.named_parameters())[name], p), name
        assert torch.equal(dict(student.named_parameters())[name], p), name
    groups = phase.parameter_groups(student)
    assert {g.name for g in groups} == {"gates", "attention", "other"}
    assert not any(p.requires_grad for p in teacher.parameters())  # the student's groups never touch it


def test_student_from_a_melt_checkpoint_keeps_its_gates_at_alpha_one(teacher_dir, tmp_path):
    melt = MeltForCausalLM.from_looplm(teacher_dir, gate="headwise", chunk_size=4, alpha=0.5)
    with torch.no_grad():
        for layer in melt.model.layers:
            layer.kv_gate.proj.weight.normal_(0, 0.1)
    melt.save_pretrained(tmp_path / "melt")
    phase, student = built("phase.chunk_size=6", student=tmp_path / "melt", teacher=teacher_dir)
    assert student.config.gate == "headwise" and student.config.alpha == 1.0 and student.config.chunk_size == 6
    for name, p in melt.named_parameters():
        assert torch.equal(dict(student.named_parameters())[name], p), name
    student.set_alpha(0.3)
    assert phase.begin_step(student, 0) == {} and student.config.alpha == 1.0


@pytest.mark.parametrize("forcing", [False, True])
def test_a_student_identical_to_the_teacher_has_zero_alignment_and_kl(teacher_dir, forcing):
    """MELT at alpha = 0 from the teacher's weights is the teacher (any chunk size): both losses 0."""
    phase, student = built(
        "phase.chunk_size=5",
        "phase.w_ce=0.5",
        f"phase.teacher_forcing={forcing}",
        "phase.kd.all_loops=true",
        student=teacher_dir,
        teacher=teacher_dir,
    )
    student.set_alpha(0.0)
    b = batch()
    out = phase.micro_step(student, b, TokenCounts(57.0, 57.0))
    m = out.losses.metrics
    assert int(out.losses.num_tokens) == 3 * 23 - 4
    for key in ["align", "align/layer0", "align/layer1", "kl", "kl_loop1", "kl_loop2", "kl_loop3"]:
        assert float(m[key]) == pytest.approx(0.0, abs=1e-6), key  # float32 rounding only
    # what is left is w_ce x CE of the (teacher-equal) student, normalised by the given count
    assert float(m["ce"]) > 1.0
    torch.testing.assert_close(out.losses.total, 0.5 * m["ce"] * out.losses.num_tokens / 57.0, rtol=1e-5, atol=1e-6)
    assert out.timings["teacher"] > 0 and "gates/layer0/mean" in out.stats
    # at alpha = 1 (what the phase trains) the student differs: alignment and KL are positive
    student.set_alpha(1.0)
    m = phase.micro_step(student, b, TokenCounts(57.0, 57.0)).losses.metrics
    assert float(m["align"]) > 1e-3 and float(m["kl"]) > 1e-4


@pytest.mark.parametrize("align,kd", [("real", "labelled"), ("labelled", "real")])
def test_losses_are_weighted_sums_and_split_invariant(teacher_dir, other_dir, align, kd):
    """Each part normalised by the global count of its own tokens: micro-batches with the global counts
    sum to the whole batch's loss (and gradient), whatever the split, and the step's logged means
    (each part weighted by its own tokens) equal the whole batch's."""
    phase, student = built(
        "phase.w_attn=0.7",
        "phase.w_kd=1.3",
        "phase.w_ce=0.2",
        "phase.kd.temperature=2",
        "phase.kd.top_k=16",
        f"phase.align_tokens={align}",
        f"phase.kd_tokens={kd}",
        student=other_dir,
        teacher=teacher_dir,
    )
    b = batch(size=(4, 24))
    counts = TokenCounts.of(b)
    assert counts == TokenCounts(labelled=4 * 23 - 4, real=4 * 24)
    whole = phase.micro_step(student, b, counts)
    m = whole.losses.metrics
    expected = 0.7 * m["align"] + 1.3 * m["kl"] + 0.2 * m["ce"]
    torch.testing.assert_close(whole.losses.total.detach(), expected, rtol=1e-5, atol=1e-6)
    assert int(whole.losses.num_tokens) == counts.labelled
    whole.losses.total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    parts, logged = 0.0, StepMetrics()
    for rows in (slice(0, 1), slice(1, 4)):  # uneven split, different token counts (row 0 has a masked prompt)
        out = phase.micro_step(student, {k: v[rows] for k, v in b.items()}, counts)
        out.losses.total.backward()
        parts = parts + out.losses.total.detach()
        logged.add(out)
    torch.testing.assert_close(parts, whole.losses.total.detach(), rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for n, g in grads.items() if ".kv_gate." in n)
    step = logged.reduce()
    for key in ("align", "align/layer1", "kl", "kl_loop2", "ce"):
        assert step[f"train/{key}"] == pytest.approx(float(m[key]), rel=1e-5), key


@pytest.mark.parametrize("align", ["real", "labelled"])
def test_unlabelled_tokens_are_aligned_by_default(teacher_dir, other_dir, align):
    """A row without any label (a prompt, the end of a document): its slots feed later tokens, so by
    default (align_tokens real) its attention is aligned; align_tokens labelled leaves it out."""
    phase, student = built(
        "phase.w_kd=0", "phase.w_ce=0", f"phase.align_tokens={align}", student=other_dir, teacher=teacher_dir
    )
    b = batch(size=(2, 24))
    b["labels"][0] = -100
    counts = TokenCounts.of(b)
    out = phase.micro_step(student, {k: v[:1] for k, v in b.items()}, counts)  # the unlabelled row alone
    out.losses.total.backward()
    moved = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)
    if align == "real":
        assert float(out.losses.metrics["align"]) > 1e-3 and moved > 0
        torch.testing.assert_close(out.losses.total, out.losses.metrics["align"] * 24 / counts.real)
    else:
        assert float(out.losses.total) == 0.0 and moved == 0.0


def test_right_padding_is_neither_aligned_nor_counted(teacher_dir, other_dir):
    """Rows padded on the right (chat `--pack pad`: segment id 0 on the padding, no attention mask):
    the padding is not a real token, so it is neither aligned nor counted; a padded row's alignment
    loss equals that of its real tokens alone."""
    phase, student = built("phase.w_kd=0", "phase.w_ce=0", student=other_dir, teacher=teacher_dir)
    assert phase.section.align_tokens == "real"  # the default
    b = batch(size=(1, 24))
    b["input_ids"][0, 16:] = 0
    b["labels"][0, 16:] = -100
    b["segment_ids"] = (torch.arange(24) < 16).long()[None]
    counts = TokenCounts.of(b)
    assert counts.real == 16
    alone = {"input_ids": b["input_ids"][:, :16], "labels": b["labels"][:, :16]}
    assert TokenCounts.of(alone) == counts
    padded, real = (phase.micro_step(student, rows, counts).losses for rows in (b, alone))
    assert float(real.metrics["align"]) > 1e-3
    torch.testing.assert_close(padded.total, real.total, rtol=1e-5, atol=1e-7)


def test_last_loop_logits_only_give_the_same_loss_and_gradient(teacher_dir, other_dir):
    """per_loop_metrics false (for large vocabularies): the same loss and gradients from the last
    loop's logits alone; only the per-loop KL metrics of the other loops are gone."""
    overrides = ("phase.w_attn=0.5", "phase.w_kd=1.0", "phase.w_ce=0.3")
    results = []
    for per_loop in (True, False):
        phase, student = built(*overrides, f"phase.per_loop_metrics={per_loop}", student=other_dir, teacher=teacher_dir)
        out = phase.micro_step(student, batch(size=(2, 24)), TokenCounts(40.0, 40.0))
        out.losses.total.backward()
        results.append((out.losses, {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    (full, full_grads), (last, last_grads) = results
    torch.testing.assert_close(last.total, full.total, rtol=1e-6, atol=1e-7)
    assert full_grads.keys() == last_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(last_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert {"kl_loop1", "kl_loop2", "kl_loop3"} <= set(full.metrics) and "kl_loop1" not in last.metrics
    for key in ("kl_loop3", "kl", "ce", "align"):
        torch.testing.assert_close(last.metrics[key], full.metrics[key], rtol=1e-6, atol=1e-7)


def test_left_padded_rows_are_masked_in_both_models(teacher_dir, other_dir):
    """The batch's attention mask reaches teacher and student: padded rows score as if unpadded."""
    phase, student = built("phase.w_ce=1", student=other_dir, teacher=teacher_dir)
    b = batch()
    b["input_ids"][:, :4] = 0
    b["labels"][:, :5] = -100  # nothing is predicted from the padding
    b["attention_mask"] = (torch.arange(24) >= 4).long().expand(3, 24)
    with torch.no_grad():
        masked = phase.micro_step(student, b, TokenCounts(10.0, 10.0)).losses
        unmasked = phase.micro_step(
            student, {k: v for k, v in b.items() if k != "attention_mask"}, TokenCounts(10.0, 10.0)
        ).losses
        alone = phase.micro_step(
            student, {"input_ids": b["input_ids"][:, 4:], "labels": b["labels"][:, 4:]}, TokenCounts(10.0, 10.0)
        ).losses
    for key in ("align", "kl", "ce"):
        torch.testing.assert_close(masked.metrics[key], alone.metrics[key], rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.allclose(masked.metrics[key], unmasked.metrics[key]), key


def test_loss_weights_zero_out_gradients_of_unused_parts(teacher_dir, other_dir):
    """w_kd = w_ce = 0: only the alignment trains (lm_head gets no gradient); the other parts are still logged."""
    phase, student = built("phase.w_kd=0", "phase.w_ce=0", student=other_dir, teacher=teacher_dir)
    out = phase.micro_step(student, batch(), TokenCounts(40.0, 40.0))
    assert {"align", "kl", "ce", "kl_loop1", "ce_loop3"} <= set(out.losses.metrics)
    out.losses.total.backward()
    assert student.lm_head.weight.grad is None
    assert student.model.layers[1].self_attn.q_proj.weight.grad.abs().max() > 0


def test_teacher_forcing_gives_each_layer_the_teachers_input(teacher_dir, other_dir):
    teacher = LoopLMForCausalLM.from_pretrained(teacher_dir).eval()
    ids = batch()["input_ids"]
    recorder = LayerInputRecorder(teacher.model.layers)
    with torch.no_grad(), recorder:
        out = teacher(input_ids=ids, use_cache=False)
    inputs = recorder.inputs
    assert len(inputs) == 3 and len(inputs[0]) == 2 and inputs[0][0].shape == (3, 24, 32)
    torch.testing.assert_close(inputs[0][0], teacher.model.embed_tokens(ids))
    with torch.no_grad():  # outside the `with`, nothing is recorded
        teacher(input_ids=ids, use_cache=False)
    assert len(recorder.calls[0]) == 3
    # MELT at alpha = 0 from the teacher, forced with the teacher's inputs: the teacher's output
    melt = MeltForCausalLM.from_looplm(teacher_dir, chunk_size=5, alpha=0.0).eval()
    with torch.no_grad():
        forced = melt(input_ids=ids, use_cache=False, layer_inputs=inputs)
    torch.testing.assert_close(forced.logits, out.logits, rtol=1e-5, atol=1e-5)
    # a different student: forcing replaces every layer's input (its own embedding does not matter)
    other = MeltForCausalLM.from_looplm(other_dir, chunk_size=5).eval()
    with torch.no_grad():
        plain = other(input_ids=ids, use_cache=False, output_attention_outputs=True)
        forced = other(input_ids=ids, use_cache=False, output_attention_outputs=True, layer_inputs=inputs)
        other.model.embed_tokens.weight.mul_(3.0)
        again = other(input_ids=ids, use_cache=False, output_attention_outputs=True, layer_inputs=inputs)
    assert not torch.allclose(plain.logits, forced.logits)
    torch.testing.assert_close(again.logits, forced.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer_inputs must hold 3 loops x 2 layers"):
        other(input_ids=ids, use_cache=False, layer_inputs=inputs[:2])


def test_teacher_check_reports_an_unchanged_and_a_changed_teacher(teacher_dir, tmp_path):
    phase, _ = built(student=teacher_dir, teacher=teacher_dir)
    phase.after_fit(tmp_path)
    report = json.loads((tmp_path / "teacher_check.json").read_text())
    assert report["unchanged"] and len(report["tensors"]) == 27
    with torch.no_grad():
        phase.teacher.module.model.norm.weight.add_(1e-3)
    phase.after_fit(tmp_path)
    report = json.loads((tmp_path / "teacher_check.json").read_text())
    assert not report["unchanged"] and report["changed"] == ["model.norm.weight"]


def test_preflight_refuses_a_mismatched_teacher_before_writing(teacher_dir, tmp_path, token_dataset):
    from pipeline.distributed import DistEnv
    from pipeline.training.trainer import preflight

    data = token_dataset(tmp_path / "data", num_samples=16, seq_len=8)
    bad = save_looplm(tmp_path / "bad", total_ut_steps=2)
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    env = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "deepspeed")
    run_dir = tmp_path / "run"
    cfg = distill_cfg(copy, bad, f"data.path={data}", f"run_dir={run_dir}")
    with pytest.raises(ConfigError, match="total_ut_steps: teacher 2, student 3"):
        preflight(cfg, env)
    assert not run_dir.exists()
    assert isinstance(build_phase(cfg), DistillPhase)


def test_resuming_with_another_teacher_is_refused(teacher_dir, other_dir, tmp_path, token_dataset):
    """The teacher is not checkpointed (it is reloaded): a resumption must find the same one."""
    from pipeline.distributed import DistEnv
    from pipeline.training.checkpointing import CheckpointManager
    from pipeline.training.train_data import data_fingerprint, read_manifest
    from pipeline.training.trainer import preflight

    data = token_dataset(tmp_path / "data", num_samples=16, seq_len=8)
    run_dir = tmp_path / "run"
    env = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "deepspeed")
    cfg = distill_cfg(teacher_dir, teacher_dir, f"data.path={data}", f"run_dir={run_dir}")
    phase = build_phase(cfg)
    manager = CheckpointManager(run_dir)  # what the trainer's save() leaves, without the engine's files
    manager.begin_save("step_00000004")
    (manager.root / "step_00000004").mkdir()
    manager.finish_save(
        "step_00000004",
        {
            "step": 4,
            "phase": "distill",
            "engine": "deepspeed",
            "fingerprint": data_fingerprint(cfg, read_manifest(data)),
            "phase_identity": phase.resume_identity(),
        },
    )
    assert preflight(cfg, env).resume_tag == "step_00000004"
    moved = tmp_path / "moved"  # the same teacher elsewhere is the same teacher
    shutil.copytree(teacher_dir, moved)
    assert preflight(distill_cfg(teacher_dir, moved, f"data.path={data}", f"run_dir={run_dir}"), env).resume_tag
    other = distill_cfg(teacher_dir, other_dir, f"data.path={data}", f"run_dir={run_dir}")
    with pytest.raises(
        ConfigError,
        match=r"refusing to resume from .*step_00000004: config key 'teacher.init_from': "
        r"checkpoint sha256:\w+, now sha256:\w+",
    ):
        preflight(other, env)
