"""Distributed engines behind one interface (`Engine`); pick one with `engine.name`."""

from __future__ import annotations

from pipeline.training.engines.base import Engine, ParamGroup, PartitionStats, StepResult


def build_engine(cfg, env) -> Engine:
    name = cfg.engine.name
    if name == "deepspeed":
        from pipeline.training.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env)
    if name == "fsdp":
        from pipeline.training.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, env)
    raise ValueError(f"unknown engine {name!r}")  # the config schema rejects it first


__all__ = ["Engine", "ParamGroup", "PartitionStats", "StepResult", "build_engine"]
