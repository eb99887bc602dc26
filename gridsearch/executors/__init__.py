"""Executors run a trial's stage batches; each is built from an ExecutorContext alone.

- base.py       the contract (StageJob, Events, Executor) and the acknowledgement check
- inprocess.py  whole stages in the driver (SQLite: one writer)
- pool.py       N long-lived local worker processes (PostgreSQL)
- slurm.py      SLURM job arrays, watched by one poller

``create`` picks one from the sweep and the backend; the engine never asks which."""

from __future__ import annotations

from gridsearch.executors.base import Executor, ExecutorContext


def create(ctx: ExecutorContext) -> Executor:
    ex = ctx.sweep.executor
    if ex.kind == "slurm":
        from gridsearch.executors.slurm import SlurmExecutor

        return SlurmExecutor(ctx)
    k = ctx.sweep.parallel
    if ex.workers == 1 and k == 1 and not ctx.backend.parallel_writers:
        from gridsearch.executors.inprocess import InProcessExecutor

        return InProcessExecutor(ctx)
    from gridsearch.executors.pool import PoolExecutor

    if not ctx.backend.parallel_writers:  # SQLite: one writer per database, so one task per stage
        return PoolExecutor(ctx, workers=k, whole_stages=True)
    return PoolExecutor(ctx, workers=max(ex.workers, k))
