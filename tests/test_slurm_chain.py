"""The SLURM chain's decisions on recorded task states and acknowledgements: no cluster, no database.

Each test drives gridsearch.slurm.chain the way the executor does (decide, then record the arrays
it submits) and checks one rule: a batch is done iff its worker acknowledged it."""

from __future__ import annotations

import itertools

from gridsearch.slurm.chain import RETRIES, Array, Chain, Decision, Event, Report, Submission
from gridsearch.slurm.jobs import JobRow
from gridsearch.slurm.parse import Key, TaskState, parse_squeue
from gridsearch.stages import Stage

SEG, LINK, SOLVE = 1, 2, 3  # stage run ids
RUN = {Stage.SEGMENT: SEG, Stage.LINK: LINK, Stage.SOLVE: SOLVE}
# steps: 0 segment [0], 1 segment [1-3], 2 link [0-2], 3 solve [0]
PLAN = [(Stage.SEGMENT, SEG, [[0], [1, 2, 3]]), (Stage.LINK, LINK, [[0, 1, 2]]), (Stage.SOLVE, SOLVE, [[0]])]

DONE = TaskState("COMPLETED", "None")
RUNNING = TaskState("RUNNING", "None")
FAILED = TaskState("FAILED", "NonZeroExitCode")
GONE = TaskState("UNKNOWN")  # SLURM forgot it: MinJobAge passed, no accounting
DEP_KILLED = TaskState("CANCELLED", "DependencyNeverSatisfied")


class Driver:
    """Plays the executor: submits what the chain decides, with job ids 100, 101, ..."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.ids = itertools.count(100)
        self.jobs: dict[int, list[str]] = {}  # step -> job ids, in submission order
        self.after: dict[str, list[str]] = {}  # job id -> what it waits for

    def step(self, states: dict[Key, TaskState], acked: dict[int, set[int]]) -> Decision:
        d = self.chain.decide(states, acked)
        for sub in d.submit:
            job = str(next(self.ids))
            self.after[job] = self.chain.after(sub.step)
            self.chain.record(sub.step, Array(job, list(sub.batches), 0, sub.attempt, int(job)))
            self.jobs.setdefault(sub.step, []).append(job)
        return d

    def last(self, step: int) -> str:
        return self.jobs[step][-1]


def tasks(job: str, **by_index: TaskState) -> dict[Key, TaskState]:
    return {(job, int(i[1:])): st for i, st in by_index.items()}


def acks(**by_stage: list[int]) -> dict[int, set[int]]:
    return {RUN[Stage.parse(s)]: set(b) for s, b in by_stage.items()}


def started() -> Driver:
    """The whole chain submitted; segment done and acknowledged; link's array runs."""
    drv = Driver(Chain.build(PLAN))
    drv.step({}, {})
    seg0, seg1, link, solve = (drv.last(i) for i in range(4))
    states = {**tasks(seg0, i0=DONE), **tasks(seg1, i1=DONE, i2=DONE, i3=DONE),
              **tasks(link, i0=RUNNING, i1=RUNNING, i2=RUNNING), **tasks(solve, i0=TaskState("PENDING"))}
    d = drv.step(states, acks(segment=[0, 1, 2, 3]))
    assert d.waits and not d.submit
    return drv


def test_first_decision_submits_every_step_each_after_the_one_before() -> None:
    drv = Driver(Chain.build(PLAN))
    d = drv.step({}, {})
    assert [(s.step, s.batches, s.attempt) for s in d.submit] == [
        (0, [0], 0), (1, [1, 2, 3], 0), (2, [0, 1, 2], 0), (3, [0], 0)]
    assert [drv.after[drv.last(i)] for i in range(4)] == [[], ["100"], ["101"], ["102"]]
    assert d.reports == [Report(Event.STAGE_STARTED, Stage.SEGMENT, 4)]


def test_live_tasks_wait_and_acknowledged_batches_are_reported_in_stage_order() -> None:
    drv = started()
    link = drv.last(2)
    d = drv.step(tasks(link, i0=DONE, i1=RUNNING, i2=RUNNING), acks(segment=[0, 1, 2, 3], link=[0]))
    assert d.waits
    assert d.reports == [Report(Event.BATCH_DONE, Stage.LINK, 0)]
    assert drv.chain.decide({}, {}).reports == []  # reported once


