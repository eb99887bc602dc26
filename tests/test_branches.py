"""The branch scheduler on random grids (no I/O): every stage result computed once, on a database
holding its parent; K=1 is the serial walk; more databases shorten the makespan toward the
critical path; failures and resumes keep the serial sweep's semantics."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner import _trials, grids

from gridsearch.branches import (
    MAIN,
    Forest,
    after_run,
    build_tree,
    simulate,
    walk,
)
from gridsearch.planner import dfs_order, make_plan
from gridsearch.stages import Stage

COST = {Stage.SEGMENT: 40.0, Stage.LINK: 40.0, Stage.SOLVE: 8.0}


def _grid(seg: int, link: int, solve: int) -> list:  # type: ignore[type-arg]
    return dfs_order(_trials({"segmentation.a": list(range(seg)), "linking.a": list(range(link)),
                              "tracking.a": list(range(solve))}))


@settings(max_examples=60, deadline=None)
@given(grids, st.integers(1, 6))
def test_each_result_once_on_a_database_holding_its_parent(grid: dict[str, list[int]], k: int) -> None:
    order = dfs_order(_trials(grid))
    sim = simulate(order, k, COST)
    nodes = list(walk(build_tree(order)))
    # every node of the tree ran exactly once: the minimal number of stage runs, as the serial plan
    assert len(sim.runs) == len(nodes) == sum(make_plan(order, {}, set()).stage_runs().values())
    assert len({(r.node.stage, r.node.fingerprint) for r in sim.runs}) == len(sim.runs)
    for r in sim.runs:
        owner = r.node.owner
        # the database holds the parent prefix: what the run needs is there
        assert all(r.held_before[s] == owner.fingerprints[s] for s in Stage if s < r.node.stage)
    # never more databases alive than allowed
    assert sim.databases <= k
    # at any instant, at most k runs at once
    edges = sorted([(r.start, 1) for r in sim.runs] + [(r.end, -1) for r in sim.runs])
    assert max(itertools.accumulate(d for _, d in edges)) <= k


@settings(max_examples=40, deadline=None)
@given(grids)
def test_one_database_is_the_serial_walk(grid: dict[str, list[int]]) -> None:
    order = dfs_order(_trials(grid))
    sim = simulate(order, 1, COST)
    assert {r.db for r in sim.runs} == {MAIN} and sim.forks == 0
    assert [r.node.owner.key for r in sim.runs if r.node.stage == Stage.SOLVE] == [t.key for t in order]
    assert sim.makespan == pytest.approx(sum(COST[r.node.stage] for r in sim.runs))


def test_the_2x2x3_grid_approaches_its_critical_path() -> None:
    order = _grid(2, 2, 3)
    serial = simulate(order, 1, COST).makespan
    critical = COST[Stage.SEGMENT] + COST[Stage.LINK] + COST[Stage.SOLVE]
    assert serial == 2 * 40 + 4 * 40 + 12 * 8
    wide = simulate(order, 12, COST)
    assert wide.makespan == critical  # every branch at once
    assert simulate(order, 2, COST).makespan < serial * 0.6
    assert simulate(order, 4, COST).makespan < simulate(order, 2, COST).makespan


def test_the_heaviest_branch_starts_first() -> None:
    # segment 0 has 3 link children, segment 1 only one: with two databases, main takes segment 0
    order = dfs_order(_trials({"segmentation.a": [0, 1], "linking.a": [0, 1, 2], "tracking.a": [0]}))
    order = [t for t in order if t.params["segmentation.a"] == 0 or t.params["linking.a"] == 0]
    order = order[-1:] + order[:-1]  # the light branch first in walk order
    sim = simulate(order, 2, COST)
    first = [r for r in sim.runs if r.start == 0]
    assert {len(r.node.trials) for r in first} == {3, 1}
    assert next(r for r in first if len(r.node.trials) == 3).db == MAIN


def test_a_failed_node_runs_again_for_the_next_trial_of_its_subtree() -> None:
    order = _grid(1, 2, 2)
    forest = Forest.start(build_tree(order), {}, 1, lambda: "f1")
    (m,) = forest.moves()
    assert m.node is not None and m.node.stage == Stage.SEGMENT
    given_up = forest.failed(MAIN, m.node, {s: None for s in Stage})
    assert given_up == [order[0]]
    (again,) = forest.moves()
    assert again.node is m.node and again.node.owner == order[1] and len(again.node.trials) == 3


def test_a_resume_continues_on_what_each_fork_holds() -> None:
    order = _grid(2, 2, 1)
    tree = build_tree(order)
    seg0, seg1 = tree
    link01 = seg0.children[1]
    # main holds segment 0 + its link 0 + that solve (trial finished: not pending); f1 holds seg 1
    held = {
        MAIN: after_run(after_run(after_run({}, seg0), seg0.children[0]), seg0.children[0].children[0]),
        "f1": after_run({}, seg1),
    }
    pending = [t for t in order if t.key != seg0.children[0].children[0].owner.key]
    forest = Forest.start(build_tree(pending), held, 2, lambda: "f2")
    moves = forest.moves()
    ran = {(m.db, m.node.stage, m.node.fingerprint) for m in moves if m.node is not None}
    # link 1 of segment 0 continues on main; segment 1's links continue on f1: no segment rerun
    assert (MAIN, Stage.LINK, link01.fingerprint) in ran
    assert all(stage != Stage.SEGMENT for _, stage, _ in ran)
    assert any(db == "f1" for db, _, _ in ran)


def test_a_solved_but_unexported_leaf_is_queued_for_its_export() -> None:
    order = _grid(1, 1, 2)
    tree = build_tree(order)
    seg, = tree
    leaf = seg.children[0].children[0]
    held = {MAIN: after_run(after_run(after_run({}, seg), seg.children[0]), leaf)}
    forest = Forest.start(build_tree(order), held, 1, lambda: "f1")
    (m,) = forest.moves()
    assert m.node is not None and m.node.fingerprint == leaf.fingerprint  # its export, first
