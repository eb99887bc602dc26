"""Run a trial's stages as SLURM job arrays chained with afterok: the I/O half of
gridsearch.slurm.chain, which decides. Each poll reads the task states of all arrays (one squeue,
plus one sacct with accounting), then the workers' acknowledgements, and carries out the decision.

Every step is submitted up front, each afterok (kill-on-invalid-dep) on the step before, so the
cluster runs the chain without the driver. Job ids go to the ledger (gs_slurm_job) the moment
sbatch returns: a killed driver loses nothing, and the next one re-attaches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gridsearch import costs
from gridsearch.core.files import tail
from gridsearch.core.secrets import write_pgpass
from gridsearch.executors.base import (
    ConcurrentExecutor,
    Events,
    ExecutorContext,
    Handle,
    StageFailed,
    StageJob,
    SweepCancelled,
)
from gridsearch.slurm import gateway, job_name, job_names
from gridsearch.slurm.chain import Array, Chain, Decision, Event, GiveUp, Report, Submission
from gridsearch.slurm.jobs import JobRow, JobStore
from gridsearch.slurm.parse import Key, TaskState, compact, split
from gridsearch.slurm.paths import JobPaths
from gridsearch.stages import Stage


@dataclass(eq=False)
class _Flight:
    handle: Handle
    key: str  # the trial the arrays are recorded under
    chain: Chain
    jobs: dict[Stage, StageJob]


class SlurmExecutor(ConcurrentExecutor):
    def __init__(self, ctx: ExecutorContext) -> None:
        super().__init__(ctx)
        self.spec = ctx.sweep.executor
        self.store = JobStore(ctx.ledger.engine)
        self.poller = gateway.Poller(job_names(ctx.sweep), self.spec.poll_seconds, notify=ctx.notify)
        self.paths = JobPaths.of(ctx.ws)
        self.submissions = 0  # sbatch calls of this driver
        self.flights: list[_Flight] = []  # chains in flight, one per unit, watched by one poller
        self.strays_checked = False
        self._measured: dict[Stage, costs.StageCost] = {}  # stage costs, once known
        self._told: set[Stage] = set()
        self._cpus: int | None = 0  # the cluster's CPUs (0: not asked yet, None: unknown)
        self.job_env = self._passfile(ctx.backend.env)
        if ctx.ws.cancel_request.exists():  # `gridsearch cancel` while no driver watched
            self.store.mark_all_cancelled()
            ctx.ws.cancel_request.unlink(missing_ok=True)

    @property
    def frames_per_batch(self) -> int:
        return self.spec.frames_per_batch or 1

    def _passfile(self, env: dict[str, str]) -> dict[str, str]:
        """Tasks get the password through a pgpass file, never the environment slurmctld saves."""
        password = env.get("PGPASSWORD")
        if password is None:
            return {}
        return {"PGPASSFILE": str(write_pgpass(self.ctx.ws.pgpass, password))}

    # ---- re-attach ------------------------------------------------------------------------------
    def reattach(self, trial_key: str, first: Stage, database: str) -> dict[Stage, int]:
        """{stage: run id} of this trial's arrays from `first` on that a killed driver left in the
        ledger, finished or not: their workers' acknowledgements say what is done. Queued tasks
        must still be able to log in (stable password), else everything starts over."""
        live = {r for f in self.flights for r in f.chain.row_ids()}  # this driver's other branches
        active = [r for r in self.store.rows(state="active") if r.id not in live]
        withdrawn = [r for r in active if r.trial_key != trial_key]  # must not write while we clear
        mine = [r for r in active if r.trial_key == trial_key]
        self.store.close([r.id for r in mine if Stage.parse(r.stage) < first])  # trusted already
        mine = [r for r in mine if Stage.parse(r.stage) >= first]
        # arrays of this trial writing into another database (a branch of a killed driver that
        # now runs elsewhere) are withdrawn like any other
        where = self.ctx.ledger.run_databases(r.run_id for r in mine if r.run_id is not None)
        withdrawn += [r for r in mine if r.run_id is None or where.get(r.run_id) != database]
        mine = [r for r in mine if r.run_id is not None and where.get(r.run_id) == database]
        # a task index means frames [b*n, (b+1)*n): with another n, queued tasks would read the
        # trial's new config.toml with old indices and skip frames
        runs = {Stage.parse(r.stage): r.run_id for r in mine
                if r.run_id is not None and r.frames_per_batch == self.frames_per_batch}  # latest wins
        if first not in runs or not self.ctx.backend.stable_password:
            runs = {}
        withdrawn += [r for r in mine if runs.get(Stage.parse(r.stage)) != r.run_id
                      or r.frames_per_batch != self.frames_per_batch]
        self._withdraw(withdrawn)
        stray = set() if self.strays_checked else self._cancel_strays()
        self.strays_checked = True  # from here on, every array of this sweep is this driver's
        # gone before anything is cleared: this database next, or the database a withdrawn
        # branch wrote to when its node runs again
        gateway.wait_all_gone(sorted({r.job_id for r in withdrawn} | stray))
        return runs

    def withdraw_earlier(self) -> None:
        """Branches at once resume by withdrawing every array a killed driver left (the stages
        it finished are kept): before the first fork copies a database that one of them still
        writes into. Adopting them branch by branch is left for later."""
        rows = [r for r in self.store.rows(state="active")
                if r.id not in {i for f in self.flights for i in f.chain.row_ids()}]
        self._withdraw(rows)
        stray = set() if self.strays_checked else self._cancel_strays()
        self.strays_checked = True
        gateway.wait_all_gone(sorted({r.job_id for r in rows} | stray))

    def _cancel_strays(self) -> set[str]:
        """Arrays bearing this sweep's names that the ledger never recorded: submitted by a driver
        killed before it could record them, or queued by an sbatch that reported a failure. They
        would write into the database unwatched: cancelled before anything else runs."""
        stages = [job_name(self.ctx.sweep, s.label) for s in Stage]
        live = gateway.patiently(lambda: gateway.live_jobs(stages), gateway.PATIENCE_S,
                                 self.ctx.notify, "squeue")
        stray = set(live) - self.store.job_ids()
        if stray:
            self.ctx.notify(f"cancelling {len(stray)} array(s) of this sweep that no driver recorded: "
                            f"{', '.join(sorted(stray))}")
            gateway.scancel_ids(sorted(stray))
        return stray

    # ---- run --------------------------------------------------------------------------------------
    def start(self, jobs: Sequence[StageJob], events: Events) -> Handle:
        handle = Handle(list(jobs), events)
        if not jobs:
            handle.end()
            return handle
        key = jobs[0].trial_key
        chain = Chain.build((j.stage, j.run_id, j.phases) for j in jobs)
        self._withdraw(chain.adopt(self.store.rows(key, "active")))  # rows of other stage runs
        self.flights.append(_Flight(handle, key, chain, {j.stage: j for j in jobs}))
        return handle

    def poll(self) -> list[Handle]:
        """One squeue (+ sacct) for every chain in flight, then the acknowledgements, then each
        chain's decision carried out; sleeps when nothing ended."""
        if not self.flights:
            return []
        tasks: dict[str, list[int]] = {}
        for f in self.flights:
            tasks.update(f.chain.tasks())
        # the scheduler first, then the acknowledgements: a task finishing in between is seen
        # acknowledged, never COMPLETED without its acknowledgement
        states = self.poller.poll(tasks)
        acked = self.ctx.ledger.acked(sorted({r for f in self.flights for r in f.chain.run_ids()}))
        ended = [f for f in list(self.flights) if self._advance(f, states, acked)]
        self.flights = [f for f in self.flights if f not in ended]
        if not ended:
            self.poller.sleep()
        return [f.handle for f in ended]

    def _advance(self, f: _Flight, states: Mapping[Key, TaskState], acked: Mapping[int, set[int]]) -> bool:
        """Carry out one chain's decision; True once it ended (done or failed)."""
        # after the poll: `cancel` writes its request before scancel, so tasks seen cancelled by
        # it are never mistaken for failures to resubmit
        self._stop_if_cancelled(f.chain)
        decision = f.chain.decide(states, acked)
        _report(decision.reports, f.handle.events)
        try:
            if not decision.finished:
                self._carry_out(f.key, f.chain, decision, f.jobs)
                if decision.submit:  # submitted in the instant a cancel ran: withdrawn too
                    self._stop_if_cancelled(f.chain, withdraw=True)
                return False
        except StageFailed as e:
            self.store.close_trial(f.key)
            f.handle.end(e)
            return True
        self.store.close_trial(f.key)
        f.handle.end()
        return True

    def _stop_if_cancelled(self, chain: Chain, withdraw: bool = False) -> None:
        if self.ctx.ws.cancel_request.exists() or self.store.cancelled(chain.row_ids()):
            if withdraw:
                self._withdraw_arrays(a for step in chain.steps for a in step.arrays)
            raise SweepCancelled("the sweep's jobs were cancelled (gridsearch cancel)")

    def _carry_out(self, key: str, chain: Chain, decision: Decision, jobs: dict[Stage, StageJob]) -> None:
        self._withdraw_arrays(decision.drop)
        if decision.give_up is not None:
            raise self._failure(decision.give_up)
        for submission in decision.submit:
            self._submit(key, chain, submission, jobs[chain.steps[submission.step].stage])

    def _submit(self, key: str, chain: Chain, submission: Submission, job: StageJob) -> None:
        """sbatch the batches (split at MaxArraySize), each array recorded the moment it exists.
        A whole step's first submission may run several batches per task (right-sized tasks)."""
        step = chain.steps[submission.step]
        after = chain.after(submission.step)
        worker_args = self.task(job, None).argv()
        batches = submission.batches
        m = self._per_task(step.stage, batches) if batches == step.batches else 1
        # m == 1: array index = batch - offset; else task t runs batches base + t*m on
        units, base = (batches, 0) if m == 1 else (list(range(-(-len(batches) // m))), batches[0])
        last = batches[-1] if m > 1 else None
        for off, indices in split(units, gateway.max_array_size()):
            offset = base + off * m
            request = gateway.ArrayRequest(
                job_name(self.ctx.sweep, step.stage.label), step.stage.label, indices, offset, worker_args,
                self.paths.logs, self.paths.scripts, after, per_task=m, last=last)
            job_id = gateway.submit_array(request, self.spec, self.job_env, self.ctx.notify)
            self.submissions += 1
            row_id = self.store.add(key, step.stage.label, step.phase, job_id, compact(indices), offset,
                                    submission.attempt, job.run_id, self.frames_per_batch, per_task=m)
            chain.record(submission.step, Array(job_id, indices, offset, submission.attempt, row_id, m, last))

    def _per_task(self, stage: Stage, batches: list[int]) -> int:
        """Batches per task for a whole phase (costs.frames_per_task's rule): once the stage is
        measured, enough that ultrack's start-up stays under a tenth of a task, while the tasks
        still fill the CPUs this branch may use. Batches must be consecutive (one range per task)."""
        if len(batches) < 2 or batches[-1] - batches[0] != len(batches) - 1:
            return 1
        if stage not in self._measured:  # read until measured, then kept: one decision per driver
            self._measured = costs.stage_costs(self.ctx.ledger.measured_batches())
        work = dataclasses.replace(costs.workload(self.ctx.sweep), parallelism=self._parallelism(stage))
        m = costs.batches_per_task(stage, self._measured.get(stage), work, len(batches))
        if m > 1 and stage not in self._told:
            self._told.add(stage)
            c = self._measured[stage]
            self.ctx.notify(f"{stage.label}: {m} frames per task (start-up {c.startup_s:.1f} s, "
                            f"{c.per_frame_s:.1f} s per frame, {work.parallelism} task(s) at once)")
        return m

    def _parallelism(self, stage: Stage) -> int:
        """Tasks that run at once for one branch: max_parallel, no more than the cluster's CPUs
        allow, shared among the branches in flight."""
        if self._cpus == 0:
            self._cpus = gateway.cluster_cpus(self.spec.partition)
        slots = gateway.task_slots(self.spec, stage.label, self._cpus)
        return max(1, slots // max(1, len(self.flights)))

    def _failure(self, give_up: GiveUp) -> StageFailed:
        log = self.paths.task_log(give_up.stage.label, *give_up.task) if give_up.task else None
        text = tail(log, 10)
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        reason = f"{give_up.why} after {give_up.attempts} resubmission(s)" + (f": {last}" if last else "")
        return StageFailed(give_up.stage, give_up.batch, reason, log, text)

    # ---- withdrawing arrays -------------------------------------------------------------------------
    def _withdraw(self, rows: Iterable[JobRow]) -> None:
        rows = list(rows)
        self._cancel([r.id for r in rows], [r.job_id for r in rows])

    def _withdraw_arrays(self, arrays: Iterable[Array]) -> None:
        arrays = list(arrays)
        self._cancel([a.row_id for a in arrays], [a.job_id for a in arrays])

    def _cancel(self, row_ids: list[int], job_ids: list[str]) -> None:
        """Rows closed before scancel: a driver killed in between re-attaches to none of them."""
        self.store.close(row_ids)
        gateway.scancel_ids(sorted(set(job_ids)))

    def close(self) -> None:
        """Arrays of an interrupted trial stay queued (the ledger holds them for re-attach), and so
        does the password file they read; with none left, the file goes."""
        if not self.store.rows(state="active"):
            self.ctx.ws.pgpass.unlink(missing_ok=True)


def _report(reports: Iterable[Report], events: Events) -> None:
    for report in reports:
        if report.event is Event.STAGE_STARTED:
            events.stage_started(report.stage, report.value)
        elif report.event is Event.BATCH_DONE:
            events.batch_done(report.stage, report.value)
        else:
            events.stage_done(report.stage)