def test_failed_task_is_resubmitted_alone_and_later_steps_behind_it() -> None:
    drv = started()
    link, solve = drv.last(2), drv.last(3)
    d = drv.step({**tasks(link, i0=DONE, i1=DONE, i2=FAILED), **tasks(solve, i0=DEP_KILLED)},
                 acks(segment=[0, 1, 2, 3], link=[0, 1]))
    assert d.give_up is None and drv.chain.steps[2].retries == 1
    assert [(s.step, s.batches, s.attempt) for s in d.submit] == [(2, [2], 1), (3, [0], 0)]
    assert [a.job_id for a in d.drop] == [solve]  # superseded: its row is closed
    retry, new_solve = drv.last(2), drv.last(3)
    assert drv.after[retry] == [] and drv.after[new_solve] == [retry]


def test_a_second_failure_of_the_step_gives_up() -> None:
    drv = started()
    link, solve = drv.last(2), drv.last(3)
    drv.step({**tasks(link, i0=DONE, i1=DONE, i2=FAILED), **tasks(solve, i0=DEP_KILLED)},
             acks(segment=[0, 1, 2, 3], link=[0, 1]))
    retry, new_solve = drv.last(2), drv.last(3)
    d = drv.step({**tasks(retry, i2=FAILED), **tasks(new_solve, i0=TaskState("PENDING", "Dependency"))},
                 acks(segment=[0, 1, 2, 3], link=[0, 1]))
    assert RETRIES == 1 and d.give_up is not None and not d.submit
    assert (d.give_up.stage, d.give_up.batch, d.give_up.attempts) == (Stage.LINK, 2, 1)
    assert d.give_up.task == (retry, 2) and d.give_up.why == "FAILED (NonZeroExitCode)"
    assert [a.job_id for a in d.drop] == [new_solve]  # still queued: cancel it


