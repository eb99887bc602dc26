"""What `gridsearch plan` shows for a trial of a SLURM sweep: the arrays it would submit, in order,
split as SlurmExecutor._submit splits them (MaxArraySize, batches per task)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from gridsearch.slurm.gateway import max_array_size
from gridsearch.slurm.parse import compact, split
from gridsearch.spec import Sweep, Trial
from gridsearch.stages import Stage, stage_phases

# Batches one task of a phase runs in turn, given the stage and the phase's batch count: 1 until
# the stage is measured (or with an explicit frames_per_batch), then costs.batches_per_task.
PerTask = Callable[[Stage, int], int]


class Planned(Protocol):
    """A planned trial (gridsearch.planner.PlannedTrial, a layer above this one)."""

    @property
    def trial(self) -> Trial: ...

    @property
    def stages(self) -> list[Stage]: ...  # the stages it runs; none when done


def one_each(stage: Stage, batches: int) -> int:
    return 1


def phase_arrays(phase: Sequence[int], limit: int, per_task: int = 1) -> list[tuple[int, list[int]]]:
    """The sbatch calls of one phase: [(offset, array indices)], every index below `limit`. With
    per_task m > 1, task t runs batches phase[0] + t*m on (m of them): the executor's own split,
    so that `plan` counts the arrays and tasks a sweep submits."""
    if per_task <= 1:
        return split(phase, limit)
    tasks = math.ceil(len(phase) / per_task)
    return [(phase[0] + off * per_task, idx) for off, idx in split(range(tasks), limit)]


def stage_arrays(sweep: Sweep, stage: Stage, window: int | None, limit: int,
                 per_task: PerTask = one_each) -> list[tuple[list[int], int, list[tuple[int, list[int]]]]]:
    """Per phase of one run of `stage`: (its batches, batches per task, its arrays as phase_arrays
    gives them). Only a phase of consecutive batches is right-sized (the executor's condition)."""
    fpb = sweep.executor.frames_per_batch or 1
    out = []
    for phase in stage_phases(stage, sweep.shape[0], fpb, window):
        if not phase:
            continue
        consecutive = phase[-1] - phase[0] == len(phase) - 1
        m = per_task(stage, len(phase)) if consecutive and len(phase) > 1 else 1
        out.append((phase, m, phase_arrays(phase, limit, m)))
    return out


def describe_jobs(sweep: Sweep, planned: Planned, per_task: PerTask = one_each) -> list[str]:
    """One line per stage, e.g. 'segment: array 0 %20, then array 1-9 %20'; batch numbers, or
    task numbers with the batches each runs once tasks are right-sized ('array 0-2 %20 x3')."""
    ex = sweep.executor
    limit = max_array_size()
    window = planned.trial.sections.get("tracking", {}).get("window_size")
    out = []
    for stage in planned.stages:
        parts = []
        for _, m, arrays in stage_arrays(sweep, stage, window, limit, per_task):
            if m == 1:
                names = [f"array {compact([i + off for i in idx])} %{ex.max_parallel}" for off, idx in arrays]
            else:
                names = [f"array {compact(idx)} %{ex.max_parallel} x{m}" for _, idx in arrays]
            parts.append(" + ".join(names))
        out.append(f"{stage.label}: " + ", then ".join(parts))
    return out
