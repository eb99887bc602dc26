"""What `plan` tells before anything is submitted: the SLURM jobs and array tasks (or, locally,
the batches) the rest of the plan runs, the ultrack databases it makes and how many are alive at
once, the disk they take, and the estimated time.

Pure: the caller measures (stage costs, database sizes, the workdir, the cluster's CPUs,
MaxArraySize) and passes the measures in. What is not measured yet is said to be unknown, never
guessed: a database's size before the first segment run, tasks before a stage is measured."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gridsearch import costs
from gridsearch.branches import MAIN, Simulation
from gridsearch.planner import Plan
from gridsearch.slurm.describe import PerTask, stage_arrays
from gridsearch.slurm.gateway import task_slots
from gridsearch.spec import Sweep, Trial
from gridsearch.stages import Stage, stage_phases

Flights = Mapping[tuple[str, Stage], int]  # (owner trial key, stage) -> stage runs going at once


def window(trial: Trial) -> int | None:
    return trial.sections.get("tracking", {}).get("window_size")


@dataclass(frozen=True)
class TaskSizer:
    """Batches per task as SlurmExecutor._per_task decides them when it submits a phase:
    costs.batches_per_task with the parallelism one branch gets (task_slots, shared among the
    branches in flight). 1 until the stage is measured, or with an explicit frames_per_batch."""

    sweep: Sweep
    measured: Mapping[Stage, costs.StageCost]
    cpus: int | None = None  # the partition's CPUs; None: unknown (max_parallel alone)

    def __call__(self, stage: Stage, batches: int, flights: int = 1) -> int:
        slots = task_slots(self.sweep.executor, stage.label, self.cpus)
        work = dataclasses.replace(costs.workload(self.sweep), parallelism=max(1, slots // max(1, flights)))
        return costs.batches_per_task(stage, self.measured.get(stage), work, batches)

    def sized_later(self, stage: Stage) -> bool:
        """Its tasks are one batch each now, and will be right-sized once it is measured."""
        return costs.workload(self.sweep).auto_tasks and stage != Stage.SOLVE and stage not in self.measured

    def of(self, key: str, flights: Flights) -> PerTask:
        """For describe_jobs: the sizes one trial's stage runs get."""
        return lambda stage, batches: self(stage, batches, flights.get((key, stage), 1))


def flights(sim: Simulation) -> dict[tuple[str, Stage], int]:
    """Per simulated stage run (its owner trial's key, its stage): the runs going at its start,
    itself included, i.e. the branches in flight that share max_parallel when its arrays are
    sized. A serial sweep has one."""
    starts = sorted(r.start for r in sim.runs)
    ends = sorted(r.end for r in sim.runs)
    return {(r.node.owner.key, r.node.stage): max(1, bisect.bisect_right(starts, r.start)
                                                   - bisect.bisect_right(ends, r.start))
            for r in sim.runs}


@dataclass(frozen=True)
class Work:
    """What the rest of the plan hands the executor."""

    executor: str  # slurm | local
    stage_runs: int
    batches: int  # batches of ultrack's stages (SLURM: before tasks are right-sized)
    arrays: int = 0  # SLURM: sbatch calls for stage arrays
    server_job: int = 0  # SLURM: the managed PostgreSQL server's own job
    server_reused: str | None = None  # SLURM: the id of a running server job the sweep re-uses
    tasks: int = 0  # SLURM: array tasks of those arrays
    up_to: bool = False  # SLURM: some stage not measured yet; its tasks get fewer once it is
    whole_stages: bool = False  # local SQLite: one writer, so a stage run is one batch

    @property
    def sbatch(self) -> int:
        return self.arrays + self.server_job

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"executor": self.executor, "stage_runs": self.stage_runs,
                               "batches": self.batches}
        if self.executor == "slurm":
            out.update(sbatch=self.sbatch, arrays=self.arrays, server_job=self.server_job,
                       server_job_reused=self.server_reused, tasks=self.tasks, tasks_up_to=self.up_to)
        return out

    def lines(self) -> list[str]:
        if self.executor != "slurm":
            how = " (one per stage run: SQLite)" if self.whole_stages else ""
            return [f"local: {self.stage_runs} stage runs in {self.batches} batches{how}, no jobs"]
        server = f" + {self.server_job} server job" if self.server_job else ""
        up_to = "up to " if self.up_to else ""
        out = [f"slurm: {self.sbatch} sbatch calls ({self.arrays} arrays{server}), "
               f"{up_to}{self.tasks} array tasks"]
        if self.server_reused and self.stage_runs:
            out.append(f"  (server job {self.server_reused} runs: re-used, no sbatch for it)")
        if self.up_to:
            out.append(f"  (fewer once a stage has {costs.MIN_BATCHES} measured batches: a task then runs "
                       "several frames)")
        return out


