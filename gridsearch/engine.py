"""The sweep driver: spec -> planner -> executor -> ledger -> results, in one loop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gridsearch import results
from gridsearch.backends import Backend, open_backend
from gridsearch.executors.base import Executor, StageFailed, StageJob, SweepCancelled
from gridsearch.ledger import Ledger
from gridsearch.planner import Plan, make_plan
from gridsearch.progress import Reporter, Silent
from gridsearch.spec import SpecError, Sweep, Trial
from gridsearch.stages import Stage, earliest_changed_stage
from gridsearch.ultrackdb import UltrackDB, stage_phases
from gridsearch.worker import fd_redirect
from gridsearch.workspace import Workspace

MAIN_DB = "main"


@dataclass
class Outcome:
    completed: int
    failed: int
    skipped: int
    stage_runs: dict[Stage, int]
    wall_s: float


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM (scancel, kill, a batch system's timeout) unwinds like Ctrl-C: finally blocks run,
    workers and servers stop, and the ledger is left as a kill would leave it: recoverable."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
    dest = ws.root / "archive" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in movable:
        shutil.move(str(p), dest / p.name)
    shutil.rmtree(ws.root / "db", ignore_errors=True)  # ultrack databases are caches of the above
    return dest


def make_executor(sweep: Sweep, ws: Workspace, backend: Backend, ledger: Ledger) -> Executor:
    ex = sweep.executor
    if ex.kind == "slurm":
        from gridsearch.executors.slurm import SlurmExecutor

        return SlurmExecutor(sweep, ws, backend, ledger)
    if ex.workers == 1 and backend.kind == "sqlite":
        from gridsearch.executors.local import InProcessExecutor

        return InProcessExecutor(ws.logs)
    from gridsearch.executors.local import PoolExecutor

    return PoolExecutor(ex.workers, ws.logs, backend.env)


def frames_per_batch(sweep: Sweep) -> int:
    return sweep.executor.frames_per_batch if sweep.executor.kind == "slurm" else 1


class _StageEvents:
    """Executor callbacks -> ledger writes; the ledger is the only place a stage becomes trusted."""

    def __init__(self, ledger: Ledger, db: UltrackDB, trial: Trial, reporter: Reporter) -> None:
        self.ledger, self.db, self.trial, self.reporter = ledger, db, trial, reporter
        self.runs: dict[Stage, int] = {}
        self.walls: dict[Stage, float] = {}

    def stage_started(self, stage: Stage, n_batches: int) -> None:
        self.runs[stage] = self.ledger.begin_stage(
            self.db.name, stage, self.trial.key, self.trial.fps[stage], n_batches
        )
        self.reporter.stage_started(stage, n_batches)

    def batch_done(self, stage: Stage, batch: int) -> None:
        self.ledger.batch_done(self.runs[stage])
        self.reporter.batch_done(stage, batch)

    def stage_done(self, stage: Stage) -> None:
        wall = self.ledger.finish_stage(self.runs[stage], self.db.name, stage, self.trial.fps[stage])
        self.walls[stage] = wall
        self.reporter.stage_done(stage, wall)


@contextlib.contextmanager
def existing_ledger(sweep: Sweep) -> Iterator[Ledger | None]:
    """For read-only views: None when the sweep has no state yet (and nothing gets created)."""
    ws = Workspace(sweep.workdir)
    if not ws.exists():
        yield None
        return
    with open_backend(sweep, ws, read_only=True) as backend:
        ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs)
        try:
            yield ledger
        finally:
            ledger.close()


def plan_for(sweep: Sweep, ledger: Ledger | None) -> Plan:
    if ledger is None:
        return make_plan(sweep.trials, {}, set())
    return make_plan(sweep.trials, ledger.held(MAIN_DB), ledger.finished_keys())


def run_sweep(sweep: Sweep, *, restart: bool = False, reporter: Reporter | None = None) -> Outcome:
    rep = reporter or Silent()
    ws = Workspace(sweep.workdir)
    t0 = time.perf_counter()
    with terminate_as_exit(), ws.lock():
        if restart:
            dest = archive(ws)
            if dest:
                rep.message(f"previous results archived in {dest}")
        with open_backend(sweep, ws) as backend:
            if restart and backend.kind != "sqlite":
                from gridsearch.pgbackend import archive_state

                old = archive_state(backend)
                if old:
                    rep.message(f"previous ledger kept in database {old}")
            ledger = Ledger(backend.ledger_url, sweep.name, backend.engine_kwargs)
            try:
                check_compatible(ledger, sweep)
                n = ledger.recover()
                if n:
                    rep.message(f"{n} interrupted stage run(s) found: their results will be recomputed")
                plan = plan_for(sweep, ledger)
                db = backend.ultrack_db(MAIN_DB)
                executor = make_executor(sweep, ws, backend, ledger)
                rep.sweep_started(plan)
                try:
                    outcome = _run_plan(sweep, ws, plan, ledger, db, executor, rep)
                finally:
                    executor.close()
                    rep.close()
            finally:
                ledger.close()
    outcome.wall_s = time.perf_counter() - t0
    return outcome


def _run_plan(
    sweep: Sweep,
    ws: Workspace,
    plan: Plan,
    ledger: Ledger,
    db: UltrackDB,
    executor: Executor,
    rep: Reporter,
) -> Outcome:
    completed = failed = 0
    runs = {s: 0 for s in Stage}
    pending = plan.pending
    provenance = {"ultrack": version("ultrack"), "gridsearch": version("gridsearch")}
    if pending:
        results.warm_up_in_background()
    for k, p in enumerate(pending, start=1):
        trial = p.trial
        # The plan fixed the order; what to clear is decided against the database as it is now.
        first = earliest_changed_stage(ledger.held(db.name), trial.fps)
        rep.trial_started(k, len(pending), trial, first)
        number = ledger.start_trial(trial, first, sweep.file.grid)
        tdir = ws.trial_dir(trial.key)
        config_path = db.write_config(trial.sections, frames_per_batch(sweep), tdir / "config.toml")
        events = _StageEvents(ledger, db, trial, rep)
        try:
            if first is not None:
                ledger.invalidate(db.name, first)
                if not executor.reattach(trial.key, first):  # live jobs of a killed driver: keep
                    db.clear(first)
                jobs = [
                    StageJob(
                        s,
                        stage_phases(
                            s,
                            sweep.shape[0],
                            frames_per_batch(sweep),
                            trial.sections["tracking"].get("window_size"),
                        ),
                        config_path,
                        str(sweep.file.data.foreground),
                        str(sweep.file.data.contours),
                        trial.key,
                    )
                    for s in Stage
                    if s >= first
                ]
                executor.run(jobs, events)
            with fd_redirect(ws.logs / "ultrack.log"):
                figures, metrics = results.export_trial(
                    config_path, tdir, sweep.shape[0], sweep.file.data.ground_truth,
                    sweep.file.keep_label_images,
                )
        except SweepCancelled:
            raise  # the trial stays as a kill leaves it: resumable
        except Exception as e:  # a stage, the clear or the export failed: this trial, not the sweep
            reason = str(e) if isinstance(e, StageFailed) else _one_line(e)
            for stage, run_id in events.runs.items():
                if stage not in events.walls:
                    ledger.fail_stage(run_id, reason)
            ledger.fail_trial(number, reason)
            rep.trial_finished(trial, False, reason)
            failed += 1
            continue
        finally:
            for s in events.walls:
                runs[s] += 1
        walls = ledger.stage_wall(trial.key)
        attrs: dict[str, Any] = {
            "figures": figures,
            "metrics": metrics,
            **{f"{s.label}_s": round(walls[s], 3) for s in walls},
            "config": str(config_path),
            "tracks_csv": str(tdir / "tracks.csv"),
            "host": os.uname().nodename,
            **provenance,
        }
        value = {**figures, **metrics}.get(sweep.objective, float("nan"))
        ledger.finish_trial(number, float(value), attrs)
        rep.trial_finished(trial, True, "")
        completed += 1
    return Outcome(completed, failed, len(plan.trials) - len(pending), runs, 0.0)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
