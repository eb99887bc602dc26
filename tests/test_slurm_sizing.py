"""Right-sized SLURM tasks on the real test cluster: once a stage's costs are measured, a task
runs several one-frame batches in turn (one ultrack start-up for all), each acknowledged on its
own; a task that dies half-way has only its unacknowledged batches re-run, one per task; the table
equals the serial SQLite sweep's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, serial_table, write_spec
from test_slurm import SLURM, _ledger, _live, _stop_server, cluster, short_movie  # noqa: F401

from gridsearch.core.waiting import wait_until
from gridsearch.engine import run_sweep
from gridsearch.spec import load
from gridsearch.worker import FAIL_ENV

pytestmark = [pytest.mark.slurm, cluster]

# one task at a time: filling the parallelism never splits a phase, so measured start-up (~5 s
# against ~1 s per frame) puts a whole phase in one task
ONE_AT_A_TIME = SLURM.replace("max_parallel: 2", "max_parallel: 1")
FIRST = "grid:\n  segmentation.min_area: [30]\n  tracking.appear_weight: [-0.5]\n"
BOTH = "grid:\n  segmentation.min_area: [30, 60]\n  tracking.appear_weight: [-0.5]\n"


def test_measured_stages_get_tasks_of_several_frames_and_a_half_done_task_reruns_the_rest(
    open_tmp: Path, short_movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    want = serial_table(open_tmp / "plain", short_movie, "slsref", BOTH)

    spec = write_spec(open_tmp, short_movie, name="slsz", grid=FIRST, extra=ONE_AT_A_TIME)
    try:
        assert run_sweep(load(spec)).completed == 1  # measures every stage, one frame per task
        _, first = _ledger(spec)
        assert set(first.per_task.fillna(1)) == {1}
        # the grid grows (a user adds a value); the new segment run's second phase (frames 1-3) is
        # one task, killed after frame 2 wrote its rows, before its acknowledgement
        spec.write_text(spec.read_text().replace(FIRST, BOTH))
        monkeypatch.setenv(FAIL_ENV, f"segment:2:{open_tmp / 'once'}:after")
        out = run_sweep(load(spec))
        assert (out.completed, out.failed) == (1, 0)
        assert wait_until(lambda: _live(spec) == [], 60, 0.5), _live(spec)
        df, rows = _ledger(spec)
    finally:
        _stop_server(spec)
    assert (open_tmp / "once").exists()  # the fault fired
    pd.testing.assert_frame_equal(comparable(df), comparable(want))
    new = rows[~rows.id.isin(first.id)]
    seg = new[new.stage == "segment"].sort_values("id")
    # phase 0 (frame 0) alone; phase 1: one task for frames 1-3; then frames 2 and 3 again, one each
    assert [(r.phase, r.indices, r.offset, r.per_task, r.attempt) for r in seg.itertuples()] == [
        (0, "0", 0, 1, 0), (1, "0", 1, 3, 0), (1, "2-3", 0, 1, 1)]
    link = new[new.stage == "link"]
    # one task for links 0-1, 1-2, 2-3 (submitted again behind segment's retry: superseded once)
    assert {(r.indices, r.offset, r.per_task) for r in link.itertuples()} == {("0", 0, 3)}
    solve = new[new.stage == "solve"]
    assert set(solve.per_task) == {1}  # a window is a task of its own
