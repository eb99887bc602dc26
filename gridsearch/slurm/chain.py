"""A trial's SLURM chain as a state machine without I/O: from the arrays submitted, the task states
SLURM reports and the batches their workers acknowledged, decide what to report, submit, cancel,
or when to give up. The executor only carries the decisions out.

A batch is done if and only if its worker acknowledged it: SLURM forgets finished tasks, a worker
can die after its task body returned, and a frame with no cells leaves no rows in ultrack's tables.
So a COMPLETED task without an acknowledgement failed, an acknowledged task in FAILED state is done,
and a task SLURM no longer knows (UNKNOWN) is finished: its acknowledgement decides.

Steps run in order, each afterok on the one before: segment [0] then the rest, link, solve even
windows then odd. A step's own failures are resubmitted alone, up to RETRIES times; tasks killed
because a job they waited for failed cost no retry: they are resubmitted behind the step that
failed, with everything after it."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gridsearch.slurm.parse import LIVE_STATES, UNKNOWN, Key, TaskState, expand
from gridsearch.stages import Stage

if TYPE_CHECKING:
    from gridsearch.slurm.jobs import JobRow

RETRIES = 1  # a step's failed tasks are resubmitted this many times, alone, before the trial fails


class Verdict(enum.Enum):
    DONE = "done"  # acknowledged by its worker
    LIVE = "live"  # pending or running: wait
    UNSUBMITTED = "unsubmitted"
    DEPENDENCY = "dependency"  # killed or stuck because a job it waited for failed
    FAILED = "failed"  # finished without an acknowledgement


@dataclass
class Array:
    """One submitted array: task index i runs batches offset + i*per_task ... + per_task - 1 in
    turn, none past `last` (the step's last batch), each acknowledged on its own."""

    job_id: str
    indices: list[int]
    offset: int
    attempt: int
    row_id: int = 0  # its gs_slurm_job row
    per_task: int = 1
    last: int | None = None

    def index_of(self, batch: int) -> int | None:
        d = batch - self.offset
        if d < 0 or (self.last is not None and batch > self.last):
            return None
        i = d // self.per_task
        return i if i in self.indices else None


@dataclass
class Step:
    """One phase of one stage: its batches may run together."""

    stage: Stage
    phase: int
    run_id: int  # the stage run whose batches the workers acknowledge
    batches: list[int]
    arrays: list[Array] = field(default_factory=list)
    retries: int = 0

    def task_of(self, batch: int) -> tuple[Array, int] | None:
        """The most recent array that runs `batch` (a resubmission supersedes the original)."""
        for array in reversed(self.arrays):
            i = array.index_of(batch)
            if i is not None:
                return array, i
        return None


class Event(enum.Enum):
    STAGE_STARTED = "stage_started"
    BATCH_DONE = "batch_done"
    STAGE_DONE = "stage_done"


@dataclass(frozen=True)
class Report:
    event: Event
    stage: Stage
    value: int = 0  # STAGE_STARTED: its number of batches; BATCH_DONE: the batch


@dataclass(frozen=True)
class Submission:
    """Submit these batches of step `step` (split into arrays by the executor), afterok on
    `Chain.after(step)` read just before: the step before may have been submitted a moment ago."""

    step: int
    batches: list[int]
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    stage: Stage
    batch: int
    state: TaskState
    attempts: int
    task: tuple[str, int] | None  # (job id, task index): where its log is

    @property
    def why(self) -> str:
        if self.state.ok:
            return "COMPLETED without its worker's acknowledgement"
        if self.state.state == UNKNOWN:
            return "gone from SLURM without its worker's acknowledgement"
        if self.state.state == "TIMEOUT":
            return f"TIMEOUT: it hit its time limit; raise executor.stages.{self.stage.label}.time"
        reason = self.state.reason
        return self.state.state + (f" ({reason})" if reason and reason != "None" else "")


@dataclass
class Decision:
    """What to do now, in this order: report, then (give up | drop, submit), else wait. A re-run
    batch clears what its failed run wrote itself (gridsearch.rerun)."""

    reports: list[Report] = field(default_factory=list)
    finished: bool = False
    give_up: GiveUp | None = None
    drop: list[Array] = field(default_factory=list)  # scancel, close their rows: superseded
    submit: list[Submission] = field(default_factory=list)

    @property
    def waits(self) -> bool:
        return not (self.finished or self.give_up or self.drop or self.submit)


Verdicts = dict[int, tuple[Verdict, TaskState | None]]  # batch -> verdict, the task's state


class Chain:
    """The steps of one trial and what has been seen of them across polls."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.states: dict[Key, TaskState] = {}
        self.acked: dict[int, set[int]] = {}
        self._reported: set[tuple[Stage, int]] = set()
        self._started: set[Stage] = set()
        self._finished: set[Stage] = set()

    @classmethod
    def build(cls, stages: Iterable[tuple[Stage, int, Sequence[Sequence[int]]]]) -> Chain:
        """From (stage, run id, phases) in order; empty phases are no step."""
        return cls([Step(stage, p, run_id, list(phase)) for stage, run_id, phases in stages
                    for p, phase in enumerate(phases) if phase])

    # ---- what the executor asks ----------------------------------------------------------
    def adopt(self, rows: Iterable[JobRow]) -> list[JobRow]:
        """Re-attach: arrays a previous driver submitted (rows in id order) join their step;
        rows that fit no step (another stage run) are returned: the caller drops them."""
        strays = []
        for row in rows:
            step = next((s for s in self.steps if (s.stage.label, s.phase, s.run_id)
                         == (row.stage, row.phase, row.run_id)), None)
            if step is None:
                strays.append(row)
                continue
            step.arrays.append(Array(row.job_id, expand(row.indices), row.offset, row.attempt, row.id,
                                     row.per_task or 1, max(step.batches)))
            step.retries = max(step.retries, row.attempt)
        return strays

    def record(self, step: int, array: Array) -> None:
        self.steps[step].arrays.append(array)

    def tasks(self) -> dict[str, list[int]]:
        """Job id -> task indices of every array to poll."""
        return {a.job_id: a.indices for s in self.steps for a in s.arrays}

    def row_ids(self) -> list[int]:
        return [a.row_id for s in self.steps for a in s.arrays]

    def run_ids(self) -> list[int]:
        return sorted({s.run_id for s in self.steps})

    def after(self, step: int) -> list[str]:
        """Job ids a submission for `step` waits for: the arrays of the step before that run its
        batches not acknowledged yet (still running, or just resubmitted)."""
        if step == 0:
            return []
        before = self.steps[step - 1]
        done = self.acked.get(before.run_id, set())
        return sorted({task[0].job_id for b in before.batches
                       if b not in done and (task := before.task_of(b)) is not None})

    # ---- the decision ---------------------------------------------------------------------
    def decide(self, states: Mapping[Key, TaskState], acked: Mapping[int, set[int]]) -> Decision:
        """`states` must be read before `acked`: a task that finished in between is then seen
        acknowledged, never COMPLETED without acknowledgement."""
        self._remember(states)
        self.acked = {run: set(batches) for run, batches in acked.items()}
        verdicts = [self._verdicts(step) for step in self.steps]
        decision = Decision(reports=self._reports(verdicts))
        first = next((i for i, v in enumerate(verdicts) if _pending(v)), None)
        if first is None:
            decision.finished = True
        elif _has(verdicts[first], Verdict.LIVE) or not _failures(verdicts[first]):
            decision.submit = self._top_up(first, verdicts)
        else:
            self._resubmit(first, verdicts, decision)
        return decision

    def _remember(self, states: Mapping[Key, TaskState]) -> None:
        """A terminal state is SLURM's last word: a later poll that forgot the task keeps it."""
        for key, state in states.items():
            old = self.states.get(key)
            if old is None or not old.terminal:
                self.states[key] = state

    def _verdicts(self, step: Step) -> Verdicts:
        done = self.acked.get(step.run_id, set())
        out: Verdicts = {}
        for batch in step.batches:
            task = step.task_of(batch)
            state = None if task is None else self.states.get((task[0].job_id, task[1]))
            if batch in done:
                out[batch] = (Verdict.DONE, state)
            elif task is None:
                out[batch] = (Verdict.UNSUBMITTED, None)
            elif state is None:  # submitted after the last poll
                out[batch] = (Verdict.LIVE, None)
            elif state.dependency_failed:
                out[batch] = (Verdict.DEPENDENCY, state)
            else:
                out[batch] = (Verdict.LIVE if state.live else Verdict.FAILED, state)
        return out

    def _reports(self, verdicts: list[Verdicts]) -> list[Report]:
        """Stages in order: started, its acknowledged batches, done; a stage starts once the one
        before it is done."""
        out: list[Report] = []
        for stage in sorted({s.stage for s in self.steps}):
            mine = [v for s, v in zip(self.steps, verdicts, strict=True) if s.stage == stage]
            if stage not in self._started:
                self._started.add(stage)
                out.append(Report(Event.STAGE_STARTED, stage, sum(len(v) for v in mine)))
            for batch in sorted(b for v in mine for b, (verdict, _) in v.items() if verdict is Verdict.DONE):
                if (stage, batch) not in self._reported:
                    self._reported.add((stage, batch))
                    out.append(Report(Event.BATCH_DONE, stage, batch))
            if any(_pending(v) for v in mine):
                break
            if stage not in self._finished:
                self._finished.add(stage)
                out.append(Report(Event.STAGE_DONE, stage))
        return out

    def _top_up(self, first: int, verdicts: list[Verdicts]) -> list[Submission]:
        """Submit batches no array runs yet, in order, up to the first step with a failure."""
        out = []
        for i in range(first, len(self.steps)):
            if _failures(verdicts[i]):
                break
            todo = [b for b, (v, _) in verdicts[i].items() if v is Verdict.UNSUBMITTED]
            if todo:
                out.append(Submission(i, todo, self.steps[i].retries))
        return out

    def _resubmit(self, first: int, verdicts: list[Verdicts], decision: Decision) -> None:
        """Step `first` has no live task and some failed: retry it (own failures cost one retry,
        dependency failures none) and everything after it, or give up."""
        step = self.steps[first]
        own = {b: st or TaskState(UNKNOWN) for b, (v, st) in verdicts[first].items() if v is Verdict.FAILED}
        stuck = [a for a in step.arrays if self._may_run(a)]  # e.g. pending on a failed dependency
        later = [a for s in self.steps[first + 1:] for a in s.arrays]
        if own and step.retries >= RETRIES:
            batch = min(own)
            task = step.task_of(batch)
            where = (task[0].job_id, task[1]) if task else None
            decision.give_up = GiveUp(step.stage, batch, own[batch], step.retries, where)
            decision.drop = stuck + [a for a in later if self._may_run(a)]
            return
        if own:
            step.retries += 1
        decision.drop = stuck + later  # later steps wait for this one: superseded
        step.arrays = [a for a in step.arrays if all(a is not b for b in stuck)]
        for s in self.steps[first + 1:]:
            s.arrays = []
        for i in range(first, len(self.steps)):
            todo = [b for b, (v, _) in verdicts[i].items() if v is not Verdict.DONE]
            if todo:
                decision.submit.append(Submission(i, todo, self.steps[i].retries))

    def _may_run(self, array: Array) -> bool:
        """Some task is not seen yet or still in SLURM's queue (a dependency-stuck one pends)."""
        return any((s := self.states.get((array.job_id, i))) is None or s.state in LIVE_STATES
                   for i in array.indices)


def _has(verdicts: Verdicts, kind: Verdict) -> bool:
    return any(v is kind for v, _ in verdicts.values())


def _pending(verdicts: Verdicts) -> bool:
    return any(v is not Verdict.DONE for v, _ in verdicts.values())


def _failures(verdicts: Verdicts) -> bool:
    return _has(verdicts, Verdict.FAILED) or _has(verdicts, Verdict.DEPENDENCY)
