"""Branches at once on SLURM (`parallel: K`), on the real single-node test cluster: the branches'
arrays are queued together, one squeue (and at most one sacct) per poll whatever the number of
arrays and branches, and the table equals the serial SQLite sweep's."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import comparable, serial_table, write_spec
from test_slurm import SLURM, _ledger, _live, _stop_server, _sweep, _wait_for_link, cluster, short_movie  # noqa: F401

from gridsearch.core.waiting import wait_until
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.slurm import gateway
from gridsearch.spec import load

pytestmark = [pytest.mark.slurm, cluster]

# two segment configs (the second starts on a new, empty database), two solves under each (a fork)
GRID = "grid:\n  segmentation.min_area: [30, 60]\n  tracking.appear_weight: [-0.1, -0.5]\n"
WIDE = SLURM.replace("max_parallel: 2", "max_parallel: 8").replace("parallel: 1\n", "parallel: 3\n")


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory, short_movie: dict[str, Path]) -> pd.DataFrame:  # noqa: F811
    return serial_table(tmp_path_factory.mktemp("plain"), short_movie, "slbref", GRID)


def test_branches_share_one_poll_and_match_the_serial_sweep(
    open_tmp: Path, short_movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    serial: pd.DataFrame
) -> None:
    want = serial

    # every scheduler call, and for each poll: the calls it made and the arrays it asked about
    calls: list[str] = []
    polls: list[dict[str, Any]] = []
    real_run, real_poll = gateway._run, gateway.Poller.poll

    def counting_run(argv: Sequence[str], *a: Any, **k: Any) -> Any:
        calls.append(argv[0])
        return real_run(argv, *a, **k)

    def counting_poll(self: gateway.Poller, arrays: dict[str, list[int]]) -> Any:
        before = len(calls)
        out = real_poll(self, arrays)
        polls.append({"arrays": len(arrays), "calls": calls[before:]})
        return out

    monkeypatch.setattr(gateway, "_run", counting_run)
    monkeypatch.setattr(gateway.Poller, "poll", counting_poll)
    spec = write_spec(open_tmp, short_movie, name="slbr", grid=GRID, extra=WIDE)
    try:
        out = run_sweep(load(spec))
        assert (out.completed, out.failed) == (4, 0)
        # a task acknowledges its batch as its last act; its process may take a moment to leave
        assert wait_until(lambda: _live(spec) == [], 60, 0.5), _live(spec)
        df, rows = _ledger(spec)
        with existing_ledger(load(spec)) as led:
            runs = pd.DataFrame(led.stage_runs())
    finally:
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(want))
    # two segment runs (one on a new database), two link runs, four solves: each result once
    done = runs[runs.state == "done"]
    assert done.groupby("stage").size().to_dict() == {"segment": 2, "link": 2, "solve": 4}
    assert runs.database.nunique() >= 2
    # several branches' arrays were polled together, and never with more than one squeue per poll
    busy = [p for p in polls if p["arrays"] >= 2]
    assert busy, f"no poll ever watched two arrays: {[p['arrays'] for p in polls]}"
    assert max(p["arrays"] for p in polls) >= 3
    for p in polls:  # nothing queued: nothing to ask
        want = 1 if p["arrays"] else 0
        assert p["calls"].count("squeue") == want and p["calls"].count("sacct") <= want, p
    # arrays of different trials were in the queue at the same time
    assert rows.trial_key.nunique() >= 3


def test_a_killed_parallel_driver_resumes_and_still_forks(
    open_tmp: Path, short_movie: dict[str, Path], serial: pd.DataFrame  # noqa: F811
) -> None:
    """SIGKILL while branches' arrays run: the next driver withdraws what its predecessor left
    before it copies any database (a template with a task still connected cannot be copied, and
    would end forking for the rest of the sweep), then finishes with forks and the serial table."""
    spec = write_spec(open_tmp, short_movie, name="slbrk", grid=GRID, extra=WIDE)
    proc = _sweep(spec)
    try:
        _wait_for_link(spec, proc, running=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _live(spec), "the arrays died with the driver"
        proc = subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", str(spec)],  # notices on
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "not forking" not in out + err, out + err
        assert wait_until(lambda: _live(spec) == [], 60, 0.5), _live(spec)
        df, _rows = _ledger(spec)
        with existing_ledger(load(spec)) as led:
            runs = pd.DataFrame(led.stage_runs())
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_server(spec)
    pd.testing.assert_frame_equal(comparable(df), comparable(serial))
    done = runs[runs.state == "done"]
    assert done.database.nunique() >= 3  # a second root and forks, after the resume too
    assert set(done.groupby("stage").fingerprint.nunique()) <= {2, 4}  # 2 segment, 2 link, 4 solve
