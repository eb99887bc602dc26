"""The ledger's record of submitted SLURM arrays, written the moment sbatch returns, so that a driver
killed at any instant can re-attach to its jobs instead of submitting them again.

Row states: active (the trial's run still owns it), closed (the run ended or the array was
superseded: never re-attach), cancelled (`gridsearch cancel`: a running driver stops, the next
sweep starts those stages over). The table is created and versioned by gridsearch.schema."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

from gridsearch.schema import slurm_job_t


@dataclass(frozen=True)
class JobRow:
    id: int
    trial_key: str
    stage: str
    phase: int
    job_id: str
    indices: str  # array indices, compact ranges
    offset: int  # batch = array index + offset
    attempt: int
    state: str
    submitted_at: float
    run_id: int | None  # None: written before arrays knew their stage run (never re-attached)
    frames_per_batch: int | None = None  # what its task indices mean; None: unknown (never re-attached)
    per_task: int | None = None  # batches each task runs in turn (None: 1)


class JobStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def add(self, trial_key: str, stage: str, phase: int, job_id: str, indices: str, offset: int,
            attempt: int, run_id: int, frames_per_batch: int, per_task: int = 1) -> int:
        with self.engine.begin() as c:
            r = c.execute(slurm_job_t.insert().values(
                trial_key=trial_key, stage=stage, phase=phase, job_id=job_id, indices=indices,
                offset=offset, attempt=attempt, state="active", submitted_at=time.time(), run_id=run_id,
                frames_per_batch=frames_per_batch, per_task=per_task))
            return int(r.inserted_primary_key[0])

    def rows(self, trial_key: str | None = None, state: str | None = None) -> list[JobRow]:
        q = sa.select(slurm_job_t).order_by(slurm_job_t.c.id)
        if trial_key is not None:
            q = q.where(slurm_job_t.c.trial_key == trial_key)
        if state is not None:
            q = q.where(slurm_job_t.c.state == state)
        with self.engine.connect() as c:
            return [JobRow(**dict(r)) for r in c.execute(q).mappings()]

    def job_ids(self) -> set[str]:
        """Every job id the ledger ever recorded for this sweep."""
        with self.engine.connect() as c:
            return set(c.execute(sa.select(slurm_job_t.c.job_id).distinct()).scalars())

    def close(self, ids: list[int]) -> None:
        """Active rows only: a `gridsearch cancel` that marked one meanwhile must stay visible."""
        if ids:
            with self.engine.begin() as c:
                c.execute(slurm_job_t.update().where(
                    slurm_job_t.c.id.in_(ids), slurm_job_t.c.state == "active").values(state="closed"))

    def close_trial(self, trial_key: str) -> None:
        with self.engine.begin() as c:
            c.execute(slurm_job_t.update().where(slurm_job_t.c.trial_key == trial_key,
                                                 slurm_job_t.c.state == "active").values(state="closed"))

    def cancelled(self, ids: list[int]) -> bool:
        if not ids:
            return False
        with self.engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).where(
                slurm_job_t.c.id.in_(ids), slurm_job_t.c.state == "cancelled")).scalar_one() > 0

    def mark_all_cancelled(self) -> int:
        with self.engine.begin() as c:
            r = c.execute(slurm_job_t.update().where(slurm_job_t.c.state == "active")
                          .values(state="cancelled"))
            return r.rowcount or 0
