"""A worker's acknowledgement that its batch is complete: the last thing it does, in a commit of
its own, in the ledger database. The driver, every executor and resume trust this record alone.

Written from wherever the batch ran (the driver, a pool worker, a SLURM task on another node): the
URL holds no password; libpq finds it in the worker's environment (PGPASSWORD)."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from gridsearch.schema import batch_t


@dataclass(frozen=True)
class BatchCost:
    """What one batch cost: the cost model (gridsearch.costs) is built from these.

    wall_s and cpu_s cover the batch alone, never its worker's start-up: that is ``startup_s``
    (process start to ultrack imported), paid once per process, by the batch with ``paid_startup``.
    None: not known (acks written before schema v3, or a worker that could not tell)."""

    wall_s: float
    cpu_s: float
    max_rss_mb: float
    frames: int | None = None
    startup_s: float | None = None
    paid_startup: bool | None = None

    @staticmethod
    def since(t0: float, cpu0: float, *, frames: int | None = None, startup_s: float | None = None,
              paid_startup: bool | None = None) -> BatchCost:
        return BatchCost(time.perf_counter() - t0, cpu_seconds() - cpu0, max_rss_mb(), frames,
                         startup_s, paid_startup)


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (ultrack's pools)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def max_rss_mb() -> float:
    """Peak resident memory (Linux reports KiB) of this process or its largest child.

    This process's peak is the batch's own when reset_peak_rss() ran before it (a pool worker
    runs many batches); its children's is the largest of any child it ever waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return max(_hwm_kib() or own.ru_maxrss, kids.ru_maxrss) / 1024


def reset_peak_rss() -> None:
    """Linux (>= 4.0): restart this process's peak-RSS count (VmHWM), so that a long-lived worker
    reports each batch's peak, not the largest of all its batches. Elsewhere: a no-op."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_kib() -> int | None:
    """VmHWM, the peak RSS since the last reset_peak_rss() (ru_maxrss never resets)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _engine(url: str) -> sa.Engine:
    connect_args: dict[str, Any] = {"timeout": 60} if url.startswith("sqlite") else {}
    return sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)


def acknowledge(ledger_url: str | sa.Engine, run_id: int, batch: int, cost: BatchCost) -> None:
    """Record batch ``batch`` of stage run ``run_id`` complete. Idempotent: a batch re-run after an
    acknowledged success (a driver that doubted it) keeps the first record."""
    engine = ledger_url if isinstance(ledger_url, sa.Engine) else _engine(ledger_url)
    row = {"run_id": run_id, "batch": batch, "finished_at": time.time(), "host": socket.gethostname(),
           **asdict(cost)}
    try:
        with engine.begin() as conn:
            exists = conn.execute(sa.select(batch_t.c.batch).where(
                batch_t.c.run_id == run_id, batch_t.c.batch == batch)).first()
            if exists is None:
                conn.execute(batch_t.insert().values(**row))
    finally:
        if engine is not ledger_url:
            engine.dispose()
