"""Synthetic reasoning tasks (S3 word problem, pointer chasing, modular arithmetic)."""
