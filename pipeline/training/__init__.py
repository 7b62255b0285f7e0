"""Training: losses, phases, schedules, engines, data, checkpointing, logging."""
