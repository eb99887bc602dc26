"""A worker's acknowledgement that its batch is complete: the last thing it does, in a commit of
its own, in the ledger database. The driver, every executor and resume trust this record alone.

Written from wherever the batch ran (the driver, a pool worker, a SLURM task on another node): the
URL holds no password; libpq finds it in the worker's environment (PGPASSWORD)."""

from __future__ import annotations

import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from gridsearch.schema import batch_t


@dataclass(frozen=True)
class BatchCost:
    """What one batch cost: the cost model of later sweeps is built from these."""

    wall_s: float
    cpu_s: float
    max_rss_mb: float

    @staticmethod
    def since(t0: float, cpu0: float) -> BatchCost:
        return BatchCost(time.perf_counter() - t0, cpu_seconds() - cpu0, max_rss_mb())


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (ultrack's pools)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def max_rss_mb() -> float:
    """Peak resident memory (Linux reports KiB) of this process or its largest child."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return max(own.ru_maxrss, kids.ru_maxrss) / 1024


def _engine(url: str) -> sa.Engine:
    connect_args: dict[str, Any] = {"timeout": 60} if url.startswith("sqlite") else {}
    return sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)


def acknowledge(ledger_url: str | sa.Engine, run_id: int, batch: int, cost: BatchCost) -> None:
    """Record batch ``batch`` of stage run ``run_id`` complete. Idempotent: a batch re-run after an
    acknowledged success (a driver that doubted it) keeps the first record."""
    engine = ledger_url if isinstance(ledger_url, sa.Engine) else _engine(ledger_url)
    row = {"run_id": run_id, "batch": batch, "finished_at": time.time(), "wall_s": cost.wall_s,
           "cpu_s": cost.cpu_s, "max_rss_mb": cost.max_rss_mb, "host": socket.gethostname()}
    try:
        with engine.begin() as conn:
            exists = conn.execute(sa.select(batch_t.c.batch).where(
                batch_t.c.run_id == run_id, batch_t.c.batch == batch)).first()
            if exists is None:
                conn.execute(batch_t.insert().values(**row))
    finally:
        if engine is not ledger_url:
            engine.dispose()
