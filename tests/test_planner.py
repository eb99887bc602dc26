"""Planner properties on random grids: minimal stage runs, right first stages, stable fingerprints."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from gridsearch.planner import dfs_order, make_plan
from gridsearch.spec import Trial
from gridsearch.stages import Stage, earliest_changed_stage, fingerprints

SECTIONS = ["segmentation", "linking", "tracking"]


def _trials(grid: dict[str, list[int]]) -> list[Trial]:
    keys = list(grid)
    out = []
    for n, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        params = dict(zip(keys, combo, strict=True))
        sections: dict[str, dict[str, int]] = {s: {} for s in SECTIONS}
        for k, v in params.items():
            s, _, name = k.partition(".")
            sections[s][name] = v
        out.append(Trial(n, params, sections, fingerprints(sections, "data")))
    return out


grids = st.dictionaries(
    st.sampled_from([f"{s}.{p}" for s in SECTIONS for p in ("a", "b")]),
    st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(grids, st.randoms())
def test_stage_runs_equal_distinct_prefixes(grid: dict[str, list[int]], rnd) -> None:  # type: ignore[no-untyped-def]
    keys = list(grid)
    rnd.shuffle(keys)  # whatever order the grid keys are written in
    trials = _trials({k: grid[k] for k in keys})
    plan = make_plan(trials, {}, set())
    runs = plan.stage_runs()
    for stage in Stage:
        assert runs[stage] == len({t.fingerprints[stage] for t in trials})
    # every first_stage is the earliest stage that differs from the trial run before it
    state: dict[Stage, str | None] = {}
    for p in plan.pending:
        assert p.first_stage == earliest_changed_stage(state, p.trial.fingerprints)
        assert p.first_stage is not None
        state = dict(p.trial.fingerprints)
    assert sorted(t.key for t in trials) == sorted(p.trial.key for p in plan.trials)


@settings(max_examples=60, deadline=None)
@given(grids, st.data())
def test_resume_skips_finished_and_starts_on_held_branch(grid: dict[str, list[int]], data) -> None:  # type: ignore[no-untyped-def]
    trials = _trials(grid)
    finished = set(data.draw(st.lists(st.sampled_from([t.key for t in trials]), unique=True)))
    held_trial = data.draw(st.sampled_from(trials))
    held = {Stage.SEGMENT: held_trial.fingerprints[Stage.SEGMENT],
            Stage.LINK: held_trial.fingerprints[Stage.LINK], Stage.SOLVE: None}
    plan = make_plan(trials, held, finished)
    assert {p.trial.key for p in plan.trials if p.done} == finished
    pending = plan.pending
    if pending:
        # The branch already in the database comes first when it has pending trials.
        same_seg = [p for p in pending if p.trial.fingerprints[Stage.SEGMENT] == held[Stage.SEGMENT]]
        if same_seg:
            assert pending[0].trial.fingerprints[Stage.SEGMENT] == held[Stage.SEGMENT]
            assert pending[0].first_stage != Stage.SEGMENT


def test_example_grid_is_18_runs_not_36() -> None:
    grid = {"segmentation.min_area": [30, 60], "linking.max_distance": [6, 15],
            "tracking.appear_weight": [1, 2, 3]}
    plan = make_plan(_trials(grid), {}, set())
    assert plan.stage_runs() == {Stage.SEGMENT: 2, Stage.LINK: 4, Stage.SOLVE: 12}
    assert plan.naive_runs == 36


def test_dfs_order_groups_whatever_the_key_order() -> None:
    grid = {"tracking.x": [1, 2, 3], "linking.y": [1, 2], "segmentation.z": [1, 2]}
    order = dfs_order(_trials(grid))
    segs = [t.fingerprints[Stage.SEGMENT] for t in order]
    # each segment fingerprint forms one contiguous block
    assert len([i for i in range(1, len(segs)) if segs[i] != segs[i - 1]]) == 1


def test_fingerprints_ignore_key_order_and_execution_keys() -> None:
    a = {"segmentation": {"min_area": 1, "max_area": 9, "n_workers": 1}, "linking": {"x": 1.0},
         "tracking": {"w": -1}}
    b = {"tracking": {"w": -1}, "linking": {"x": 1.0},
         "segmentation": {"n_workers": 8, "max_area": 9, "min_area": 1}}
    assert fingerprints(a, "d") == fingerprints(b, "d")
    c = json.loads(json.dumps(a))
    c["linking"]["x"] = 2.0
    fa, fc = fingerprints(a, "d"), fingerprints(c, "d")
    assert fa[Stage.SEGMENT] == fc[Stage.SEGMENT]
    assert fa[Stage.LINK] != fc[Stage.LINK] and fa[Stage.SOLVE] != fc[Stage.SOLVE]
    assert fingerprints(a, "other data")[Stage.SEGMENT] != fa[Stage.SEGMENT]


def test_fingerprints_stable_across_processes() -> None:
    sections = {"segmentation": {"min_area": 30, "b": [1, 2]}, "linking": {"max_distance": 6.0},
                "tracking": {"appear_weight": -0.5, "solver_name": "CBC"}}
    code = (
        "import json,sys; from gridsearch.stages import fingerprints;"
        "print(json.dumps({k.label: v for k, v in fingerprints(json.loads(sys.argv[1]), 'd').items()}))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code, json.dumps(sections)], capture_output=True,
                       text=True, check=True, env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
        for seed in (1, 2)
    }
    assert len(outs) == 1
    here = {k.label: v for k, v in fingerprints(sections, "d").items()}
    assert json.loads(outs.pop()) == here


# Computed by the code before grid expansion was optimised (issue 10): existing workdirs rely on them.
PINNED_KEYS = ["9748fdb5b586", "2a9df326cd36", "355ced2a8e7c", "f025e3449512", "303c0762b23c",
               "b713eef6fa4d", "bc1b82c888be", "17a63676c929", "ad7f0abb4338", "ced1ac092d6b",
               "eebe71f85dad", "5b2453c7cb11", "62b3f0d06279", "3361fd037e00", "cdd4202dbd0f",
               "9b1e36867834"]
PINNED_LAST = {
    Stage.SEGMENT: "8e586f38ec5105f862676a2403e3e466e02fb8fffde6dd6a25cb5646758a5b7b",
    Stage.LINK: "efa487deb7cf3f6e39ebb0a02f2c9eec96bed9e1433766a611e28a70e9be2e14",
    Stage.SOLVE: "9b1e36867834b50060fd8e30481751c58e99c2e66125acdfd17c27699bb33a8f",
}


def test_fingerprints_are_pinned() -> None:
    """Fingerprints name what each workdir's databases hold: a change re-runs every old sweep."""
    from pathlib import Path

    from gridsearch.spec import _expand

    grid = {"segmentation.min_area": [30, 60], "linking.max_distance": [6, 15.0],
            "tracking.appear_weight": [-0.1, -0.5], "tracking.window_size": [None, 4]}
    base = {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC", "overlap_size": 1}}
    trials = _expand(grid, base, "data-identity", Path("pin.yaml"), (10, 1))
    assert [t.key for t in trials] == PINNED_KEYS
    assert [t.number for t in trials] == list(range(16))
    assert trials[-1].fingerprints == PINNED_LAST
    assert trials[-1].params == {k: v[-1] for k, v in grid.items()}
    assert trials[-1].sections["tracking"]["window_size"] == 4
    sections = {"segmentation": {"min_area": 30}, "linking": {"max_distance": 6.0}, "tracking": {}}
    assert fingerprints(sections, "d")[Stage.SOLVE] == (
        "63120b8a66a8c0460aeda92471c1ab6b32c0ef63f4cb2ce2ec644a8e0625eded")
