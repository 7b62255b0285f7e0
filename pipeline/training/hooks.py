"""Hooks the trainer calls at fixed points of a run: the test aids that inject faults.

The trainer calls every hook of its list at each point (every rank, the same points):

    after_micro_step(step, micro, out)   the micro-step's output, before the finiteness check and backward
    after_step(step)                     after the optimizer step and its logging, before any saving
    before_checkpoint_complete(step)     every rank has written its checkpoint files; not marked complete yet

`step` is the number (1-based) of the step being run, or just run. `fault_hooks` builds the list
from the config and the environment:

- guards.inject_nonfinite_at_step=N: rank 0's first micro-step loss of step N becomes NaN.
- MELT_DEBUG_KILL="<point>@<step>": at `point` of that step rank 0 SIGKILLs its whole process
  group (launcher and all ranks, as when a node dies): "after_step", or "mid_save" (after rank 0
  wrote its checkpoint files, before the checkpoint is marked complete); with "lose_rank" the
  last rank stops answering (as a hung or unreachable node does) until killed; with "hold" rank 0
  waits, as a job whose time runs out does, until a signal (SLURM's USR2) ends it. With
  MELT_DEBUG_KILL_ONCE=FILE the hook fires only while FILE does not exist, and creates it, so a
  requeued or rerun job passes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional, Protocol

from pipeline.training import comm
from pipeline.training.config import RunConfig
from pipeline.training.phases.base import MicroStepOutput


class StepHook(Protocol):
    """What the trainer calls; a hook overrides the points it acts at (the others do nothing: these
    defaults, which an explicit `return None` keeps from being abstract protocol members)."""

    def after_micro_step(self, step: int, micro: int, out: MicroStepOutput) -> None:
        return None

    def after_step(self, step: int) -> None:
        return None

    def before_checkpoint_complete(self, step: int) -> None:
        return None


class InjectNonFinite(StepHook):
    """Makes rank 0's loss of the first micro-step of step `at_step` NaN (tests the non-finite guard)."""

    def __init__(self, at_step: int, rank: int):
        self.at_step, self.rank = at_step, rank

    def after_micro_step(self, step: int, micro: int, out: MicroStepOutput) -> None:
        if step == self.at_step and micro == 0 and self.rank == 0:
            out.losses.total = out.losses.total * float("nan")


class KillAt(StepHook):
    """MELT_DEBUG_KILL=POINT@STEP (see the module docstring)."""

    AFTER_STEP = ("after_step", "lose_rank", "hold")  # the points reached after a step

    def __init__(self, spec: str, once: Optional[str] = None):
        self.spec, self.once = spec, once

    def after_step(self, step: int) -> None:
        for point in self.AFTER_STEP:
            self.maybe_fire(point, step)

    def before_checkpoint_complete(self, step: int) -> None:
        self.maybe_fire("mid_save", step)

    def maybe_fire(self, point: str, step: int) -> None:
        if self.spec != f"{point}@{step}":
            return
        firing = comm.rank() == (comm.world_size() - 1 if point == "lose_rank" else 0)
        if not firing or (self.once and os.path.exists(self.once)):
            return
        if self.once:
            Path(self.once).write_text(f"{point}@{step}\n")
        if point in ("lose_rank", "hold"):
            time.sleep(3600)
        else:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def fault_hooks(cfg: RunConfig, rank: int) -> list[StepHook]:
    """The fault-injection hooks asked for by the config (guards) and MELT_DEBUG_KILL(_ONCE)."""
    hooks: list[StepHook] = []
    if cfg.guards.inject_nonfinite_at_step is not None:
        hooks.append(InjectNonFinite(cfg.guards.inject_nonfinite_at_step, rank))
    spec = os.environ.get("MELT_DEBUG_KILL", "")
    if spec:
        hooks.append(KillAt(spec, os.environ.get("MELT_DEBUG_KILL_ONCE")))
    return hooks