def test_dependency_failures_are_resubmitted_behind_without_costing_a_retry() -> None:
    drv = Driver(Chain.build(PLAN))
    drv.step({}, {})
    seg0, seg1, link, solve = (drv.last(i) for i in range(4))
    d = drv.step({**tasks(seg0, i0=DONE), **tasks(seg1, i1=DONE, i2=FAILED, i3=DONE),
                  **tasks(link, i0=DEP_KILLED, i1=DEP_KILLED, i2=DEP_KILLED), **tasks(solve, i0=DEP_KILLED)},
                 acks(segment=[0, 1, 3]))
    assert (drv.chain.steps[1].retries, drv.chain.steps[2].retries) == (1, 0)
    assert [(s.step, s.batches, s.attempt) for s in d.submit] == [(1, [2], 1), (2, [0, 1, 2], 0), (3, [0], 0)]
    seg_retry, link2 = drv.last(1), drv.last(2)
    assert drv.after[link2] == [seg_retry]
    # link fails on its own now: it still has its retry
    d = drv.step({**tasks(seg_retry, i2=DONE), **tasks(link2, i0=DONE, i1=FAILED, i2=DONE),
                  **tasks(drv.last(3), i0=DEP_KILLED)}, acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert d.give_up is None and drv.chain.steps[2].retries == 1


def test_a_step_killed_by_its_dependency_alone_is_resubmitted_for_free() -> None:
    """A segment task acknowledged but FAILED (it died after its acknowledgement) breaks afterok:
    link is killed although segment is done. Link goes again, with no dependency, no retry used."""
    drv = started()
    seg1, link, solve = drv.last(1), drv.last(2), drv.last(3)
    d = drv.step({**tasks(seg1, i1=DONE, i2=FAILED, i3=DONE), **tasks(link, i0=DEP_KILLED, i1=DEP_KILLED,
                  i2=DEP_KILLED), **tasks(solve, i0=DEP_KILLED)}, acks(segment=[0, 1, 2, 3]))
    assert drv.chain.steps[1].retries == drv.chain.steps[2].retries == 0
    assert [(s.step, s.batches) for s in d.submit] == [(2, [0, 1, 2]), (3, [0])]
    assert drv.after[drv.last(2)] == []


def test_forgotten_tasks_are_judged_by_their_acknowledgement() -> None:
    drv = started()
    link, solve = drv.last(2), drv.last(3)
    d = drv.step({**tasks(link, i0=GONE, i1=GONE, i2=GONE), **tasks(solve, i0=DEP_KILLED)},
                 acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert d.reports == [Report(Event.BATCH_DONE, Stage.LINK, 0), Report(Event.BATCH_DONE, Stage.LINK, 2)]
    assert drv.chain.steps[2].retries == 1
    assert [(s.step, s.batches) for s in d.submit] == [(2, [1]), (3, [0])]
    d = drv.step(tasks(drv.last(2), i1=GONE), acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert d.give_up is not None and d.give_up.why == "gone from SLURM without its worker's acknowledgement"


def test_forgotten_and_acknowledged_everywhere_finishes() -> None:
    drv = started()
    link, solve = drv.last(2), drv.last(3)
    d = drv.step({**tasks(link, i0=GONE, i1=GONE, i2=GONE), **tasks(solve, i0=GONE)},
                 acks(segment=[0, 1, 2, 3], link=[0, 1, 2], solve=[0]))
    assert d.finished and not d.submit and not d.drop
    assert d.reports[-3:] == [Report(Event.STAGE_STARTED, Stage.SOLVE, 1),
                              Report(Event.BATCH_DONE, Stage.SOLVE, 0), Report(Event.STAGE_DONE, Stage.SOLVE)]


def test_completed_without_acknowledgement_is_a_failure() -> None:
    drv = started()
    link, solve = drv.last(2), drv.last(3)
    states = {**tasks(link, i0=DONE, i1=DONE, i2=DONE), **tasks(solve, i0=TaskState("PENDING"))}
    d = drv.step(states, acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert drv.chain.steps[2].retries == 1 and [s.batches for s in d.submit] == [[1], [0]]
    assert [a.job_id for a in d.drop] == [solve]
    d = drv.step({**tasks(drv.last(2), i1=DONE)}, acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert d.give_up is not None and d.give_up.why == "COMPLETED without its worker's acknowledgement"


def test_acknowledged_task_in_failed_state_is_done() -> None:
    drv = started()
    link = drv.last(2)
    d = drv.step(tasks(link, i0=FAILED, i1=TaskState("TIMEOUT", "TimeLimit"), i2=DONE),
                 acks(segment=[0, 1, 2, 3], link=[0, 1, 2]))
    assert drv.chain.steps[2].retries == 0 and not d.submit and d.give_up is None
    assert Report(Event.STAGE_DONE, Stage.LINK) in d.reports


def test_terminal_states_are_remembered_when_slurm_forgets_them() -> None:
    """Killed by a failed dependency, then forgotten: still no retry of its own."""
    drv = Driver(Chain.build([(Stage.SEGMENT, SEG, [[0], [1]]), (Stage.LINK, LINK, [[0]])]))
    drv.step({}, {})
    seg0, seg1, link = (drv.last(i) for i in range(3))
    d = drv.step({**tasks(seg0, i0=DONE), **tasks(seg1, i1=RUNNING), **tasks(link, i0=DEP_KILLED)},
                 acks(segment=[0]))
    assert d.waits  # segment still runs
    d = drv.step({**tasks(seg1, i1=GONE), **tasks(link, i0=GONE)}, acks(segment=[0, 1]))
    assert drv.chain.steps[2].retries == 0
    assert [(s.step, s.batches, s.attempt) for s in d.submit] == [(2, [0], 0)]


def test_reattach_from_recorded_rows() -> None:
    rows = [JobRow(1, "k", "segment", 0, "50", "0", 0, 0, "active", 0.0, SEG),
            JobRow(2, "k", "segment", 1, "51", "0-2", 1, 0, "active", 0.0, SEG),
            JobRow(3, "k", "link", 0, "52", "0-2", 0, 0, "active", 0.0, LINK),
            JobRow(4, "k", "link", 0, "53", "1", 0, 1, "active", 0.0, LINK),  # its retry
            JobRow(5, "k", "solve", 0, "54", "0", 0, 0, "active", 0.0, SOLVE),
            JobRow(6, "k", "solve", 0, "40", "0", 0, 0, "active", 0.0, 99)]  # an older stage run
    chain = Chain.build(PLAN)
    strays = chain.adopt(rows)
    assert [r.id for r in strays] == [6]
    assert chain.tasks() == {"50": [0], "51": [0, 1, 2], "52": [0, 1, 2], "53": [1], "54": [0]}
    assert chain.row_ids() == [1, 2, 3, 4, 5] and chain.run_ids() == [SEG, LINK, SOLVE]
    # squeue forgot every finished task while no driver watched; the ledger kept the acknowledgements
    squeue = parse_squeue("54_[0]|54|54|0|PENDING|Dependency|n\n")
    states = {**{(j, i): GONE for j, idx in chain.tasks().items() for i in idx}, **squeue}
    d = chain.decide(states, acks(segment=[0, 1, 2, 3], link=[0, 2]))
    assert d.give_up is not None  # link's retry was used by the previous driver
    assert (d.give_up.batch, d.give_up.task, d.give_up.attempts) == (1, ("53", 1), 1)
    assert [a.job_id for a in d.drop] == ["54"]
    assert Report(Event.STAGE_DONE, Stage.SEGMENT) in d.reports


def test_reattach_waits_for_live_arrays_and_submits_what_the_dead_driver_had_not() -> None:
    rows = [JobRow(1, "k", "segment", 0, "50", "0", 0, 0, "active", 0.0, SEG),
            JobRow(2, "k", "segment", 1, "51", "0-2", 1, 0, "active", 0.0, SEG)]
    chain = Chain.build(PLAN)
    assert chain.adopt(rows) == []
    d = chain.decide({**tasks("50", i0=GONE), **tasks("51", i0=RUNNING, i1=DONE, i2=RUNNING)},
                     acks(segment=[0, 2]))
    assert d.submit == [Submission(2, [0, 1, 2], 0), Submission(3, [0], 0)]
    assert chain.after(2) == ["51"]


def test_a_task_that_hit_its_time_limit_names_the_setting_to_raise() -> None:
    from gridsearch.slurm.chain import GiveUp

    why = GiveUp(Stage.LINK, 1, TaskState("TIMEOUT", "TimeLimit"), 1, None).why
    assert why.startswith("TIMEOUT") and "executor.stages.link.time" in why
    assert "executor.stages" not in GiveUp(Stage.LINK, 1, FAILED, 1, None).why


def test_a_task_of_several_batches_is_judged_batch_by_batch() -> None:
    """Right-sized tasks: task i runs batches 2i, 2i+1 in turn. One killed after its first batch
    leaves that batch done (acknowledged) and only the second resubmitted, one batch per task."""
    chain = Chain.build([(Stage.LINK, LINK, [[0, 1, 2, 3, 4]])])
    d = chain.decide({}, {})
    assert d.submit == [Submission(0, [0, 1, 2, 3, 4], 0)]
    chain.record(0, Array("70", [0, 1, 2], 0, 0, 1, per_task=2, last=4))
    assert [chain.steps[0].task_of(b)[1] for b in range(5)] == [0, 0, 1, 1, 2]
    assert chain.steps[0].task_of(5) is None  # past the step's last batch
    d = chain.decide(tasks("70", i0=DONE, i1=FAILED, i2=RUNNING), {LINK: {0, 1, 2}})
    assert d.waits and [r.value for r in d.reports if r.event is Event.BATCH_DONE] == [0, 1, 2]
    d = chain.decide(tasks("70", i0=DONE, i1=FAILED, i2=DONE), {LINK: {0, 1, 2, 4}})
    assert d.submit == [Submission(0, [3], 1)] and d.give_up is None


def test_reattach_keeps_what_a_task_index_meant() -> None:
    rows = [JobRow(1, "k", "link", 0, "52", "0-1", 0, 0, "active", 0.0, LINK, 1, per_task=2)]
    chain = Chain.build([(Stage.LINK, LINK, [[0, 1, 2]])])
    assert chain.adopt(rows) == []
    d = chain.decide(tasks("52", i0=GONE, i1=RUNNING), {LINK: {0, 1}})
    assert d.waits  # batch 2 is task 1's, still running: nothing resubmitted
    d = chain.decide(tasks("52", i0=GONE, i1=GONE), {LINK: {0, 1}})
    assert d.submit == [Submission(0, [2], 1)]
