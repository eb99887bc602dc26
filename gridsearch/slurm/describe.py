"""What `gridsearch plan` shows for a trial of a SLURM sweep: the arrays it would submit, in order."""

from __future__ import annotations

from typing import Protocol

from gridsearch.slurm.gateway import max_array_size
from gridsearch.slurm.parse import compact, split
from gridsearch.spec import Sweep, Trial
from gridsearch.stages import Stage, stage_phases


class Planned(Protocol):
    """A planned trial (gridsearch.planner.PlannedTrial, a layer above this one)."""

    @property
    def trial(self) -> Trial: ...

    @property
    def stages(self) -> list[Stage]: ...  # the stages it runs; none when done


def describe_jobs(sweep: Sweep, planned: Planned) -> list[str]:
    """One line per stage, e.g. 'segment: array 0 %20, then array 1-9 %20'."""
    ex = sweep.executor
    limit = max_array_size()
    window = planned.trial.sections.get("tracking", {}).get("window_size")
    out = []
    for stage in planned.stages:
        phases = [p for p in stage_phases(stage, sweep.shape[0], ex.frames_per_batch or 1, window) if p]
        parts = []
        for phase in phases:
            arrays = [compact([i + off for i in idx]) for off, idx in split(phase, limit)]
            parts.append(" + ".join(f"array {a} %{ex.max_parallel}" for a in arrays))
        out.append(f"{stage.label}: " + ", then ".join(parts))
    return out
