"""The cost model on a real sweep: workers measure their batches, and `plan` and `status` show the
estimated remaining time once every stage the rest of the sweep needs is measured."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from helpers import write_spec

from gridsearch.cli import main
from gridsearch.engine import existing_ledger
from gridsearch.spec import load

GRID = """\
grid:
  segmentation.min_area: [30, 45, 60]
  linking.max_distance: [15.0]
  tracking.appear_weight: [{weights}]
"""


def test_measured_sweep_estimates_the_grid_points_added_later(tmp_path: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(tmp_path, movie, name="costs", grid=GRID.format(weights="-0.1"))
    r = CliRunner().invoke(main, ["plan", str(spec)])
    assert r.exit_code == 0, r.output
    assert "estimated remaining" not in r.output  # nothing measured: nothing shown
    r = CliRunner().invoke(main, ["sweep", "-q", str(spec)])
    assert r.exit_code == 0, r.output
    sweep = load(spec)
    with existing_ledger(sweep) as led:
        assert led is not None
        rows = led.measured_batches()
    n_frames = sweep.shape[0]
    by_stage = {s: [x for x in rows if x["stage"] == s] for s in ("segment", "link", "solve")}
    # SQLite: the driver runs each stage as one batch, of every frame
    assert [len(v) for v in by_stage.values()] == [3, 3, 3]
    assert [x["frames"] for x in rows] == [n_frames, n_frames - 1, n_frames] * 3
    for x in rows:
        assert x["wall_s"] > 0 and x["cpu_s"] > 0 and x["max_rss_mb"] > 0
        assert x["startup_s"] is not None and x["startup_s"] >= 0  # the driver's `import ultrack`
    assert sum(bool(x["paid_startup"]) for x in rows) <= 1  # once per process (maybe earlier)

    # nothing left to run: an estimate of nothing is no news
    r = CliRunner().invoke(main, ["status", str(spec)])
    assert r.exit_code == 0 and "nothing left to run" in r.output, r.output
    assert "estimated remaining" not in r.output
    doc = json.loads(CliRunner().invoke(main, ["status", "--json", str(spec)]).output)
    assert doc["estimate"] is None and doc["trials_left_to_run"] == 0

    spec = write_spec(tmp_path, movie, name="costs", grid=GRID.format(weights="-0.1, -0.5"))
    for cmd in ("plan", "status"):
        r = CliRunner().invoke(main, [cmd, str(spec)])
        assert r.exit_code == 0, r.output
        assert "estimated remaining:" in r.output, r.output
        assert f"from {len(rows)} measured batches" in r.output
    doc = json.loads(CliRunner().invoke(main, ["status", "--json", str(spec)]).output)
    assert doc["trials_left_to_run"] == 3
    doc = doc["estimate"]
    # three more trials: two from segment, the one on the segmentation the database holds from solve
    one_trial = sum(sorted(x["wall_s"] for x in v)[1] for v in by_stage.values())
    assert 0.5 * 3 * one_trial < doc["wall_s"] < 2 * 3 * one_trial
    assert doc["core_hours"] > 0 and doc["measured_batches"] == 9


def test_plan_draws_the_branches_and_which_runs_go_together(tmp_path: Path, movie: dict[str, Path]) -> None:
    """parallel 3 on the example's 2 x 2 x 3 grid: every stage run once, under its parent, and
    runs of one step on different databases (what goes at once)."""
    grid = ("grid:\n  segmentation.min_area: [30, 60]\n  linking.max_distance: [6.0, 15.0]\n"
            "  tracking.appear_weight: [-0.1, -0.5, -1.0]\n")
    spec = write_spec(tmp_path, movie, name="tree", grid=grid, extra="parallel: 3\n")
    r = CliRunner().invoke(main, ["plan", "--json", str(spec)])
    assert r.exit_code == 0, r.output
    tree = json.loads(r.output)["branches"]["tree"]
    assert [n["stage"] for n in tree] == (["segment"] + (["link"] + ["solve"] * 3) * 2) * 2
    assert [n["depth"] for n in tree] == ([0] + ([1] + [2] * 3) * 2) * 2
    assert tree[1]["params"] == {"linking.max_distance": 6.0}
    steps: dict[int, set[str]] = {}
    for n in tree:
        assert n["database"] not in steps.setdefault(n["step"], set())  # one run per database at once
        steps[n["step"]].add(n["database"])
    assert max(len(dbs) for dbs in steps.values()) == 3
    r = CliRunner().invoke(main, ["plan", str(spec)])
    assert r.exit_code == 0, r.output
    assert "  └ link max_distance=6.0  (main, step 2)" in r.output
    assert len([ln for ln in r.output.splitlines() if "└ solve" in ln]) == 12
