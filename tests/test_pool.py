"""The local worker pool (PostgreSQL, `workers: N`) under faults: a worker killed mid-sweep fails
one trial, never leaves others writing, and the pool recovers; a driver killed with -9 takes its
workers with it (they must not write while the next driver clears the database)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from helpers import blank_last_frames, comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.backends.postgres import managed_server
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.spec import load
from gridsearch.workspace import Workspace

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")]

POOL = """
database: {kind: postgresql, managed: true}
executor: {kind: local, workers: 2}
"""


def _workers(driver: psutil.Process) -> list[psutil.Process]:
    """The driver's pool workers; its other children come and go (pg_ctl, a zombie not yet reaped,
    whose command line psutil refuses to read)."""
    found = []
    for p in driver.children():
        with contextlib.suppress(psutil.Error):
            if "gridsearch.worker" in " ".join(p.cmdline()):
                found.append(p)
    return found


def _start(spec: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:  # type: ignore[type-arg]
    proc = subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while time.time() < deadline and len(_workers(driver)) < 2:
        time.sleep(0.2)
    workers = _workers(driver)
    assert len(workers) == 2, "the pool never started"
    time.sleep(4)  # past the ultrack import: the workers are running batches now
    return proc, workers


def test_driver_killed_with_9_takes_its_workers(open_tmp: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, movie, name="poolkill", extra=POOL)
    proc, workers = _start(spec)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"pool workers outlived their driver: {[p.pid for p in alive]}"
        # and the next driver finishes the sweep
        r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    finally:
        sw = load(spec)
        managed_server(sw, Workspace(sw.workdir)).stop()  # the -9'd driver could not stop it


def test_a_killed_worker_fails_one_trial_and_the_pool_recovers(open_tmp: Path,
                                                               movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, movie, name="poolworker", extra=POOL)
    proc, workers = _start(spec)
    victim, survivor = workers
    victim.kill()
    # the survivor is stopped before the engine moves on (it could be writing): gone within its
    # 10 s grace, while the sweep goes on with a fresh pool
    _, alive = psutil.wait_procs([survivor], timeout=30)
    assert not alive, "the surviving worker kept running after its pool failed"
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err  # one trial failed
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
    failed = df[df.state == "failed"]
    assert len(failed) == 1 and failed.error.str.contains("exited with code -9").all(), failed.error
    assert (df.state == "done").sum() == len(df) - 1


WINDOWS = ("config:\n  segmentation: {max_area: 1000}\n"
           "  tracking: {solver_name: CBC, window_size: 2, overlap_size: 1}\n")


def test_last_frames_without_cells_and_several_solve_windows_match_in_process(open_tmp: Path) -> None:
    """6 frames, the last 2 without cells: the plan, from the movie, has solve windows 0 2 | 1 and link
    batches 0-4; ultrack, from its database (last frame with nodes: 3), has windows 0 | 1 and link
    batches 0-2. The batches past ultrack's count have nothing to do (window 2 used to fail)."""
    from gridsearch.synth import generate_movie

    movie = blank_last_frames(generate_movie(open_tmp / "six", n_frames=6), open_tmp / "blank", 2)
    one = "grid:\n  tracking.appear_weight: [-0.5]\n"
    ref = write_spec(open_tmp / "ref", movie, name="inproc", base=WINDOWS, grid=one)
    spec = write_spec(open_tmp / "pool", movie, name="poolblank", base=WINDOWS, grid=one, extra=POOL)
    dfs = []
    for s in (ref, spec):
        run_sweep(load(s))
        with existing_ledger(load(s)) as led:
            dfs.append(results.table(load(s), led))
        assert list(dfs[-1].state) == ["done"], dfs[-1].error.iloc[0]
    pd.testing.assert_frame_equal(comparable(dfs[1]), comparable(dfs[0]))
    tracks = pd.read_csv(dfs[1].tracks_csv.iloc[0])
    assert tracks.t.max() == 3 and tracks.t.nunique() == 4


def test_a_worker_whose_driver_died_while_it_started_exits_at_once() -> None:
    """The parent-death signal only covers a driver that dies after the worker set it: one killed
    while its workers were still starting used to leave them importing ultrack, reparented, for
    seconds (found by tests/test_kill_anywhere.py). A worker knows its driver's pid and exits at
    once, before any work, when its parent is not that driver any more."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    r = subprocess.run([sys.executable, "-m", "gridsearch.worker", "--serve", "--parent", str(dead.pid)],
                       stdin=subprocess.PIPE, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stderr  # never said ready: took no task
