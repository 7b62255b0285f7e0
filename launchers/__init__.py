"""Launchers: SLURM (submitit) and local."""
