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

from gridsearch import convert, executors, results
from gridsearch.backends import Backend, open_backend
from gridsearch.branches import Forest, Move, Node, build_tree
from gridsearch.core.errors import GridsearchError, one_line
from gridsearch.core.files import atomic_write, stamp
from gridsearch.core.signals import terminate_as_exit
from gridsearch.core.trace import phase
from gridsearch.executors.base import Executor, ExecutorContext, Handle, StageFailed, StageJob
from gridsearch.inputs import IDENTITY_MARKER
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan, PlannedTrial, make_plan
from gridsearch.progress import Reporter, Silent
from gridsearch.runtime import fd_redirect, resolved_solver
from gridsearch.spec import SpecError, Sweep, Trial
from gridsearch.stages import Stage, earliest_changed_stage, stage_phases
from gridsearch.ultrackdb import UltrackDB
from gridsearch.validate import check_writable
from gridsearch.validated import write as record_validated
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
        self.reporter.stage_started(stage, n_batches, self.trial)

    def batch_done(self, stage: Stage, batch: int) -> None:
        self.reporter.batch_done(stage, batch, self.trial)

    def stage_done(self, stage: Stage) -> None:
        wall = self.ledger.finish_stage(self.runs[stage], self.db.name, stage,
                                        self.trial.fingerprints[stage])
        self.walls[stage] = wall
        self.reporter.stage_done(stage, wall, self.trial)

    def failed(self, reason: str) -> None:
        unfinished = [run for stage, run in self.runs.items() if stage not in self.walls]
        self.ledger.abandon_queued(unfinished)  # never started: nothing of theirs failed
        for run in unfinished:
            self.ledger.fail_stage(run, reason)


@contextlib.contextmanager
def existing_ledger(sweep: Sweep) -> Iterator[Ledger | None]:
    """For read-only views: None when the sweep has no state yet (and nothing gets created)."""
    with existing_state(sweep) as state:
        yield None if state is None else state[1]


@contextlib.contextmanager
def existing_state(sweep: Sweep) -> Iterator[tuple[Backend, Ledger] | None]:
    """existing_ledger with the backend it was opened through: `plan` measures the databases."""
    ws = Workspace(sweep.workdir)
    if not ws.exists():
        yield None
        return
    with open_backend(sweep, ws, read_only=True) as backend:
        ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs, read_only=True)
        try:
            yield backend, ledger
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
        if sweep.validated is not None:  # views of this config may now skip ultrack, zarr, tifffile
            record_validated(ws.root, sweep.validated, sweep.headers.seen)
        if restart and (dest := archive(ws)):
            rep.message(f"previous results archived in {dest}")
        with open_backend(sweep, ws, notify=rep.message) as backend:
            if restart and (old := backend.archive_ledger()):
                rep.message(f"previous ledger kept in {old}")
            ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs)
            try:
                check_compatible(ledger, sweep)
                make_inputs(sweep, ws, rep)
                n = ledger.recover()
                if n:
                    rep.message(f"{n} interrupted stage run(s) found: their results will be recomputed")
                plan = plan_for(sweep, ledger)
                executor = executors.create(ExecutorContext(sweep, ws, backend, ledger, rep.message))
                rep.sweep_started(plan)
                try:
                    driver = _driver(sweep, ws, ledger, backend, executor, rep)
                    outcome = driver.run(plan, lease.check)
                    phase("end")
                finally:
                    executor.close()
                    rep.close()
            finally:
                ledger.close()
    outcome.wall_s = time.perf_counter() - t0
    return outcome


def make_inputs(sweep: Sweep, ws: Workspace, rep: Reporter) -> None:
    """Arrays made from TIFF stacks or label movies, before any stage reads them; only once the
    data is known to be the sweep's (check_compatible): changed data is refused, not converted."""
    for made in convert.stale(sweep.inputs.made):
        rep.message(convert.describe(made))
        with fd_redirect(ws.logs / "ultrack.log"):  # ultrack's progress bar
            convert.make(made)


