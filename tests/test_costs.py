"""The cost model: frames per task from start-up and per-frame cost, and remaining time and
core-hours from measured batches (synthetic ack rows; the real sweep is in test_views_costs)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridsearch.costs import (
    MIN_BATCHES,
    STARTUP_SHARE,
    Estimate,
    StageCost,
    Workload,
    batches_per_task,
    branch_estimate,
    duration,
    estimate,
    frames_per_task,
    stage_costs,
)
from gridsearch.planner import make_plan
from gridsearch.spec import Trial
from gridsearch.stages import Stage, fingerprints
from gridsearch.worker import frames_of


# ---- frames per task ----------------------------------------------------------------------------
def _ok(startup: float, per_frame: float, n: int) -> bool:
    return startup <= STARTUP_SHARE * (startup + n * per_frame)


costs_st = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)


@given(per_frame=costs_st, startup=costs_st, frames=st.integers(1, 5000), parallel=st.integers(1, 500))
def test_frames_per_task_keeps_startup_small_unless_parallelism_needs_smaller_tasks(
        per_frame: float, startup: float, frames: int, parallel: int) -> None:
    n = frames_per_task(per_frame, startup, frames, parallel, None)
    assert 1 <= n <= frames
    fills = math.ceil(frames / n) >= parallel
    if frames >= parallel:
        assert fills  # filling the allowed parallelism beats the 10% target
    if n > 1:
        # the smallest such n: one fewer frame would break the 10% rule
        assert not _ok(startup, per_frame, n - 1)
    if not _ok(startup, per_frame, n) and n < frames:
        # the 10% rule was given up only to fill the parallelism: one more frame a task would
        # leave a slot without a full task
        assert (n + 1) * parallel > frames


@given(explicit=st.integers(1, 1000), per_frame=costs_st, startup=costs_st)
def test_explicit_frames_per_batch_wins(explicit: int, per_frame: float, startup: float) -> None:
    assert frames_per_task(per_frame, startup, 100, 4, explicit) == explicit


def test_frames_per_task_examples() -> None:
    # ultrack's start-up of 5 s, 1 s a frame: 45 frames keep it at 10% (5 <= 0.1 * 50)
    assert frames_per_task(1.0, 5.0, 10_000, 20, None) == 45
    # 400 frames on 20 slots: tasks of 20 frames, 20% start-up, every slot busy
    assert frames_per_task(1.0, 5.0, 400, 20, None) == 20
    assert frames_per_task(1.0, 0.0, 400, 20, None) == 1  # no start-up: the smallest task
    assert frames_per_task(0.0, 5.0, 400, 1, None) == 400  # free frames: one task
    assert frames_per_task(1e-320, 5.0, 400, 1, None) == 400  # no overflow
    assert frames_per_task(1.0, 5.0, 3, 20, None) == 1  # fewer frames than slots


# ---- the model from measured batches -----------------------------------------------------------
def _row(stage: str, wall: float, frames: int = 1, cpu: float | None = None, startup: float | None = 5.0,
         paid: bool = False, rss: float = 100.0) -> dict[str, Any]:
    return {"stage": stage, "wall_s": wall, "cpu_s": wall if cpu is None else cpu, "max_rss_mb": rss,
            "frames": frames, "startup_s": startup, "paid_startup": paid}


def test_a_stage_is_unknown_until_min_batches_are_measured() -> None:
    rows = [_row("segment", 2.0, paid=True)] + [_row("segment", 2.0)] * (MIN_BATCHES - 2)
    assert stage_costs(rows) == {}
    rows.append(_row("segment", 2.0))
    assert set(stage_costs(rows)) == {Stage.SEGMENT}


def test_medians_ignore_an_outlier_and_peak_is_the_largest() -> None:
    rows = [_row("link", 2.0, frames=2, cpu=4.0, paid=True, rss=300.0), _row("link", 3.0, frames=3),
            _row("link", 100.0, frames=1, rss=900.0), _row("solve", 1.0, startup=None),
            _row("link", 0.0, frames=0)]  # a batch past the last frame with cells: no frames
    c = stage_costs(rows)[Stage.LINK]
    assert c == StageCost(batches=3, per_frame_s=1.0, cpu_per_frame_s=2.0, startup_s=5.0, peak_mb=900.0)


def test_acks_without_startup_give_zero_startup() -> None:
    c = stage_costs([_row("solve", 1.0, startup=None)] * 3)[Stage.SOLVE]
    assert c.startup_s == 0.0


def _trials(n_seg: int, n_app: int, window: int | None = None) -> list[Trial]:
    out = []
    for i in range(n_seg):
        for j in range(n_app):
            sections = {"segmentation": {"min_area": i}, "linking": {"max_distance": 1},
                        "tracking": {"appear_weight": j, "window_size": window}}
            out.append(Trial(len(out), {"segmentation.min_area": i, "tracking.appear_weight": j},
                             sections, fingerprints(sections, "data")))
    return out


FLAT = {s: StageCost(3, per_frame_s=1.0, cpu_per_frame_s=2.0, startup_s=5.0, peak_mb=1.0) for s in Stage}


def test_estimate_sums_the_pending_stage_runs() -> None:
    plan = make_plan(_trials(2, 2), {}, set())  # stage runs: 2 segment, 2 link, 4 solve
    work = Workload(n_frames=10, frames_per_batch=1, parallelism=1, startup_per_task=False)
    est = estimate(plan, FLAT, work)
    # segment 10 frames, link 9, solve 10 (one window): 1 s wall and 2 s CPU a frame
    assert est == Estimate(wall_s=2 * 10 + 2 * 9 + 4 * 10, core_hours=2 * 78 / 3600, measured=9)
    # 10 slots: segment's phases (batch 0, then 9), link all at once, solve one window each
    wide = estimate(plan, FLAT, Workload(10, 1, 10, False))
    assert wide is not None and wide.wall_s == 2 * 2 + 2 * 1 + 4 * 10
    # SLURM: every task pays the start-up
    slurm = estimate(plan, FLAT, Workload(10, 1, 10, True))
    assert slurm is not None and slurm.wall_s == 2 * 12 + 2 * 6 + 4 * 15
    assert est is not None
    assert est.line() == "estimated remaining: 1 min wall, 0.0 core-hours (from 9 measured batches)"


def test_right_sized_tasks_pay_the_start_up_once_per_task() -> None:
    """SLURM without an explicit frames_per_batch: a phase's batches share tasks (start-up 5 s
    against 1 s a frame calls for 45 frames a task; 2 slots cap it at half a phase)."""
    plan = make_plan(_trials(1, 1), {}, set())
    auto = Workload(10, 1, 2, True, auto_tasks=True)
    assert batches_per_task(Stage.SEGMENT, FLAT[Stage.SEGMENT], auto, 9) == 4
    assert batches_per_task(Stage.SOLVE, FLAT[Stage.SOLVE], auto, 9) == 1  # windows stay whole tasks
    assert batches_per_task(Stage.LINK, None, auto, 9) == 1  # not measured yet
    assert batches_per_task(Stage.LINK, FLAT[Stage.LINK], Workload(10, 1, 2, True), 9) == 1  # explicit
    est, one = estimate(plan, FLAT, auto), estimate(plan, FLAT, Workload(10, 1, 2, True))
    # segment: batch 0 (6 s), then 9 batches in 3 tasks of 4, 4, 1 on 2 slots: 2 waves of 5 + 4 s;
    # link 9 batches: the same; solve one window (15 s). One batch a task: 5 waves of 6 s each
    assert est is not None and one is not None
    assert est.wall_s == 6 + 2 * 9 + 2 * 9 + 15
    assert one.wall_s == 6 + 5 * 6 + 5 * 6 + 15
    assert est.core_hours < one.core_hours  # fewer start-ups


def test_estimate_is_unknown_while_a_needed_stage_is_unmeasured_and_zero_when_all_is_done() -> None:
    trials = _trials(1, 2)
    plan = make_plan(trials, {}, set())
    work = Workload(10, 1, 1, False)
    assert estimate(plan, {Stage.SEGMENT: FLAT[Stage.SEGMENT], Stage.LINK: FLAT[Stage.LINK]}, work) is None
    held = dict(trials[0].fingerprints)
    only_solve = make_plan(trials, {Stage.SEGMENT: held[Stage.SEGMENT], Stage.LINK: held[Stage.LINK],
                                    Stage.SOLVE: None}, set())
    est = estimate(only_solve, {Stage.SOLVE: FLAT[Stage.SOLVE]}, work)
    assert est is not None and est.wall_s == 2 * 10
    done = make_plan(trials, {}, {t.key for t in trials})
    assert estimate(done, FLAT, work) == Estimate(0.0, 0.0, 9)


def test_solve_windows_count_as_batches() -> None:
    plan = make_plan(_trials(1, 1, window=4), {}, set())
    est = estimate(plan, {Stage.SOLVE: FLAT[Stage.SOLVE], Stage.SEGMENT: FLAT[Stage.SEGMENT],
                          Stage.LINK: FLAT[Stage.LINK]}, Workload(10, 1, 10, True))
    # segment 5+5+... : 2 phases of 6 s; link 1 wave of 6 s; solve windows of 4 frames, even then odd
    assert est is not None and est.wall_s == 12 + 6 + 2 * 9


@pytest.mark.parametrize(("stage", "batch", "n", "window", "frames"), [
    (Stage.SEGMENT, 0, 3, None, 3), (Stage.SEGMENT, 3, 3, None, 1), (Stage.SEGMENT, None, 3, None, 10),
    (Stage.LINK, 2, 3, None, 3), (Stage.LINK, 3, 3, None, 0), (Stage.LINK, None, 1, None, 9),
    (Stage.SOLVE, 0, 1, None, 10), (Stage.SOLVE, 2, 1, 4, 2), (Stage.SOLVE, None, 1, 4, 10),
])
def test_frames_of_a_batch(stage: Stage, batch: int | None, n: int, window: int | None, frames: int) -> None:
    assert frames_of(stage, batch, n, window, 10) == frames


def test_duration() -> None:
    assert [duration(s) for s in (4.4, 59, 61, 3599, 4800, 7200)] == \
        ["4 s", "59 s", "1 min", "1 h 0 min", "1 h 20 min", "2 h 0 min"]


def test_progress_eta_counts_the_stage_runs_still_to_come() -> None:
    from gridsearch.progress import Eta

    trials = _trials(2, 2)
    plan = make_plan(trials, {}, set())  # segment 2, link 2, solve 4
    eta = Eta()
    eta.planned(plan)
    first = plan.pending[0]
    eta.trial_started(first.first_stage)
    assert eta.text() == ""  # nothing measured yet: no ETA at all
    for stage, wall in ((Stage.SEGMENT, 60.0), (Stage.LINK, 30.0)):
        eta.stage_done(stage, wall)
    assert eta.seconds() is None  # solve never ran: still unknown
    eta.stage_done(Stage.SOLVE, 10.0)
    eta.trial_finished()
    assert eta.seconds() == 60 + 30 + 3 * 10 and eta.text() == "ETA 2 min"
    eta.trial_started(Stage.SEGMENT)  # fails in segment: its link and solve never run
    eta.stage_done(Stage.SEGMENT, 120.0)
    eta.trial_finished()
    assert eta.seconds() == 2 * 10


def test_branches_share_the_slots_when_there_are_fewer_slots_than_branches() -> None:
    """2 x 1 x 3 grid, 1 frame a batch: with 6 slots, 3 branches at once finish sooner than one
    at a time; with 1 slot they share it and gain nothing: each stage run takes 3 times as long."""
    plan = make_plan(_trials(2, 3), {}, set())
    wide, narrow = Workload(10, 1, 6, False), Workload(10, 1, 1, False)
    one, three = branch_estimate(plan, FLAT, wide, 1), branch_estimate(plan, FLAT, wide, 3)
    assert one is not None and three is not None and three.wall_s < one.wall_s
    alone, shared = branch_estimate(plan, FLAT, narrow, 1), branch_estimate(plan, FLAT, narrow, 3)
    assert alone is not None and shared is not None
    assert shared.wall_s >= 0.9 * alone.wall_s  # no cores to gain from: no speed-up promised
    assert shared.core_hours == alone.core_hours
