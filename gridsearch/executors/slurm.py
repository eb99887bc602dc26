"""Run a trial's stages as SLURM job arrays chained with afterok, watch them with one squeue (+ sacct)
per poll, resubmit a failed task once, and re-attach to live arrays after a driver restart.

A trial is a list of steps (stage, phase): segment [0] then the rest, link, solve even windows then
odd. Every step is submitted up front, each depending (afterok, kill-on-invalid-dep) on the step
before it, so the cluster runs the chain without the driver; the driver only watches and reports.
Job ids go to the ledger (gs_slurm_job) the moment sbatch returns: a killed driver loses nothing."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gridsearch.backends import Backend
from gridsearch.executors.base import Events, Executor, StageFailed, StageJob, SweepCancelled
from gridsearch.executors.local import tail
from gridsearch.ledger import Ledger
from gridsearch.postgres import PASSWORD_ENV
from gridsearch.slurm import dbcheck, job_name, job_names
from gridsearch.slurm.cancel import scancel_ids
from gridsearch.slurm.jobs import JobRow, JobStore
from gridsearch.slurm.status import Poller, TaskState
from gridsearch.slurm.submit import ArrayRequest, compact, expand, max_array_size, split, submit
from gridsearch.spec import Sweep
from gridsearch.stages import Stage
from gridsearch.workspace import Workspace

States = dict[tuple[str, int | None], TaskState]
OkFn = Callable[["_Step", int], bool]
RETRIES = 1  # a task that fails is resubmitted this many times, alone, before the trial fails


@dataclass
class _Array:
    row_id: int
    job_id: str
    indices: list[int]  # array indices; batch = index + offset
    offset: int
    attempt: int

    def batch_index(self, batch: int) -> int | None:
        i = batch - self.offset
        return i if i in self.indices else None


@dataclass
class _Step:
    stage: Stage
    phase: int
    batches: list[int]
    arrays: list[_Array] = field(default_factory=list)
    retries: int = 0

    def latest(self, batch: int) -> tuple[_Array, int] | None:
        """The most recent array that runs `batch` (a retry supersedes the original)."""
        for a in reversed(self.arrays):
            i = a.batch_index(batch)
            if i is not None:
                return a, i
        return None


class SlurmExecutor(Executor):
    def __init__(self, sweep: Sweep, ws: Workspace, backend: Backend, ledger: Ledger) -> None:
        self.sweep, self.ws, self.backend = sweep, ws, backend
        self.spec = sweep.executor
        self.store = JobStore(ledger.engine)
        self.poller = Poller(job_names(sweep), self.spec.poll_seconds)
        self.log_dir = ws.logs / "slurm"
        self._attached: str | None = None
        self.submissions = 0

    # ---- re-attach --------------------------------------------------------------------------
    def reattach(self, trial_key: str, first: Stage) -> bool:
        """True when this trial's arrays from `first` on, submitted by a driver that died, are still
        known to SLURM: the engine must then not clear the database under them."""
        self._attached = None
        active = self.store.rows(state="active")
        others = [r for r in active if r.trial_key != trial_key]
        if others:  # another trial's jobs must not write while this one clears the database
            scancel_ids(sorted({r.job_id for r in others}))
            self.store.set_state([r.id for r in others], "closed")
        mine = [r for r in active if r.trial_key == trial_key]
        older = [r for r in mine if Stage.parse(r.stage) < first]
        self.store.set_state([r.id for r in older], "closed")  # those stages are trusted already
        mine = [r for r in mine if Stage.parse(r.stage) >= first]
        if not any(Stage.parse(r.stage) == first for r in mine) or not self._same_password():
            self._drop(mine)
            return False
        states = self.poller.poll({r.job_id: expand(r.indices) for r in mine})
        if any(s.state == "UNKNOWN" for s in states.values()):
            self._drop(mine)  # SLURM forgot part of it: start these stages over
            return False
        self._attached = trial_key
        return True

    def _same_password(self) -> bool:
        """A managed server gets a fresh random password from every driver unless ULTRACK_DB_PW
        fixes it: queued tasks carry the old one in their environment and could not log in."""
        if self.backend.kind != "postgresql" or not self.sweep.database.managed:
            return True
        from gridsearch.slurm.server import ServerJob

        if isinstance(self.backend.server, ServerJob):
            return self.backend.server.reused  # re-used only with the user's fixed password
        return bool(os.environ.get(PASSWORD_ENV))

    def _drop(self, rows: list[JobRow]) -> None:
        scancel_ids(sorted({r.job_id for r in rows}))
        self.store.set_state([r.id for r in rows], "closed")

    # ---- run ----------------------------------------------------------------------------------
    def run(self, jobs: Sequence[StageJob], events: Events) -> None:
        if not jobs:
            return
        key = jobs[0].trial_key
        by_stage = {j.stage: j for j in jobs}
        steps = [_Step(j.stage, p, list(phase)) for j in jobs for p, phase in enumerate(j.phases) if phase]
        active = self.store.rows(key, "active")
        if self._attached == key:
            for r in active:
                st = next((s for s in steps if s.stage.label == r.stage and s.phase == r.phase), None)
                if st is None:
                    continue
                st.arrays.append(_Array(r.id, r.job_id, expand(r.indices), r.offset, r.attempt))
                st.retries = max(st.retries, r.attempt)
        else:
            self._drop(active)
        self._attached = None
        self._submit_chain(key, steps, 0, by_stage, lambda s, b: self._ok(s, b, self.poller.last), [])
        self._watch(key, steps, by_stage, events)
        self.store.close_trial(key)

    def _submit_chain(self, key: str, steps: list[_Step], start: int, by_stage: dict[Stage, StageJob],
                      ok: OkFn, redo: list[int]) -> None:
        """From step `start` on, submit every batch no array covers yet (plus `redo` in step `start`),
        each step afterok on the previous step's arrays that have not finished."""
        for i in range(start, len(steps)):
            step = steps[i]
            todo = {b for b in step.batches if step.latest(b) is None}
            todo = sorted(todo | set(redo if i == start else ()))
            if not todo:
                continue
            after: list[str] = []
            if i > 0:
                prev = steps[i - 1]
                after = sorted({lt[0].job_id for b in prev.batches
                                if not ok(prev, b) and (lt := prev.latest(b)) is not None})
            job = by_stage[step.stage]
            for offset, idx in split(todo, max_array_size()):
                req = ArrayRequest(
                    name=job_name(self.sweep, step.stage.label), stage=step.stage.label, indices=idx,
                    offset=offset,
                    worker_args=["--stage", step.stage.label, "--config", str(job.config_path),
                                 "--fg", job.foreground, "--ct", job.contours],
                    log_dir=self.log_dir, script_dir=self.log_dir / "scripts", after=after)
                job_id = submit(req, self.spec)
                self.submissions += 1
                row = self.store.add(key, step.stage.label, step.phase, job_id, compact(idx), offset,
                                     step.retries)
                step.arrays.append(_Array(row, job_id, idx, offset, step.retries))

    @staticmethod
    def _state(step: _Step, batch: int, states: States) -> TaskState:
        lt = step.latest(batch)
        if lt is None:
            return TaskState("UNSUBMITTED")
        return states.get((lt[0].job_id, lt[1]), TaskState("PENDING", "", False))

    def _ok(self, step: _Step, batch: int, states: States) -> bool:
        return self._state(step, batch, states).ok

    def _watch(self, key: str, steps: list[_Step], by_stage: dict[Stage, StageJob], events: Events) -> None:
        stages = sorted({s.stage for s in steps})
        started: set[Stage] = set()
        done: set[Stage] = set()
        reported: set[tuple[Stage, int]] = set()
        forgotten_ok: set[tuple[Stage, int]] = set()  # SLURM forgot them; the database has their rows
        while True:
            if self.store.cancelled([a.row_id for s in steps for a in s.arrays]):
                raise SweepCancelled("the sweep's jobs were cancelled (gridsearch cancel)")
            states = self.poller.poll({a.job_id: a.indices for s in steps for a in s.arrays})
            # the database confirms tasks SLURM no longer knows (MinJobAge passed, no accounting)
            for s in steps:
                for b in s.batches:
                    if (self._state(s, b, states).state == "UNKNOWN" and (s.stage, b) not in forgotten_ok
                            and dbcheck.batch_has_rows(by_stage[s.stage].config_path, s.stage, b)):
                        forgotten_ok.add((s.stage, b))

            def ok(s: _Step, b: int, states: States = states) -> bool:
                return self._ok(s, b, states) or (s.stage, b) in forgotten_ok

            for stage in stages:
                ss = [s for s in steps if s.stage == stage]
                if stage not in started:
                    events.stage_started(stage, sum(len(s.batches) for s in ss))
                    started.add(stage)
                for s in ss:
                    for b in s.batches:
                        if (stage, b) not in reported and ok(s, b):
                            reported.add((stage, b))
                            events.batch_done(stage, b)
                if not all(ok(s, b) for s in ss for b in s.batches):
                    break
                if stage not in done:
                    events.stage_done(stage)
                    done.add(stage)
            if len(done) == len(stages):
                return
            for i, s in enumerate(steps):
                sts = {b: self._state(s, b, states) for b in s.batches if not ok(s, b)}
                if not sts:
                    continue
                if any(st.live for st in sts.values()):
                    break
                own = {b: st for b, st in sts.items() if not st.dependency_failed}
                if own and s.retries >= RETRIES:
                    self._give_up(steps, i, own)
                if own:
                    s.retries += 1
                    if s.stage == Stage.LINK:
                        for b in own:
                            dbcheck.drop_link_batch(by_stage[s.stage].config_path, b)
                # later steps hang on this one: cancel them (kill_invalid_depend would too), then
                # resubmit this step's missing batches and everything after it
                scancel_ids(sorted({a.job_id for t in steps[i + 1:] for a in t.arrays}))
                for t in steps[i + 1:]:
                    t.arrays.clear()
                self._submit_chain(key, steps, i, by_stage, ok, sorted(sts))
                break
            self.poller.sleep()

    def _give_up(self, steps: list[_Step], i: int, own: dict[int, TaskState]) -> None:
        s = steps[i]
        later = sorted({a.job_id for t in steps[i:] for a in t.arrays})
        scancel_ids(later)
        b = min(own)
        st = own[b]
        lt = s.latest(b)
        log = self.log_dir / f"{s.stage.label}-{lt[0].job_id}_{lt[1]}.log" if lt else None
        text = tail(log, 10) if log else ""
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
        why = f"{st.state}" + (f" ({st.reason})" if st.reason and st.reason != "None" else "")
        reason = f"{why} after {s.retries} resubmission(s)" + (f": {last}" if last else "")
        raise StageFailed(s.stage, b, reason, log, text)

    def close(self) -> None:
        """Arrays of an interrupted trial stay queued: the ledger holds them for re-attach."""
