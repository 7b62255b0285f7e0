"""One rank of `deepspeed --num_gpus N --module tests.distributed.zero_state_worker OUT CONFIG_JSON`:
a real ZeRO-3 training step of a tiny run config on CPU (the trainer's engine), plus a frozen
teacher built as the distill phase builds it; writes what each rank holds (bytes) to OUT.

Bytes are read from DeepSpeed's own buffers, by storage (a buffer shared by two names counts once):
params (each parameter's partition, plus persistent parameters kept whole), grads (the gradient
partitions' flat buffer and the reduce bucket), optimizer (the fp32 master partition when it is a
copy, and Adam's moments), teacher (the frozen model's partitions and persistent parameters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_params(module) -> int:
    parts = [p.ds_tensor for p in module.parameters()]
    whole = [p.data for p in module.parameters() if getattr(p, "ds_persist", False)]
    return storage_bytes(parts) + storage_bytes(whole)


def main(out: str, config_json: str) -> None:
    from pipeline.distributed import resolve_distributed_env
    from pipeline.models import LoopLMConfig, LoopLMForCausalLM
    from pipeline.training import comm
    from pipeline.training.config import validate_run_config
    from pipeline.training.engines import build_engine
    from pipeline.training.engines.deepspeed import DeepSpeedEngine
    from pipeline.training.losses import TokenCounts
    from pipeline.training.phases.pretrain import PretrainPhase

    env = resolve_distributed_env()
    cfg = validate_run_config(json.loads(Path(config_json).read_text()))
    engine = build_engine(cfg, env)
    assert isinstance(engine, DeepSpeedEngine)  # the config's default engine, whose buffers are read below
    assert cfg.model.config is not None  # phase pretrain
    engine.init_distributed()
    phase = PretrainPhase(cfg)
    model = phase.build_model(engine)
    engine.prepare(model, phase.parameter_groups(model, engine), lambda s: 1.0, cfg.optimizer.betas, cfg.optimizer.eps)
    with engine.frozen_init_context(False):
        teacher = LoopLMForCausalLM(LoopLMConfig(**cfg.model.config))
    frozen = engine.build_frozen(teacher)

    vocab = cfg.model.config["vocab_size"]
    ids = torch.randint(0, vocab, (cfg.data.micro_batch_size, 32), generator=torch.Generator().manual_seed(env.rank))
    frozen(input_ids=ids, use_cache=False)
    tokens = float(ids.numel() * env.world_size)
    out_step = phase.micro_step(
        engine.forward,
        {"input_ids": ids, "labels": ids},
        TokenCounts(labelled=31.0 * ids.shape[0] * env.world_size, real=tokens),
    )
    engine.backward(out_step.losses.total)
    engine.optimizer_step()

    opt = engine._engine.optimizer
    low_flat = [t for t in opt.fp16_partitioned_groups_flat if t is not None]
    low_ptrs = {t.untyped_storage().data_ptr() for t in low_flat}
    master = [t for t in opt.fp32_partitioned_groups_flat if t.untyped_storage().data_ptr() not in low_ptrs]
    moments = [v for state in opt.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    buckets = [b.buffer for b in opt.ipg_buckets.values() if getattr(b, "buffer", None) is not None]
    held = {
        "rank": env.rank,
        "params": held_params(engine.module),
        "grads": storage_bytes([opt.grad_partitions_flat_buffer]) + storage_bytes(buckets),
        "grad_partitions": storage_bytes([opt.grad_partitions_flat_buffer]),
        "reduce_bucket": storage_bytes(buckets),
        "optimizer": storage_bytes(master) + storage_bytes(moments),
        "master": storage_bytes(master),
        "teacher": held_params(frozen.module),
        "partition_stats": engine.partition_stats().as_dict(),
    }
    stats = comm.all_gather_object(held)
    if env.rank == 0:
        Path(out).write_text(json.dumps(stats))
    engine.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