def slurm_work(sweep: Sweep, plan: Plan, sizer: TaskSizer, limit: int, going: Flights,
               server_job: bool, server_reused: str | None = None) -> Work:
    """Arrays and tasks of every pending stage run, split as the executor splits them (stage
    phases, MaxArraySize `limit`, frames_per_batch, right-sized tasks); the sbatch of the server
    job when the database is one and none runs that the sweep would re-use. A run's figures
    depend only on its stage, window and branches in flight: computed once per kind, not per
    trial (100,000 trials)."""
    kinds: dict[tuple[Stage, int | None, int], tuple[int, int, int, bool]] = {}
    runs = batches = arrays = tasks = 0
    later = False
    for pt in plan.pending:
        win = window(pt.trial)
        for stage in pt.stages:
            n = going.get((pt.trial.key, stage), 1)
            kind = (stage, win, n)
            if kind not in kinds:
                phases = stage_arrays(sweep, stage, win, limit, lambda s, b, n=n: sizer(s, b, n))
                kinds[kind] = (sum(len(ph) for ph, _, _ in phases), sum(len(a) for _, _, a in phases),
                               sum(len(idx) for _, _, a in phases for _, idx in a),
                               sizer.sized_later(stage) and any(len(ph) > 1 for ph, _, _ in phases))
            b, a, t, unsized = kinds[kind]
            runs, batches, arrays, tasks = runs + 1, batches + b, arrays + a, tasks + t
            later = later or unsized
    return Work("slurm", runs, batches, arrays, int(server_job and runs > 0 and not server_reused),
                server_reused, tasks, later)


def local_work(sweep: Sweep, plan: Plan, parallel_writers: bool) -> Work:
    """Stage runs and the batches the local executor runs: a whole stage per batch on SQLite
    (one writer); else each phase's one-frame batches, as the pool gets them."""
    runs = batches = 0
    for pt in plan.pending:
        for stage in pt.stages:
            runs += 1
            batches += 1 if not parallel_writers else \
                sum(len(ph) for ph in stage_phases(stage, sweep.shape[0], 1, window(pt.trial)))
    return Work("local", runs, batches, whole_stages=not parallel_writers)


@dataclass(frozen=True)
class Databases:
    """The ultrack databases the rest of the plan runs on."""

    in_all: int  # main, new ones for other segment configs, forks
    new: int  # of them, made by the rest of the plan
    forks: int
    at_once: int  # at most alive at the same time (`parallel` bounds it)

    def doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        if not self.in_all:
            return "databases: none needed, nothing is left to run"
        forks = f" ({self.forks} of them forks)" if self.forks else ""
        made = f", {self.new} new{forks}" if self.new else ""
        return f"databases: {self.in_all} in all{made}, at most {self.at_once} at once"


def databases(sim: Simulation, existing: Iterable[str]) -> Databases:
    """From the simulated branches: every database a stage run lands on; `existing`: those the
    ledger already has (main counts as existing: every sweep has it)."""
    used = {r.db for r in sim.runs}
    new = len(used - set(existing) - {MAIN})
    return Databases(len(used), new, sim.forks, sim.databases if sim.runs else 0)


