"""Executors run stage batches: locally (in-process or a worker pool) or as SLURM arrays."""
