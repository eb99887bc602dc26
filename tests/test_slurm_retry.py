"""Resubmitted SLURM tasks whose first run wrote its rows before it failed: the re-run clears them
(gridsearch.rerun) and the sweep ends with the plain SQLite run's results. On the real single-node
cluster, with the fixtures and helpers of test_slurm.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, write_spec
from test_slurm import SLURM, _ledger, _live, _stop_server, _sweep, cluster, short_movie  # noqa: F401

from gridsearch import results
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.spec import load

pytestmark = [pytest.mark.slurm, cluster]

# 4 frames: solve windows 0 | 1, the odd one anchored to the even one's committed picks
WINDOWS = ("config:\n  segmentation: {max_area: 1000}\n"
           "  tracking: {solver_name: CBC, window_size: 2, overlap_size: 1}\n")
ONE = "grid:\n  tracking.appear_weight: [-0.5]\n"


def test_tasks_failing_after_their_rows_were_written_are_rerun_cleanly(
    open_tmp: Path, short_movie: dict[str, Path]  # noqa: F811
) -> None:
    plain = write_spec(open_tmp / "plain", short_movie, name="slretryref", base=WINDOWS, grid=ONE)
    run_sweep(load(plain))
    with existing_ledger(load(plain)) as led:
        want = results.table(load(plain), led)
    assert list(want.state) == ["done"]

    spec = write_spec(open_tmp, short_movie, name="slretry", base=WINDOWS, grid=ONE, extra=SLURM)
    seg_once, solve_once = open_tmp / "seg.once", open_tmp / "solve.once"
    faults = f"segment:2:{seg_once}:after,solve:0:{solve_once}:after"
    proc = _sweep(spec, {"GRIDSEARCH_FAIL": faults})
    _out, err = proc.communicate(timeout=300)
    try:
        assert proc.returncode == 0, err
        assert seg_once.exists() and solve_once.exists()
        got, rows = _ledger(spec)
        assert _live(spec) == []
    finally:
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(got), comparable(want))
    assert list(rows[rows.stage == "segment"].indices) == ["0", "1-3", "2"]
    solve = rows[rows.stage == "solve"]
    assert list(solve[solve.attempt == 1].indices) == ["0"]  # the even window, resubmitted alone
    logs = {p.name: p.read_text(errors="replace")
            for p in (load(spec).workdir / "logs" / "slurm").glob("*.log")}
    failed = [name for name, text in logs.items() if "after it ran" in text]
    assert sorted(name.split("-")[0] for name in failed) == ["segment", "solve"], failed
    spoilt = [name for name, text in logs.items()
              if "SEGMENTS MIGHT BE MISSING" in text or "Duplicated nodes" in text]
    assert not spoilt, spoilt