@dataclass(frozen=True)
class Disk:
    """Measured sizes, and what they make at the peak."""

    sizes: dict[str, int]  # the databases that hold a stage result, measured
    at_once: int
    workdir: int | None  # bytes the workdir holds now; None: there is no workdir yet
    inside: int = 0  # bytes of the measured databases within the workdir (SQLite, a managed server)
    per_trial: int | None = None  # a finished trial's exports (tracks, label images), measured
    to_export: int = 0  # trials still to export

    @property
    def database(self) -> int | None:
        """The largest measured database: what each database alive at once is counted at."""
        return max(self.sizes.values()) if self.sizes else None

    @property
    def exports(self) -> int | None:
        return None if self.per_trial is None else self.per_trial * self.to_export

    @property
    def peak(self) -> int | None:
        """The databases alive at once at the largest size, the rest of the workdir as it is, and
        the exports to come (no less than the workdir now); None until a database is measured."""
        if self.database is None:
            return None
        now = self.workdir or 0
        return max(now, self.database * self.at_once + max(0, now - self.inside) + (self.exports or 0))

    def doc(self) -> dict[str, Any]:
        return {"database_bytes": self.database, "databases_at_once": self.at_once,
                "databases_bytes": None if self.database is None else self.database * self.at_once,
                "measured": self.sizes, "workdir_bytes": self.workdir,
                "databases_in_workdir_bytes": self.inside,
                "export_bytes_per_trial": self.per_trial, "exports_bytes": self.exports,
                "peak_bytes": self.peak}

    def lines(self) -> list[str]:
        now = "no workdir yet" if self.workdir is None else f"the workdir holds {size(self.workdir)} now"
        if self.database is None:
            return [f"disk: a database's size is known after the first segment run; {now}"]
        if not self.at_once:
            return [f"disk: {now}, nothing more to come"]
        out = [f"disk: {self.at_once} database(s) at once x {size(self.database)} (the largest now) "
               f"= {size(self.database * self.at_once)}",
               f"disk: {now}" + (f", {size(self.inside)} of it databases" if self.inside else "")]
        exports = ("trial exports not measured yet" if self.exports is None
                   else f"with {size(self.exports)} of trial exports to come")
        out.append(f"disk: about {size(self.peak or 0)} at the peak, {exports}")
        return out


def size(n: int) -> str:
    """Bytes in decimal units, to the precision a disk estimate has."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Forecast:
    work: Work
    databases: Databases
    disk: Disk
    estimate: costs.Estimate | None
    sizer: TaskSizer | None = None  # SLURM: how the executor would size each trial's tasks
    going: Flights = field(default_factory=dict)

    def per_task(self, key: str) -> PerTask | None:
        return None if self.sizer is None else self.sizer.of(key, self.going)

    def doc(self) -> dict[str, Any]:
        return {"work": self.work.doc(), "databases": self.databases.doc(), "disk": self.disk.doc()}

    @property
    def heading(self) -> str:
        return "before submitting:" if self.work.executor == "slurm" else "what the rest of the plan runs:"

    def texts(self) -> list[str]:
        """The summary's lines, unwrapped: the work, the databases, the disk, the time."""
        if self.estimate is not None:
            eta = self.estimate.line()
        else:
            eta = (f"time left: known once every stage it needs has {costs.MIN_BATCHES} measured "
                   "batches (run a few trials)")
        return [*self.work.lines(), self.databases.line(), *self.disk.lines(), eta]


def build(sweep: Sweep, plan: Plan, sim: Simulation, existing: Iterable[str], disk: Disk,
          estimate: costs.Estimate | None, *, measured: Mapping[Stage, costs.StageCost],
          limit: Callable[[], int], cpus: Callable[[], int | None], parallel_writers: bool,
          server_job: Callable[[], str | None] = lambda: None) -> Forecast:
    """`limit` (MaxArraySize), `cpus` (the partition's) and `server_job` (a running managed server
    job the sweep would re-use) are asked only where they matter: a SLURM sweep, the CPUs only
    once a stage is measured and tasks are right-sized, the server job on a managed server."""
    dbs = databases(sim, existing)
    disk = dataclasses.replace(disk, at_once=dbs.at_once)
    if sweep.executor.kind != "slurm":
        return Forecast(local_work(sweep, plan, parallel_writers), dbs, disk, estimate)
    going = flights(sim)
    sized = costs.workload(sweep).auto_tasks and any(s != Stage.SOLVE for s in measured)
    sizer = TaskSizer(sweep, measured, cpus() if sized else None)
    server = sweep.database.kind == "postgresql" and sweep.database.managed
    work = slurm_work(sweep, plan, sizer, limit(), going, server, server_job() if server else None)
    return Forecast(work, dbs, disk, estimate, sizer, going)
