"""What `gridsearch plan` shows for a trial on SLURM: the arrays it would submit, in order."""

from __future__ import annotations

from gridsearch.planner import PlannedTrial
from gridsearch.slurm.submit import compact, max_array_size, split
from gridsearch.spec import Sweep
from gridsearch.stages import Stage
from gridsearch.ultrackdb import stage_phases


def describe_jobs(sweep: Sweep, planned: PlannedTrial) -> list[str]:
    """One line per stage, e.g. 'segment: array 0, then 1-9 %20 (afterok)'."""
    if planned.done or planned.first_stage is None:
        return []
    ex = sweep.executor
    limit = max_array_size() if ex.kind == "slurm" else 1001
    fpb = ex.frames_per_batch if ex.kind == "slurm" else 1
    out = []
    for stage in Stage:
        if stage < planned.first_stage:
            continue
        window = planned.trial.sections.get("tracking", {}).get("window_size")
        phases = [p for p in stage_phases(stage, sweep.shape[0], fpb, window) if p]
        parts = []
        for phase in phases:
            arrays = [f"{compact([i + off for i in idx])}" for off, idx in split(phase, limit)]
            parts.append(" + ".join(f"array {a} %{ex.max_parallel}" for a in arrays))
        out.append(f"{stage.label}: " + ", then ".join(parts))
    return out
