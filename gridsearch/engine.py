"""The sweep driver: spec -> planner -> executor -> ledger -> results, in one loop."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gridsearch import executors, results
from gridsearch.backends import open_backend
from gridsearch.core.errors import GridsearchError, one_line
from gridsearch.core.files import atomic_write, stamp
from gridsearch.core.signals import terminate_as_exit
from gridsearch.core.trace import phase
from gridsearch.executors.base import Executor, ExecutorContext, StageFailed, StageJob
from gridsearch.inputs import IDENTITY_MARKER
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan, PlannedTrial, make_plan
from gridsearch.progress import Reporter, Silent
from gridsearch.runtime import fd_redirect, resolved_solver
from gridsearch.spec import SpecError, Sweep, Trial
from gridsearch.stages import Stage, earliest_changed_stage, stage_phases
from gridsearch.ultrackdb import UltrackDB
from gridsearch.validate import check_writable
from gridsearch.workspace import Workspace

MAIN_DB = "main"


@dataclass
class Outcome:
    completed: int
    failed: int
    skipped: int
    stage_runs: dict[Stage, int]
    wall_s: float


def check_compatible(ledger: Ledger, sweep: Sweep) -> None:
    held = ledger.get_meta("base_fingerprint")
    if held is None:
        ledger.set_meta("base_fingerprint", sweep.base_fingerprint)
        ledger.set_meta("name", sweep.name)
    elif held != sweep.base_fingerprint:
        raise SpecError(
            f"{sweep.path}: the base config or the data changed since this sweep started in "
            f"{sweep.workdir}; run again with --restart to archive its results and start over"
        )


def archive(ws: Workspace) -> Path | None:
    """--restart never deletes results: they move to archive/<timestamp>/."""
    movable = [p for p in (ws.state_db, ws.root / "trials", ws.logs) if p.exists()]
    if not movable:
        return None
    dest = ws.root / "archive" / stamp()
    dest.mkdir(parents=True)
    for p in movable:
        shutil.move(str(p), dest / p.name)
    shutil.rmtree(ws.root / "db", ignore_errors=True)  # ultrack databases are caches of the above
    return dest


class _StageEvents:
    """Executor callbacks -> ledger writes; the ledger is the only place a stage becomes trusted."""

    def __init__(self, ledger: Ledger, db: UltrackDB, trial: Trial, runs: dict[Stage, int],
                 reporter: Reporter) -> None:
        self.ledger, self.db, self.trial, self.runs, self.reporter = ledger, db, trial, runs, reporter
        self.walls: dict[Stage, float] = {}

    def stage_started(self, stage: Stage, n_batches: int) -> None:
        phase("stage", self.trial.key, stage.label)
        self.ledger.start_stage(self.runs[stage], n_batches)
        self.reporter.stage_started(stage, n_batches)

    def batch_done(self, stage: Stage, batch: int) -> None:
        self.reporter.batch_done(stage, batch)

    def stage_done(self, stage: Stage) -> None:
        wall = self.ledger.finish_stage(self.runs[stage], self.db.name, stage,
                                        self.trial.fingerprints[stage])
        self.walls[stage] = wall
        self.reporter.stage_done(stage, wall)

    def failed(self, reason: str) -> None:
        unfinished = [run for stage, run in self.runs.items() if stage not in self.walls]
        self.ledger.abandon_queued(unfinished)  # never started: nothing of theirs failed
        for run in unfinished:
            self.ledger.fail_stage(run, reason)


@contextlib.contextmanager
def existing_ledger(sweep: Sweep) -> Iterator[Ledger | None]:
    """For read-only views: None when the sweep has no state yet (and nothing gets created)."""
    ws = Workspace(sweep.workdir)
    if not ws.exists():
        yield None
        return
    with open_backend(sweep, ws, read_only=True) as backend:
        ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs, read_only=True)
        try:
            yield ledger
        finally:
            ledger.close()


def plan_for(sweep: Sweep, ledger: Ledger | None) -> Plan:
    if ledger is None:
        return make_plan(sweep.trials, {}, set())
    return make_plan(sweep.trials, ledger.held(MAIN_DB), ledger.finished_keys())


def run_sweep(sweep: Sweep, *, restart: bool = False, reporter: Reporter | None = None) -> Outcome:
    phase("start")
    rep = reporter or Silent()
    ws = Workspace(sweep.workdir)
    check_writable(sweep.workdir, sweep.path)
    t0 = time.perf_counter()
    with terminate_as_exit(), ws.lock(rep.message) as lease:
        if not sweep.full_identity:  # fingerprints of this workdir use the sampled data identity
            atomic_write(ws.root / IDENTITY_MARKER, "sampled\n")
        if restart and (dest := archive(ws)):
            rep.message(f"previous results archived in {dest}")
        with open_backend(sweep, ws, notify=rep.message) as backend:
            if restart and (old := backend.archive_ledger()):
                rep.message(f"previous ledger kept in {old}")
            ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs)
            try:
                check_compatible(ledger, sweep)
                n = ledger.recover()
                if n:
                    rep.message(f"{n} interrupted stage run(s) found: their results will be recomputed")
                plan = plan_for(sweep, ledger)
                executor = executors.create(ExecutorContext(sweep, ws, backend, ledger, rep.message))
                rep.sweep_started(plan)
                try:
                    driver = _Driver(sweep, ws, ledger, backend.ultrack_db(MAIN_DB), executor, rep)
                    outcome = driver.run(plan, lease.check)
                    phase("end")
                finally:
                    executor.close()
                    rep.close()
            finally:
                ledger.close()
    outcome.wall_s = time.perf_counter() - t0
    return outcome


class _Driver:
    """One database, trials one after another: clear -> executor -> export -> record."""

    def __init__(self, sweep: Sweep, ws: Workspace, ledger: Ledger, db: UltrackDB, executor: Executor,
                 rep: Reporter) -> None:
        self.sweep, self.ws, self.ledger, self.db = sweep, ws, ledger, db
        self.executor, self.rep = executor, rep
        self.stage_runs = {s: 0 for s in Stage}
        self.provenance = {"ultrack": version("ultrack"), "gridsearch": version("gridsearch")}

    def run(self, plan: Plan, still_ours: Callable[[], None]) -> Outcome:
        """``still_ours`` raises once the workdir's lock was taken over: no trial starts after."""
        pending = plan.pending
        if pending:
            results.warm_up_in_background()
        completed = failed = 0
        for k, planned in enumerate(pending, start=1):
            still_ours()
            if self.run_trial(planned, k, len(pending)):
                completed += 1
            else:
                failed += 1
        return Outcome(completed, failed, len(plan.trials) - len(pending), self.stage_runs, 0.0)

    def _jobs(self, trial: Trial, first: Stage, config_path: Path) -> list[StageJob]:
        """Open a run per stage (re-attaching a killed driver's live jobs), clear what is stale."""
        stages = [s for s in Stage if s >= first]
        phase("clear", trial.key, first.label)
        self.ledger.invalidate(self.db.name, first)
        adopted = self.executor.reattach(trial.key, first)
        if not adopted:
            self.db.clear(first)
        runs = self.ledger.open_stage_runs(self.db.name, trial.key, trial.fingerprints, stages, adopted)
        window = trial.sections["tracking"].get("window_size")
        data = self.sweep.file.data
        return [StageJob(s, runs[s], stage_phases(s, self.sweep.shape[0], self.executor.frames_per_batch,
                                                  window),
                         config_path, str(data.foreground), str(data.contours), trial.key)
                for s in stages]

    def run_trial(self, planned: PlannedTrial, k: int, n: int) -> bool:
        trial = planned.trial
        phase("trial", trial.key)
        # The plan fixed the order; what to clear is decided against the database as it is now.
        first = earliest_changed_stage(self.ledger.held(self.db.name), trial.fingerprints)
        self.rep.trial_started(k, n, trial, first)
        number = self.ledger.start_trial(trial, first, self.sweep.file.grid)
        tdir = self.ws.trial_dir(trial.key)
        config_path = self.db.write_config(trial.sections, self.executor.frames_per_batch,
                                           tdir / "config.toml")
        events = _StageEvents(self.ledger, self.db, trial, {}, self.rep)
        try:
            if first is not None:
                jobs = self._jobs(trial, first, config_path)
                events.runs.update({j.stage: j.run_id for j in jobs})
                self.executor.run(jobs, events)
            phase("export", trial.key)
            with fd_redirect(self.ws.logs / "ultrack.log"):
                data = self.sweep.file
                figures, metrics = results.export_trial(config_path, tdir, self.sweep.shape[0],
                                                        data.data.ground_truth, data.keep_label_images)
        except (GridsearchError, sa.exc.OperationalError):
            raise  # cancelled, or a service down (the database server): the sweep stops, resumable
        except Exception as e:  # a stage, the clear or the export failed: this trial, not the sweep
            reason = str(e) if isinstance(e, StageFailed) else one_line(e)
            events.failed(reason)
            self.ledger.fail_trial(number, reason)
            self.rep.trial_finished(trial, False, reason)
            return False
        finally:
            for s in events.walls:
                self.stage_runs[s] += 1
        phase("record", trial.key)
        self._record(trial, number, figures, metrics, config_path, tdir)
        phase("finished", trial.key)
        return True

    def _solver(self, trial: Trial) -> str:
        """What the trial's solve ran with, as resolved on this host (a SLURM node may differ).
        Only a Gurobi probe can print (its licence banner): only then is the output redirected."""
        name = trial.sections["tracking"].get("solver_name") or ""
        if name.upper() == "CBC":
            return "CBC"
        with fd_redirect(self.ws.logs / "ultrack.log"):
            return resolved_solver(name)

    def _record(self, trial: Trial, number: int, figures: dict[str, float], metrics: dict[str, float],
                config_path: Path, tdir: Path) -> None:
        walls = self.ledger.stage_wall(trial.key)
        attrs: dict[str, Any] = {
            "figures": figures,
            "metrics": metrics,
            **{f"{s.label}_s": round(walls[s], 3) for s in walls},
            "config": str(config_path),
            "tracks_csv": str(tdir / "tracks.csv"),
            "host": os.uname().nodename,
            "solver": self._solver(trial),
            **self.provenance,
        }
        value = {**figures, **metrics}.get(self.sweep.objective, float("nan"))
        self.ledger.finish_trial(number, float(value), attrs)
        self.rep.trial_finished(trial, True, "")
