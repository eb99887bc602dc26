"""The executor contract: built the same way from the sweep, run a trial's stages in order, and
report a batch done only when the ledger holds its worker's acknowledgement."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gridsearch.backends import Backend
from gridsearch.core.errors import GridsearchError, ignore
from gridsearch.ledger import Ledger
from gridsearch.spec import Sweep
from gridsearch.stages import Stage
from gridsearch.worker import BatchTask
from gridsearch.workspace import Workspace


@dataclass(frozen=True)
class StageJob:
    stage: Stage
    run_id: int  # the ledger's stage run whose batches the workers acknowledge
    phases: list[list[int]]  # batch indices; a phase's batches may run together, phases in order
    config_path: Path
    foreground: str
    contours: str
    trial_key: str

    @property
    def n_batches(self) -> int:
        return sum(len(p) for p in self.phases)


@dataclass(frozen=True)
class ExecutorContext:
    """Everything an executor may use; every executor is constructed from this alone."""

    sweep: Sweep
    ws: Workspace
    backend: Backend
    ledger: Ledger
    notify: Callable[[str], None] = ignore  # one line for the person watching (waits, outages)


class StageFailed(Exception):
    """A batch failed; `log` names the file that holds its output."""

    def __init__(self, stage: Stage, batch: int | None, reason: str, log: Path | None = None,
                 tail: str = "") -> None:
        self.stage, self.batch, self.reason, self.log, self.tail = stage, batch, reason, log, tail
        where = f" batch {batch}" if batch is not None else ""
        see = f" (log: {log})" if log else ""
        super().__init__(f"{stage.label}{where} failed: {reason}{see}")


class SweepCancelled(GridsearchError):
    """The sweep's jobs were withdrawn from outside: stop the sweep, not just this trial."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{why}; run the same command again to resume")


class Events(Protocol):
    def stage_started(self, stage: Stage, n_batches: int) -> None: ...
    def batch_done(self, stage: Stage, batch: int) -> None: ...
    def stage_done(self, stage: Stage) -> None: ...


@dataclass(eq=False)
class Handle:
    """One unit of work in flight (a trial's stage jobs on one database): `error` is set, or
    `finished` is true, once the executor is done with it."""

    jobs: list[StageJob]
    events: Events
    finished: bool = False
    error: BaseException | None = None

    def end(self, error: BaseException | None = None) -> None:
        self.finished, self.error = True, error


class Executor(abc.ABC):
    """`run` blocks on one trial's stages (the serial path). Executors that can run several units
    at once (`concurrent`) also implement `start` + `poll`: one poll advances every unit in flight,
    so a sweep's branches share one watcher (one scheduler call per poll on SLURM)."""

    concurrent = False

    def __init__(self, ctx: ExecutorContext) -> None:
        self.ctx = ctx

    def start(self, jobs: Sequence[StageJob], events: Events) -> Handle:
        raise NotImplementedError(f"{type(self).__name__} runs one unit at a time")

    def poll(self) -> list[Handle]:
        """Advance every unit in flight (waiting a little if nothing moved); the ones that ended."""
        raise NotImplementedError(f"{type(self).__name__} runs one unit at a time")

    @property
    def frames_per_batch(self) -> int:
        """Frames per batch (ultrack's n_workers): the executor's choice, it does not change results."""
        return 1

    @abc.abstractmethod
    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        """Run every job in order; raise StageFailed at the first failure, after stopping the rest."""

    def reattach(self, trial_key: str, first: Stage, database: str) -> dict[Stage, int]:
        """{stage: run id} of jobs a killed driver left running for this trial (from `first` on)
        on `database`: the engine then keeps the database and those runs. Empty: nothing to
        re-attach."""
        return {}

    def withdraw_earlier(self) -> None:  # noqa: B027 (optional hook)
        """Stop whatever an earlier (killed) driver left running, and wait until it is gone: before
        databases are copied (a template must have no sessions) or dropped under it."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release workers; called once when the sweep ends (also on errors and signals)."""

    def task(self, job: StageJob, batch: int | None) -> BatchTask:
        """What a worker is told to run for ``batch`` of ``job``."""
        return BatchTask(job.stage.label, str(job.config_path), job.foreground, job.contours,
                         self.ctx.backend.worker_ledger_url, job.run_id, batch)

    def report_acknowledged(self, jobs: Sequence[StageJob], reported: set[tuple[int, int]],
                            events: Events) -> dict[int, set[int]]:
        """Report every batch newly acknowledged in the ledger; returns the acknowledgements."""
        acked = self.ctx.ledger.acked(j.run_id for j in jobs)
        for job in jobs:
            for batch in sorted(acked[job.run_id]):
                if (job.run_id, batch) not in reported:
                    reported.add((job.run_id, batch))
                    events.batch_done(job.stage, batch)
        return acked


class ConcurrentExecutor(Executor):
    """An executor whose units advance together through `start` + `poll`: the serial path is one
    unit started and polled until it ends."""

    concurrent = True

    @abc.abstractmethod
    def start(self, jobs: Sequence[StageJob], events: Events) -> Handle: ...

    @abc.abstractmethod
    def poll(self) -> list[Handle]: ...

    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        handle = self.start(jobs, events)
        while not handle.finished:
            self.poll()
        if handle.error is not None:
            raise handle.error
