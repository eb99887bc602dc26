"""Branches at once on forked databases (`parallel: K`), against the real parts: the results table
equals the serial sweep's trial by trial, each stage result is computed once, forks are dropped
once their subtree is exported, and a driver killed while forks run resumes on what each holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.core.trace import TRACE_ENV
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.spec import load
from gridsearch.stages import Stage
from gridsearch.workspace import Workspace

MINIMAL = {"segment": 2, "link": 4, "solve": 12}


def _check(spec: Path, ref: pd.DataFrame) -> pd.DataFrame:
    """The table equals the serial one; the minimal stage runs, each once; only main is left."""
    sw = load(spec)
    with existing_ledger(sw) as led:
        assert led is not None
        df = results.table(sw, led)
        runs = pd.DataFrame(led.stage_runs())
        dbs = led.databases()
    pd.testing.assert_frame_equal(comparable(df), comparable(ref))
    done = runs[runs.state == "done"]
    assert done.groupby("stage").size().to_dict() == MINIMAL
    assert not done.duplicated(["stage", "fingerprint"]).any()
    assert set(dbs) <= {"main"}, f"forks left in the ledger: {dbs}"
    return runs


def test_two_branches_at_once_on_sqlite_match_the_serial_sweep(
    tmp_path: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    _, ref = sqlite_reference
    spec = write_spec(tmp_path, movie, name="fork2", extra="parallel: 3\n")
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (12, 0)
    assert out.stage_runs == {Stage.SEGMENT: 2, Stage.LINK: 4, Stage.SOLVE: 12}
    runs = _check(spec, ref)
    # the branches did run on several databases, and those are gone from the disk
    assert runs.database.nunique() >= 2, runs.database.value_counts()
    left = sorted(p.name for p in Workspace(load(spec).workdir).root.joinpath("db").iterdir())
    assert left == ["main"], left


@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_branches_on_forked_postgres_databases_match_the_serial_sweep(
    open_tmp: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    _, ref = sqlite_reference
    extra = "database: {kind: postgresql, managed: true}\nexecutor: {kind: local, workers: 2}\nparallel: 2\n"
    spec = write_spec(open_tmp, movie, name="pgfork", extra=extra)
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (12, 0)
    runs = _check(spec, ref)
    assert runs.database.nunique() >= 2, runs.database.value_counts()


def test_a_driver_killed_while_branches_run_resumes_on_each_fork(
    tmp_path: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    _, ref = sqlite_reference
    spec = write_spec(tmp_path, movie, name="forkkill", extra="parallel: 3\n")
    trace = tmp_path / "trace"
    proc = subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                            env={**os.environ, TRACE_ENV: str(trace)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    # killed once a few trials are recorded and a fork holds work: mid-sweep, branches in flight
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = trace.read_text().splitlines() if trace.exists() else []
        if sum(" finished " in f" {line} " for line in lines) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the sweep ended before its kill: {proc.communicate()[1]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sw = load(spec)
    with existing_ledger(sw) as led:
        assert led is not None
        before = pd.DataFrame(led.stage_runs())
        held = {name: led.held(name) for name in led.databases()}
    assert len(held) >= 2, f"no fork held anything when the driver was killed: {held}"
    r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    runs = pd.DataFrame()
    with existing_ledger(sw) as led:
        assert led is not None
        df = results.table(sw, led)
        runs = pd.DataFrame(led.stage_runs())
    pd.testing.assert_frame_equal(comparable(df), comparable(ref))
    # what a fork held done when the driver died was continued on, never recomputed
    done_before = before[before.state == "done"]
    for _, row in done_before.iterrows():
        if held.get(row.database, {}).get(Stage.parse(row.stage)) == row.fingerprint:
            again = runs[(runs.id > before.id.max()) & (runs.stage == row.stage)
                         & (runs.fingerprint == row.fingerprint) & (runs.state == "done")]
            assert again.empty, f"{row.stage} {row.fingerprint[:8]} held on {row.database}, computed again"


def test_without_room_for_a_fork_the_branches_run_one_after_another(
    tmp_path: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free space too small for a copy: one notice, no fork, the same table (new databases for
    segment configs need no copy and still start)."""
    from gridsearch.backends.base import Backend

    monkeypatch.setattr(Backend, "fork_room",
                        lambda self, src, wanted: (0, "workdir: 1 MB free, 40 MB needed"))
    _, ref = sqlite_reference
    spec = write_spec(tmp_path, movie, name="noroom", extra="parallel: 3\n")
    notes: list[str] = []

    class Notes:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return notes.append if name == "message" else (lambda *a, **k: None)

    out = run_sweep(load(spec), reporter=Notes())  # type: ignore[arg-type]
    assert (out.completed, out.failed) == (12, 0)
    assert [n for n in notes if "not forking" in n and "1 MB free" in n], notes
    runs = _check(spec, ref)
    # main and one new database for the second segment config: nothing was copied
    assert runs.database.nunique() == 2, runs.database.value_counts()


@pytest.mark.parametrize(("extra", "want"), [
    ("", 1),  # local: the branches would share the cores one branch's batches already use
    ("database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm}\n", 4),
    ("database: {kind: postgresql, host: h, user: u}\nexecutor: {kind: slurm}\n", 1),  # no forks there
    ("database: {kind: postgresql, managed: true}\nexecutor: {kind: slurm}\nparallel: 2\n", 2),
    ("parallel: 3\n", 3),
])
def test_parallel_default_is_chosen_from_the_executor(tmp_path: Path, movie: dict[str, Path],
                                                      extra: str, want: int) -> None:
    assert load(write_spec(tmp_path, movie, name="dflt", extra=extra)).parallel == want