def _driver(sweep: Sweep, ws: Workspace, ledger: Ledger, backend: Backend, executor: Executor,
            rep: Reporter) -> _Driver:
    """`parallel: 1`, or an executor that runs one unit at a time: the serial path."""
    k, asked = sweep.parallel, sweep.file.parallel is not None  # the default goes quietly
    if k > 1 and not executor.concurrent and asked:
        rep.message(f"parallel: {k} is not available with executor {sweep.executor.kind} yet: "
                    "branches run one after another")
    if k > 1 and executor.concurrent:
        if not backend.can_fork:
            if asked:
                rep.message(f"parallel: {k}: this database cannot be forked (one schema on a server "
                            "someone else runs): branches run one after another")
        else:
            return _BranchDriver(sweep, ws, ledger, backend, executor, rep, k)
    return _Driver(sweep, ws, ledger, backend.ultrack_db(MAIN_DB), executor, rep)


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

    def _jobs(self, trial: Trial, first: Stage, config_path: Path, db: UltrackDB | None = None,
              last: Stage = Stage.SOLVE) -> list[StageJob]:
        """Open a run per stage (re-attaching a killed driver's live jobs), clear what is stale."""
        db = db or self.db
        stages = [s for s in Stage if first <= s <= last]
        phase("clear", trial.key, first.label)
        self.ledger.invalidate(db.name, first)
        adopted = self.executor.reattach(trial.key, first, db.name)
        if not adopted:
            db.clear(first)
        runs = self.ledger.open_stage_runs(db.name, trial.key, trial.fingerprints, stages, adopted)
        window = trial.sections["tracking"].get("window_size")
        arrays = self.sweep.inputs
        return [StageJob(s, runs[s], stage_phases(s, self.sweep.shape[0], self.executor.frames_per_batch,
                                                  window),
                         config_path, str(arrays.foreground), str(arrays.contours), trial.key)
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
            figures, metrics = self._export(trial, config_path, tdir)
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

    def _export(self, trial: Trial, config_path: Path,
                tdir: Path) -> tuple[dict[str, float], dict[str, float]]:
        phase("export", trial.key)
        with fd_redirect(self.ws.logs / "ultrack.log"):
            data = self.sweep.file
            return results.export_trial(config_path, tdir, self.sweep.shape[0], data.data.ground_truth,
                                        data.keep_label_images)

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


@dataclass(eq=False)
class _Unit:
    """One node of the tree in flight on one database."""

    db: UltrackDB
    node: Node
    trial: Trial
    number: int
    config_path: Path
    events: _StageEvents


class _BranchDriver(_Driver):
    """Independent branches at once, each on its own database (gridsearch.branches decides)."""

    def __init__(self, sweep: Sweep, ws: Workspace, ledger: Ledger, backend: Backend, executor: Executor,
                 rep: Reporter, parallel: int) -> None:
        super().__init__(sweep, ws, ledger, backend.ultrack_db(MAIN_DB), executor, rep)
        self.backend, self.parallel = backend, parallel
        self.numbers: dict[str, int] = {}  # trial key -> the study's trial number
        self.started = 0
        self.outcome = Outcome(0, 0, 0, self.stage_runs, 0.0)
        self._names: set[str] = set()

    def _new_name(self) -> str:
        n = 1
        while f"f{n}" in self._names:
            n += 1
        self._names.add(f"f{n}")
        return f"f{n}"

    def run(self, plan: Plan, still_ours: Callable[[], None]) -> Outcome:
        pending = plan.pending
        self.n = len(pending)
        self.outcome.skipped = len(plan.trials) - len(pending)
        if pending:
            results.warm_up_in_background()
        self.executor.withdraw_earlier()  # nothing of a killed driver's may write while we copy
        known = set(self.ledger.databases()) | {MAIN_DB}
        self._names = known | set(self.backend.forks())
        for orphan in set(self.backend.forks()) - known:  # made by a driver killed before recording it
            self.backend.drop(orphan)
        forest = Forest.start(build_tree([p.trial for p in pending]),
                              {name: self.ledger.held(name) for name in known}, self.parallel,
                              self._new_name, self.backend.can_fork)
        units: dict[Handle, _Unit] = {}
        while not forest.idle:
            still_ours()
            for handle, unit in self._carry_out(forest, forest.moves()):
                units[handle] = unit
            if not units:
                continue
            for handle in self.executor.poll():
                self._finished(forest, units.pop(handle), handle.error)
        self._carry_out(forest, forest.moves())  # the last forks' subtrees are exported: dropped
        return self.outcome

    def _carry_out(self, forest: Forest, moves: list[Move]) -> list[tuple[Handle, _Unit]]:
        """Drops, then new databases and forks (each before its source runs on), then runs."""
        for m in moves:
            if m.drop:
                self.backend.drop(m.db)
                self.ledger.drop_state(m.db)
        runs = []
        for m in moves:
            if m.drop or m.node is None:
                continue
            if m.source is not None and not self._fork(forest, m):
                continue
            runs.append(m)
        started = []
        for m in runs:
            assert m.node is not None
            unit = self._start(m.db, m.node)
            if unit is None:
                continue
            handle = self.executor.start(self._unit_jobs(unit), unit.events)
            if handle.finished:  # nothing to run (only the export remained)
                self._finished(forest, unit, handle.error)
            else:
                started.append((handle, unit))
        return started

    def _fork(self, forest: Forest, m: Move) -> bool:
        assert m.source is not None and m.node is not None
        room, why = self.backend.fork_room(m.source, 1)
        error = None
        if room:
            try:
                self.backend.fork(m.source, m.db)
                self.ledger.fork_state(m.source, m.db)
                return True
            except GridsearchError as e:
                error = str(e)
        self.rep.message(f"not forking {m.source}: {error or why}; its branches run one after another")
        forest.can_fork = False
        forest.stopped(m.db)
        forest.databases[m.source].queue.append(m.node)
        return False

    def _start(self, name: str, node: Node) -> _Unit | None:
        trial = node.owner
        db = self.backend.ultrack_db(name)
        first = earliest_changed_stage(self.ledger.held(name), trial.fingerprints)
        if trial.key not in self.numbers:
            self.started += 1
            phase("trial", trial.key)
            self.rep.trial_started(self.started, self.n, trial, first)
            self.numbers[trial.key] = self.ledger.start_trial(trial, first, self.sweep.file.grid)
        config_path = db.write_config(trial.sections, self.executor.frames_per_batch,
                                      self.ws.trial_dir(trial.key) / "config.toml")
        return _Unit(db, node, trial, self.numbers[trial.key], config_path,
                     _StageEvents(self.ledger, db, trial, {}, self.rep))

    def _unit_jobs(self, unit: _Unit) -> list[StageJob]:
        first = earliest_changed_stage(self.ledger.held(unit.db.name), unit.trial.fingerprints)
        if first is None:
            return []
        jobs = self._jobs(unit.trial, first, unit.config_path, unit.db, last=unit.node.stage)
        unit.events.runs.update({j.stage: j.run_id for j in jobs})
        return jobs

    def _finished(self, forest: Forest, unit: _Unit, error: BaseException | None) -> None:
        trial, tdir = unit.trial, self.ws.trial_dir(unit.trial.key)
        for s in unit.events.walls:
            self.stage_runs[s] += 1
        try:
            if error is not None:
                raise error
            if unit.node.stage == Stage.SOLVE:
                figures, metrics = self._export(trial, unit.config_path, tdir)
                phase("record", trial.key)
                self._record(trial, unit.number, figures, metrics, unit.config_path, tdir)
                phase("finished", trial.key)
                self.outcome.completed += 1
        except (GridsearchError, sa.exc.OperationalError):
            raise
        except Exception as e:
            reason = str(e) if isinstance(e, StageFailed) else one_line(e)
            unit.events.failed(reason)
            for given_up in forest.failed(unit.db.name, unit.node, self.ledger.held(unit.db.name)):
                self.ledger.fail_trial(self.numbers[given_up.key], reason)
                self.rep.trial_finished(given_up, False, reason)
                self.outcome.failed += 1
            return
        forest.finished(unit.db.name, unit.node, self.ledger.held(unit.db.name))
