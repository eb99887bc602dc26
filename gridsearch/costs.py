"""The cost model: what a stage costs per frame, what a worker pays to start, measured from the
batches workers acknowledged; and from it, what the rest of a plan will cost and how many frames a
task should take.

Built only from measurements (gs_batch rows of schema v3 on): a stage never measured is unknown,
never guessed, so nothing is shown rather than a number that misleads."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gridsearch.branches import simulate
from gridsearch.planner import Plan
from gridsearch.spec import Sweep
from gridsearch.stages import Stage, stage_phases

# Batches a stage needs before its cost is trusted. A stage's first batch is often an outlier (cold
# file cache, ultrack's lazy set-up, a solver licence check): with three, the median sets it aside.
MIN_BATCHES = 3

# A task's start-up should stay under this share of it (issue 10).
STARTUP_SHARE = 0.1


@dataclass(frozen=True)
class StageCost:
    """One stage, from ``batches`` measured batches. Medians: one slow batch must not move it."""

    batches: int
    per_frame_s: float  # wall seconds per frame, start-up excluded
    cpu_per_frame_s: float  # CPU seconds per frame (the worker and ultrack's process pools)
    startup_s: float  # a worker's start to ultrack imported; 0.0 when never recorded
    peak_mb: float  # the largest peak RSS of any batch: what a task must be given


@dataclass(frozen=True)
class Workload:
    """How the remaining batches will run."""

    n_frames: int
    frames_per_batch: int
    parallelism: int  # batches running at once
    startup_per_task: bool  # SLURM: every task starts a process; a local pool pays once per worker
    auto_tasks: bool = False  # SLURM without an explicit frames_per_batch: batches per task chosen


def batches_per_task(stage: Stage, cost: StageCost | None, work: Workload, batches: int) -> int:
    """How many one-frame batches a task of a phase of `batches` should run in turn (the rule of
    frames_per_task); 1 for solve windows (each is long), an explicit frames_per_batch, or a stage
    not measured yet."""
    if not work.auto_tasks or stage == Stage.SOLVE or cost is None or batches < 2:
        return 1
    return frames_per_task(cost.per_frame_s, cost.startup_s, batches, work.parallelism, None)


@dataclass(frozen=True)
class Estimate:
    wall_s: float
    core_hours: float  # CPU time the batches use (SLURM bills cpus x wall: at least this)
    measured: int  # batches the model was built from

    def line(self) -> str:
        return (f"estimated remaining: {duration(self.wall_s)} wall, {self.core_hours:.1f} core-hours "
                f"(from {self.measured} measured batches)")


def stage_costs(rows: Iterable[Mapping[str, Any]]) -> dict[Stage, StageCost]:
    """Per stage with at least MIN_BATCHES measured batches of at least one frame
    (Ledger.measured_batches rows); stages with fewer are left out: unknown."""
    by_stage: dict[Stage, list[Mapping[str, Any]]] = {}
    startups: list[float] = []
    for r in rows:
        if r.get("startup_s") is not None and r.get("paid_startup"):
            startups.append(float(r["startup_s"]))
        if (r.get("frames") or 0) > 0 and r.get("wall_s") is not None:
            by_stage.setdefault(Stage.parse(r["stage"]), []).append(r)
    out: dict[Stage, StageCost] = {}
    for stage, rs in by_stage.items():
        if len(rs) < MIN_BATCHES:
            continue
        paid = [float(r["startup_s"]) for r in rs if r.get("startup_s") is not None and r.get("paid_startup")]
        out[stage] = StageCost(
            batches=len(rs),
            per_frame_s=statistics.median(r["wall_s"] / r["frames"] for r in rs),
            cpu_per_frame_s=statistics.median((r.get("cpu_s") or 0.0) / r["frames"] for r in rs),
            # a process's start-up does not depend on the stage it then runs: any stage's will do
            startup_s=statistics.median(paid or startups or [0.0]),
            peak_mb=max(float(r.get("max_rss_mb") or 0.0) for r in rs),
        )
    return out


def workload(sweep: Sweep) -> Workload:
    """The parallelism the sweep's executor allows: SLURM's max_parallel, else the local workers
    (no more than this machine's cores)."""
    ex = sweep.executor
    if ex.kind == "slurm":
        parallel, per_task = ex.max_parallel, True
    else:
        parallel, per_task = min(ex.workers, os.cpu_count() or 1), False
    return Workload(sweep.shape[0], ex.frames_per_batch or 1, max(1, parallel), per_task,
                    auto_tasks=per_task and ex.frames_per_batch is None)


def stage_frames(stage: Stage, n_frames: int) -> int:
    """Frames one run of a stage works on (links go from t to t+1: one fewer)."""
    return max(0, n_frames - 1) if stage == Stage.LINK else n_frames


def stage_run(stage: Stage, cost: StageCost, work: Workload, window: int | None) -> tuple[float, float]:
    """(wall s, CPU s) of one run of a stage: its phases in order, each in waves of `parallelism`
    tasks. The last batch of a phase may be shorter: counted full (an upper bound, by < 1 task)."""
    total = stage_frames(stage, work.n_frames)
    size = (window or work.n_frames) if stage == Stage.SOLVE else work.frames_per_batch
    per_batch = min(size, total) if total else 0
    startup = cost.startup_s if work.startup_per_task else 0.0
    wall = cpu = 0.0
    for phase in stage_phases(stage, work.n_frames, work.frames_per_batch, window):
        if not phase:
            continue
        m = batches_per_task(stage, cost, work, len(phase))
        tasks = math.ceil(len(phase) / m)
        wall += math.ceil(tasks / work.parallelism) * (startup + m * per_batch * cost.per_frame_s)
        cpu += tasks * startup + len(phase) * per_batch * cost.cpu_per_frame_s
    return wall, cpu


def estimate(plan: Plan, costs: Mapping[Stage, StageCost], work: Workload) -> Estimate | None:
    """What the plan's pending stage runs will cost; None while any stage they need is unmeasured
    (a partial sum would read as a promise)."""
    wall = cpu = 0.0
    for pt in plan.pending:
        for stage in pt.stages:
            if stage not in costs:
                return None
            window = pt.trial.sections.get("tracking", {}).get("window_size")
            w, c = stage_run(stage, costs[stage], work, window)
            wall, cpu = wall + w, cpu + c
    measured = sum(c.batches for c in costs.values())
    return Estimate(wall, cpu / 3600, measured) if measured else None


def frames_per_task(per_frame_s: float, startup_s: float, frames: int, parallelism: int,
                    explicit: int | None) -> int:
    """Frames per task: the user's explicit frames_per_batch wins; else the fewest frames that keep
    the start-up under STARTUP_SHARE (10%) of a task, startup <= 0.1 * (startup + n * per_frame).

    Capped so that the tasks still fill the allowed parallelism when the movie has frames enough
    (n <= frames // parallelism: every slot gets a full task): idle slots waste more than start-up
    does, so filling the parallelism beats the 10% target. At least 1."""
    if explicit is not None:
        return max(1, explicit)
    if frames <= 1:
        return 1
    if startup_s <= 0:
        target = 1
    elif per_frame_s <= 0:
        target = frames
    else:
        ratio = (1 / STARTUP_SHARE - 1) * startup_s / per_frame_s
        target = frames if not math.isfinite(ratio) or ratio >= frames else max(1, math.ceil(ratio))
        while target > 1 and _share_ok(startup_s, per_frame_s, target - 1):  # float rounding
            target -= 1
        while target < frames and not _share_ok(startup_s, per_frame_s, target):
            target += 1
    fill = max(1, frames // max(1, parallelism))
    return max(1, min(target, fill, frames))


def _share_ok(startup_s: float, per_frame_s: float, n: int) -> bool:
    return startup_s <= STARTUP_SHARE * (startup_s + n * per_frame_s)


def duration(seconds: float) -> str:
    """45 s, 12 min, 1 h 20 min: the precision an estimate has."""
    if seconds < 60:
        return f"{max(0, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:  # 59.6 min reads "1 h 0 min", not "60 min"
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def branch_estimate(plan: Plan, costs: Mapping[Stage, StageCost], work: Workload,
                    parallel: int) -> Estimate | None:
    """With `parallel` databases the branches overlap: the wall time is the simulated makespan of
    the engine's own scheduling (gridsearch.branches), each branch's stage runs getting an equal
    share of the executor's parallelism (an upper bound when fewer branches are active). With
    fewer slots than branches, the branches share them: a stage run on a share of 1/n slot takes
    n times as long (the measured costs are per task on a slot of its own)."""
    serial = estimate(plan, costs, work)
    if serial is None or parallel <= 1 or not plan.pending:
        return serial
    share = dataclasses.replace(work, parallelism=max(1, work.parallelism // parallel))
    slower = max(1.0, parallel / max(1, work.parallelism))
    window = plan.pending[0].trial.sections.get("tracking", {}).get("window_size")
    walls = {s: slower * stage_run(s, c, share, window)[0] for s, c in costs.items()}
    sim = simulate([pt.trial for pt in plan.pending], parallel, walls)
    return Estimate(sim.makespan, serial.core_hours, serial.measured)
