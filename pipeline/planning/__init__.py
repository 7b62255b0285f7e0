"""Memory planning: counting the bytes a training step holds, with real or fake tensors.

- live_bytes.py  LiveBytes, a dispatch mode counting live storage bytes (real or fake tensors)
- inputs.py      what a micro-step of a run config runs on: architectures, sequence length, alpha, dtype
- step.py        one micro-step of the run config, measured: `measure_step(cfg, seq_len, layers, fake)`
                 -> StepBytes; `measure_depth` extrapolates 1- and 2-layer runs to the model's depth
- state.py       the engine's sharded state per GPU (DeepSpeed ZeRO-3, FSDP2), by arithmetic
- planner.py     `plan_run(cfg, nodes, gpus_per_node, gpu_memory, ...)` -> MemoryPlan (per GPU, fits?)
- report.py      the plan as a table and as JSON; GPU memory sizes ("80GB", "80GiB")
The command line is `python -m pipeline.plan` (pipeline/plan.py); the SLURM launcher plans every
GPU train phase before submitting (launchers/memory.py).
"""
