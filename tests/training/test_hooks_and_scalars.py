"""The trainer's step hooks (fault injection) and the scalars logged for a step, on their own."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.training.config import load_run_config
from pipeline.training.engines.base import StepResult
from pipeline.training.hooks import InjectNonFinite, KillAt, fault_hooks
from pipeline.training.losses import LossOutput
from pipeline.training.phases.base import MicroStepOutput
from pipeline.training.step_scalars import StepOutcome, step_scalars

REPO = Path(__file__).resolve().parents[2]
SMOKE_PRETRAIN = REPO / "configs/smoke/pretrain.yaml"


def micro_output(loss: float = 2.0) -> MicroStepOutput:
    return MicroStepOutput(LossOutput(torch.tensor(loss), torch.tensor(8)))


def test_fault_hooks_come_from_the_guard_and_the_environment(monkeypatch):
    monkeypatch.delenv("MELT_DEBUG_KILL", raising=False)
    assert fault_hooks(load_run_config(SMOKE_PRETRAIN), rank=0) == []
    monkeypatch.setenv("MELT_DEBUG_KILL", "mid_save@3")
    monkeypatch.setenv("MELT_DEBUG_KILL_ONCE", "/tmp/once")
    hooks = fault_hooks(load_run_config(SMOKE_PRETRAIN, ["guards.inject_nonfinite_at_step=2"]), rank=1)
    assert [type(h) for h in hooks] == [InjectNonFinite, KillAt]
    assert (hooks[0].at_step, hooks[0].rank) == (2, 1)
    assert (hooks[1].spec, hooks[1].once) == ("mid_save@3", "/tmp/once")


def test_non_finite_injection_hits_rank_0s_first_micro_step_of_its_step_only():
    hook = InjectNonFinite(at_step=2, rank=0)
    for step, micro in ((1, 0), (2, 1), (3, 0)):
        out = micro_output()
        hook.after_micro_step(step, micro, out)
        assert float(out.losses.total) == 2.0, (step, micro)
    out = micro_output()
    hook.after_micro_step(2, 0, out)
    assert math.isnan(float(out.losses.total))
    other_rank = micro_output()
    InjectNonFinite(at_step=2, rank=1).after_micro_step(2, 0, other_rank)
    assert float(other_rank.losses.total) == 2.0


KILL_SCRIPT = """
import sys
from pipeline.training.hooks import KillAt
hook = KillAt(sys.argv[1], sys.argv[2])
for step in (1, 2, 3):
    hook.after_step(step)
    hook.before_checkpoint_complete(step)
    print("survived", step, flush=True)
"""


def test_kill_point_kills_the_process_group_once(tmp_path):
    """At its point and step the hook SIGKILLs its whole process group (here a session of its own),
    writing the once-file first; a rerun finds the file and runs through. (The other points kill or
    hang the real trainer in tests/distributed and tests/slurm.)"""
    point, once = "after_step", tmp_path / "once"
    cmd = [sys.executable, "-c", KILL_SCRIPT, f"{point}@2", str(once)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert first.stdout.split("\n")[:-1] == ["survived 1"]
    assert once.read_text() == f"{point}@2\n"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True, timeout=120)
    assert rerun.returncode == 0 and rerun.stdout.count("survived") == 3, rerun.stderr


def outcome(side_s: dict[str, float]) -> StepOutcome:
    return StepOutcome(
        step=3,
        phase_scalars={"alpha": 0.25},
        learning_rates={"base": 1e-4, "gates": 1e-3},
        result=StepResult(applied=True, grad_norm=0.5),
        samples_per_step=4,
        seq_len=64,
        elapsed_s=2.0,
        compute_s=1.5,
        side_s=side_s,
    )


def test_step_scalars_name_every_figure_and_split_the_side_work():
    scalars = step_scalars(outcome({"teacher": 0.5}), {"train/loss": 1.25}, {"peak_gib": 3.0})
    tokens = 4 * 64
    assert scalars["train/alpha"] == 0.25 and scalars["train/loss"] == 1.25
    assert scalars["lr/base"] == 1e-4 and scalars["lr/gates"] == 1e-3
    assert scalars["train/grad_norm"] == 0.5 and scalars["train/step_applied"] == 1.0
    assert scalars["train/samples_seen"] == 12.0
    assert scalars["perf/tokens_per_s"] == tokens / 2.0 and scalars["perf/step_time_s"] == 2.0
    # the trained model's forward + backward: the compute time less the teacher's
    assert scalars["perf/student_forward_backward_s"] == 1.0
    assert scalars["perf/student_tokens_per_s"] == tokens / 1.0
    assert scalars["perf/teacher_forward_s"] == 0.5 and scalars["perf/teacher_tokens_per_s"] == tokens / 0.5
    assert scalars["memory/peak_gib"] == 3.0
    plain = step_scalars(outcome({}), {}, {})
    assert not any(k.startswith("perf/student") or k.startswith("perf/teacher") for k in plain)
