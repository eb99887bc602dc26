"""The executor interface: run a trial's stages in order, reporting progress through callbacks."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gridsearch.stages import Stage


@dataclass(frozen=True)
class StageJob:
    stage: Stage
    phases: list[list[int]]  # batch indices; a phase's batches may run together, phases in order
    config_path: Path
    foreground: str
    contours: str
    trial_key: str = ""  # whose stage this is: the SLURM ledger files its jobs under it

    @property
    def n_batches(self) -> int:
        return sum(len(p) for p in self.phases)


class StageFailed(Exception):
    """A batch failed; `log` names the file that holds its output."""

    def __init__(self, stage: Stage, batch: int | None, reason: str, log: Path | None = None,
                 tail: str = "") -> None:
        self.stage, self.batch, self.reason, self.log, self.tail = stage, batch, reason, log, tail
        where = f" batch {batch}" if batch is not None else ""
        see = f" (log: {log})" if log else ""
        super().__init__(f"{stage.label}{where} failed: {reason}{see}")


class SweepCancelled(Exception):
    """`gridsearch cancel` withdrew the sweep's jobs: stop the sweep, not just this trial."""


class Events(Protocol):
    def stage_started(self, stage: Stage, n_batches: int) -> None: ...
    def batch_done(self, stage: Stage, batch: int) -> None: ...
    def stage_done(self, stage: Stage) -> None: ...


class Executor(abc.ABC):
    @abc.abstractmethod
    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        """Run every job in order; raise StageFailed at the first failure, after stopping the rest."""

    def reattach(self, trial_key: str, first: Stage) -> bool:
        """True: jobs a previous driver submitted for this trial (from `first` on) still run and
        this executor will wait for them, so the engine must not clear the database under them."""
        return False

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release workers; called once when the sweep ends (also on errors and signals)."""
