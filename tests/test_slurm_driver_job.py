"""`gridsearch sweep --submit` on the real test cluster: the driver runs as a SLURM job, is warned
before its time limit, queues its successor and stops; the successor finishes the sweep. `status`
and `cancel` work from the submitting node meanwhile."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, write_spec
from test_slurm import GRID, ROOT, _ledger, _live, _stop_server, _tasks, cluster, reference, short_movie  # noqa: F401

from gridsearch.slurm.driver_job import driver_name
from gridsearch.spec import load

pytestmark = pytest.mark.slurm
# 3 minutes: SLURM warns the driver 120 s before its limit, i.e. 60-90 s after it starts (it checks
# limits every 30 s), so the 2-trial sweep (about 2 minutes of driving) needs a successor.
SHORT_DRIVER = """
database: {kind: postgresql, managed: true}
executor:
  kind: slurm
  max_parallel: 2
  poll_seconds: 1
  stages: {driver: {cpus: 1, mem: 4G, time: "3"}}
parallel: 1
"""


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gridsearch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "80", **(env or {})}, timeout=300)


def _drivers(spec: Path) -> list[tuple[str, str]]:
    """(job id, state) of the sweep's driver jobs SLURM still knows (MinJobAge keeps ended ones)."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-n", driver_name(load(spec)), "-o", "%i|%T"],
                       capture_output=True, text=True)
    return [tuple(line.split("|")) for line in r.stdout.split()]  # type: ignore[misc]


def _logs(spec: Path) -> dict[str, str]:
    logs = (load(spec).workdir / "logs" / "slurm").glob("driver-*.log")
    return {p.stem.partition("-")[2]: p.read_text() for p in sorted(logs, key=lambda p: int(p.stem[7:]))}


def _wait(what: str, probe, timeout: float, why=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not probe():
        assert time.time() < deadline, f"timed out waiting for {what}; {why()}"
        time.sleep(2)


@cluster
def test_a_driver_job_hits_its_time_limit_and_its_successor_finishes(
    open_tmp: Path, short_movie: dict[str, Path], reference: pd.DataFrame  # noqa: F811
) -> None:
    spec = write_spec(open_tmp, short_movie, name="sldrv", grid=GRID, extra=SHORT_DRIVER)
    try:
        r = _cli("sweep", "--submit", str(spec), env={"ULTRACK_DB_PW": ""})
        assert r.returncode == 0, r.stderr
        first = re.search(r"as SLURM job (\d+)", r.stdout).group(1)  # type: ignore[union-attr]
        assert "time limit 3" in r.stdout and "log: " in r.stdout
        again = _cli("sweep", "--submit", str(spec))  # one driver per sweep
        assert again.returncode == 1 and f"already queued as SLURM job {first}" in again.stderr
        _wait("the driver job to run", lambda: (first, "RUNNING") in _drivers(spec), 240)
        seen: list[str] = []  # `status` from this (submitting) node while the driver job works

        def driving() -> bool:  # not "driver running": "no driver running" contains it
            seen.append(_cli("status", str(spec)).stdout)
            return (": driver running, " in seen[-1].splitlines()[0]
                    and re.search(r"^  driver \d+: running$", seen[-1], re.M) is not None
                    and re.search(r"^  server \d+: running$", seen[-1], re.M) is not None)

        # a slow start may be warned before it takes the workdir: then its successor shows it
        _wait("the driver to take the workdir", driving, 240,
              lambda: f"status said:\n{seen[-1]}\ndriver jobs: {_drivers(spec)}\nlogs: {_logs(spec)}")
        _wait("the sweep's end", lambda: not any(s in ("RUNNING", "PENDING") for _, s in _drivers(spec)), 900)
        logs = _logs(spec)
        df, rows = _ledger(spec)
        assert _live(spec) == [], "the last driver leaves nothing queued"
    finally:
        subprocess.run(["scancel", "-n", driver_name(load(spec))])
        _stop_server(spec)
    ids = list(logs)
    for job, text in logs.items():  # pytest -s: what each driver job said
        print(f"--- driver job {job}\n" + "\n".join(text.splitlines()[-6:]))
    assert ids[0] == first and len(ids) >= 2, f"no successor ran: {list(logs)}"
    for job, successor in itertools.pairwise(ids):
        assert f"the sweep carries on in SLURM job {successor}" in logs[job], logs[job][-2000:]
    assert "2 completed" in logs[ids[-1]] or "already done" in logs[ids[-1]], logs[ids[-1]][-2000:]
    assert "Traceback" not in "".join(logs.values())
    # what every job did adds up to one uninterrupted sweep: no task twice, the same table
    tasks = _tasks(rows)
    assert len(tasks) == len(set(tasks)), f"a task was submitted twice: {sorted(tasks)}"
    pd.testing.assert_frame_equal(comparable(df), comparable(reference))


@cluster
def test_cancel_stops_a_driver_job_for_good(
    open_tmp: Path, short_movie: dict[str, Path]  # noqa: F811
) -> None:
    spec = write_spec(open_tmp, short_movie, name="sldcan", grid=GRID,
                      extra=SHORT_DRIVER.replace('time: "3"', 'time: "10"'))
    try:
        r = _cli("sweep", "--submit", str(spec))
        assert r.returncode == 0, r.stderr
        _wait("the sweep's arrays", lambda: any("segment" in j or "link" in j for j in _live(spec)), 400)
        c = _cli("cancel", str(spec))
        assert c.returncode == 0, c.stderr
        _wait("every job to go", lambda: not _live(spec) and not any(
            s in ("RUNNING", "PENDING", "COMPLETING") for _, s in _drivers(spec)), 120)
        time.sleep(5)  # a successor queued by mistake would show by now
        drivers = _drivers(spec)
        logs = _logs(spec)
    finally:
        subprocess.run(["scancel", "-n", driver_name(load(spec))])
        _stop_server(spec)
    assert len(drivers) == 1 and len(logs) == 1, f"a driver job followed a cancel: {drivers}"
    assert "carries on" not in "".join(logs.values())
