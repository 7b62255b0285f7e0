"""The training loop: phase x engine x data, with logging, checkpoints, resumption and export.

Everything that can be refused (bad config, missing data or checkpoint, a data
fingerprint that does not match the checkpoint) is refused in `preflight()`, before
any process group starts and before anything is written. Control flow is identical
on every rank: fixed micro-steps per step, collective decisions (non-finite loss,
checkpoint steps), no data-dependent branches.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.distributed import DistEnv
from pipeline.training import comm
from pipeline.training.checkpointing import CheckpointManager, rng_state, seed_everything, set_rng_state, tag_for
from pipeline.training.config import ConfigError, RunConfig
from pipeline.training.engines import build_engine
from pipeline.training.export import export_model, intermediate_export_dir
from pipeline.training.hooks import StepHook, fault_hooks
from pipeline.training.losses import TokenCounts
from pipeline.training.metrics import RunLogger, StepMetrics, setup_console_logging, summarize_partition
from pipeline.training.phases import Phase, build_phase
from pipeline.training.schedules import lr_multiplier
from pipeline.training.step_scalars import StepOutcome, step_scalars
from pipeline.training.train_data import TrainData, check_fingerprint, data_fingerprint, read_manifest, tokenizer_source

log = logging.getLogger("melt.train")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Preflight:
    phase: Phase
    manifest: dict
    fingerprint: dict
    checkpoints: CheckpointManager
    resume_tag: Optional[str]


def preflight(cfg: RunConfig, env: DistEnv) -> Preflight:
    """All checks that need no process group; writes nothing."""
    phase = build_phase(cfg)
    phase.check_inputs()
    manifest = read_manifest(cfg.data.path)
    vocab, key = phase.vocab_size()
    if vocab is not None and manifest.get("vocab_size", 0) > vocab:
        raise ConfigError(
            f"config key {key!r}: the model's vocabulary ({vocab}) is smaller than the dataset's "
            f"({manifest['vocab_size']}, {cfg.data.path})"
        )
    per_step = cfg.data.micro_batch_size * env.world_size
    if cfg.data.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'data.global_batch_size': {cfg.data.global_batch_size} is not a multiple of "
            f"micro_batch_size x world size = {cfg.data.micro_batch_size} x {env.world_size}"
        )
    fingerprint = data_fingerprint(cfg, manifest)
    checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpointing.keep_last)
    tag = checkpoints.latest_tag()
    if tag is not None:
        saved = checkpoints.trainer_state(tag)
        check_fingerprint(saved.get("fingerprint", {}), fingerprint, str(checkpoints.root / tag))
        phase.check_resume(saved.get("phase_identity", {}), str(checkpoints.root / tag))
        if saved.get("phase") not in (None, cfg.phase.name):
            raise ConfigError(
                f"run_dir {cfg.run_dir} holds a {saved['phase']} run; this config is phase "
                f"{cfg.phase.name}: use another run_dir"
            )
        if saved.get("engine", "deepspeed") != cfg.engine.name:  # each engine reads only its own format
            raise ConfigError(
                f"config key 'engine.name': the checkpoints in {checkpoints.root} were written by "
                f"engine {saved.get('engine', 'deepspeed')}, not {cfg.engine.name}: use another run_dir"
            )
    return Preflight(phase, manifest, fingerprint, checkpoints, tag)


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, pre: Preflight):
        self.cfg, self.env, self.pre = cfg, env, pre
        self.phase = pre.phase
        self.run_dir = Path(cfg.run_dir)
        self.engine = build_engine(cfg, env)
        self.engine.init_distributed()
        self.hooks: list[StepHook] = fault_hooks(cfg, env.rank)
        setup_console_logging(env.rank)
        seed_everything(cfg.seed)
        if env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        comm.barrier()

        self.data = TrainData(cfg)
        model = self.phase.build_model(self.engine)
        if cfg.engine.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = self.phase.parameter_groups(model, self.engine)
        sched = cfg.schedule

        def lr_lambda(step: int) -> float:
            return lr_multiplier(
                step, sched.total_steps, sched.warmup_steps, sched.decay, sched.min_lr / cfg.optimizer.lr
            )

        self.engine.prepare(model, groups, lr_lambda, cfg.optimizer.betas, cfg.optimizer.eps)

        self.step = 0
        tag = comm.broadcast_object(pre.resume_tag)
        if tag is not None:
            client = self.engine.load_checkpoint(str(pre.checkpoints.root), tag)["trainer"]
            self.step = int(client["step"])
            self.data.load_state_dict(client["data"])
            set_rng_state(client["rng"])
            log.info(f"resumed from {pre.checkpoints.root / tag} at step {self.step}")
        self.saved_step = self.step if tag is not None else None
        self.stop_step = min(sched.stop_at_step or sched.total_steps, sched.total_steps)

        self.logger = RunLogger(
            self.run_dir, env.rank, cfg.phase.name, sched.total_steps, self.step, cfg.logging.tensorboard
        )
        self.logger.text("config", cfg.to_yaml())
        log.info(
            f"phase {cfg.phase.name}, {env.world_size} rank(s), engine {self.engine.name}, "
            f"{self.engine.grad_accum_steps} micro-step(s) per step, dtype {self.engine.dtype}, "
            f"starting at step {self.step} of {sched.total_steps}"
        )

    def record_partition(self) -> None:
        """Per-rank parameter / optimizer storage (<run_dir>/ranks/rank<r>.json), once the optimizer
        state exists (after the first step)."""
        stats = self.engine.partition_stats().as_dict()
        frozen = {name: model.partition_stats().as_dict() for name, model in self.phase.frozen_models().items()}
        ranks_dir = self.run_dir / "ranks"
        ranks_dir.mkdir(exist_ok=True)
        (ranks_dir / f"rank{self.env.rank}.json").write_text(json.dumps({**stats, **frozen}, indent=1))
        # all_gather_object gives one entry per rank: summarize_partition's None (no entries) cannot come
        summary = summarize_partition(comm.all_gather_object(stats))
        assert summary is not None
        for name, part in frozen.items():  # e.g. the distillation teacher
            frozen_summary = summarize_partition(comm.all_gather_object(part))
            assert frozen_summary is not None
            summary += f"\n{name}:\n" + frozen_summary
        self.logger.text("partition", summary)
        log.info("partitioned storage per rank:\n" + summary)

    # -- one step
    def check_finite(self, loss: torch.Tensor, step: int, micro: int) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        if comm.all_reduce(torch.tensor([float(local_bad)]), "max").item() == 0.0:
            return
        ranks = [r for r, bad in enumerate(comm.all_gather_object(local_bad)) if bad]
        message = f"non-finite loss at step {step} (micro-step {micro + 1}) on rank(s) {ranks}"
        if self.cfg.guards.nonfinite == "stop":
            raise NonFiniteLoss(message + "; stopping (set guards.nonfinite=skip to skip such steps)")
        log.warning(message + "; the optimizer step is skipped")

    def train_step(self) -> dict[str, float]:
        """One optimizer step; its scalars when it is logged ({} otherwise)."""
        cfg, engine = self.cfg, self.engine
        phase_scalars = self.phase.begin_step(engine.module, self.step)
        start = time.perf_counter()
        batches = [self.data.next_batch() for _ in range(engine.grad_accum_steps)]
        local = [TokenCounts.of(b) for b in batches]
        summed = comm.all_reduce(torch.tensor([[c.labelled, c.real] for c in local], dtype=torch.float64).sum(0))
        summed = summed.clamp_min(1.0)
        counts = TokenCounts(labelled=summed[0].item(), real=summed[1].item())
        metrics = StepMetrics()
        lrs = engine.learning_rates()  # those this step's update uses
        compute_s = 0.0  # forward + backward
        side_s: dict[str, float] = {}  # the phase's other work (e.g. a teacher's forward)
        for micro, batch in enumerate(batches):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            began = time.perf_counter()
            out = self.phase.micro_step(engine.forward, batch, counts)
            for hook in self.hooks:
                hook.after_micro_step(self.step + 1, micro, out)
            self.check_finite(out.losses.total, self.step + 1, micro)
            engine.backward(out.losses.total)
            if out.timings and engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            compute_s += time.perf_counter() - began
            for name, seconds in out.timings.items():
                side_s[name] = side_s.get(name, 0.0) + seconds
            metrics.add(out)
        result = engine.optimizer_step()
        self.step += 1
        elapsed = time.perf_counter() - start
        if not (self.step % cfg.logging.every == 0 or self.step == self.stop_step):
            return {}
        outcome = StepOutcome(
            self.step,
            phase_scalars,
            lrs,
            result,
            cfg.data.global_batch_size,
            batches[0]["input_ids"].shape[1],
            elapsed,
            compute_s,
            side_s,
        )
        return step_scalars(outcome, metrics.reduce(), engine.memory_stats())  # reduce: collective

    # -- checkpoints and export
    def save(self) -> None:
        tag = tag_for(self.step)
        root = self.pre.checkpoints.begin_save(tag)
        state = {
            "step": self.step,
            "phase": self.cfg.phase.name,
            "engine": self.engine.name,
            "fingerprint": self.pre.fingerprint,
            "phase_identity": self.phase.resume_identity(),
            "data": self.data.state_dict(),
            "samples_seen": self.step * self.cfg.data.global_batch_size,
        }
        self.engine.save_checkpoint(root, tag, {"trainer": {**state, "rng": rng_state()}})
        for hook in self.hooks:
            hook.before_checkpoint_complete(self.step)
        self.pre.checkpoints.finish_save(tag, state)
        self.saved_step = self.step
        log.info(f"checkpoint {self.pre.checkpoints.root / tag}")

    def export(self, out: Path) -> None:
        dtype = getattr(torch, self.cfg.checkpointing.export_dtype)
        info = {"step": self.step, "phase": self.cfg.phase.name, "checkpoint": tag_for(self.step)}
        tokenizer = tokenizer_source(self.cfg.data.path, self.pre.manifest)
        export_model(self.engine, out, dtype, tokenizer, info, run_dir=self.run_dir)
        log.info(f"exported {out}")

    def intermediate_export_due(self) -> bool:
        every = self.cfg.checkpointing.export_every
        return every is not None and self.step % every == 0 and self.step < self.cfg.schedule.total_steps

    # -- the run
    def fit(self) -> None:
        cfg = self.cfg
        total = cfg.schedule.total_steps
        first, began = self.step, time.perf_counter()
        while self.step < self.stop_step:
            scalars = self.train_step()
            if self.step == first + 1:
                self.record_partition()
            if scalars:
                rate = (time.perf_counter() - began) / (self.step - first)
                self.logger.log(self.step, scalars)
                self.logger.console(self.step, scalars, rate * (total - self.step))
            for hook in self.hooks:
                hook.after_step(self.step)
            if self.step % cfg.checkpointing.every == 0 or self.step == self.stop_step:
                self.save()
            if self.intermediate_export_due():
                self.export(intermediate_export_dir(self.run_dir, self.step))
        if self.saved_step != self.step:
            self.save()
        if self.step >= total and cfg.checkpointing.export:
            self.export(self.run_dir / "export")
        self.phase.after_fit(self.run_dir)
        if self.step < total:
            log.info(f"stopped at step {self.step} of {total} (schedule.stop_at_step); rerun to continue")

    def close(self) -> None:
        self.logger.close()
        self.engine.close()


def run(cfg: RunConfig, env: DistEnv) -> None:
    pre = preflight(cfg, env)
    trainer = Trainer(cfg, env, pre)
    try:
        trainer.fit()
    except NonFiniteLoss:
        trainer.close()  # decided on every rank together: a clean shutdown
        raise
    except BaseException:
        trainer.logger.close()  # possibly on one rank only: no collective
        raise
    trainer.close()
