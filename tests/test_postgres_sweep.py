"""The sweep on a real PostgreSQL server managed by gridsearch, with parallel worker processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import comparable, pg_available, write_spec

from gridsearch import results
from gridsearch.backends.postgres import managed_server
from gridsearch.engine import existing_ledger
from gridsearch.spec import load
from gridsearch.workspace import Workspace

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")]

PG = """
database: {kind: postgresql, managed: true}
executor: {kind: local, workers: 2}
"""


def _server(spec: Path):  # type: ignore[no-untyped-def]
    sw = load(spec)
    return managed_server(sw, Workspace(sw.workdir))


def _sweep(spec: Path, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cmdlines() -> list[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return out


def test_parallel_postgres_matches_sqlite_and_hides_the_password(
    open_tmp: Path, movie: dict[str, Path], sqlite_reference: tuple[Path, pd.DataFrame]
) -> None:
    _, ref = sqlite_reference
    spec = write_spec(open_tmp, movie, name="pg", extra=PG)
    password = "pw-" + secrets.token_hex(12)
    proc = _sweep(spec, {"ULTRACK_DB_PW": password})
    seen_workers = False
    while proc.poll() is None:
        lines = _cmdlines()
        assert not any(password.encode() in c for c in lines)
        seen_workers |= sum(b"gridsearch.worker" in c for c in lines) >= 2
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert seen_workers, "never saw two worker processes"
    # the password is nowhere in the workdir: configs, logs, ledger, server files
    for f in load(spec).workdir.rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes(), f
    assert password not in out + err
    # same results as SQLite, every figure
    with existing_ledger(load(spec)) as led:
        assert led is not None
        df = results.table(load(spec), led)
        runs = pd.DataFrame(led.stage_runs())
    pd.testing.assert_frame_equal(comparable(df), comparable(ref))
    # batches really ran in parallel phases: link has one batch per frame pair
    assert set(runs[runs.stage == "link"].batches_total) == {9}
    assert not _server(spec).is_running(), "the managed server outlived the sweep"


def test_server_stopped_after_failure_and_after_sigterm(open_tmp: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, movie, name="pgfail", extra=PG,
                      grid="grid:\n  tracking.appear_weight: [-0.1, -0.5]\n")
    proc = _sweep(spec, {"GRIDSEARCH_FAIL": "link:3"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert not _server(spec).is_running()
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
    assert set(df.state) == {"failed"}
    assert df.error.str.contains("injected failure in link batch 3").all()
    assert df.error.str.contains("worker-").all()  # names the log file

    # SIGTERM to the driver mid-stage: server stopped, and the next sweep completes
    proc = _sweep(spec)
    server = _server(spec)
    deadline = time.time() + 120
    while time.time() < deadline and not server.is_running():
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not server.is_running()
    proc = _sweep(spec)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not server.is_running()


def test_db_start_server_is_reused_and_left_up(open_tmp: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, movie, name="pgkeep", extra=PG,
                      grid="grid:\n  tracking.appear_weight: [-0.1]\n")
    cli = [sys.executable, "-m", "gridsearch.cli"]
    r = subprocess.run([*cli, "db", "start", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    try:
        server = _server(spec)
        pid = server.pid()
        r = subprocess.run([*cli, "sweep", "-q", str(spec)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert server.is_running() and server.pid() == pid
        st = subprocess.run([*cli, "db", "status", str(spec)], capture_output=True, text=True).stdout
        assert f":{server.port}" in st and "gs_pgkeep_main" in st and "MB" in st
        url = subprocess.run([*cli, "db", "url", str(spec)], capture_output=True, text=True).stdout
        assert url.startswith("postgresql://gridsearch@") and "gs_pgkeep_main" in url
    finally:
        subprocess.run([*cli, "db", "stop", str(spec)], capture_output=True, text=True)
    assert not _server(spec).is_running()


def test_unreachable_server_and_wrong_password_are_one_line(open_tmp: Path, movie: dict[str, Path]) -> None:
    from gridsearch.postgres import ManagedServer, free_port

    port = free_port()
    spec = write_spec(open_tmp, movie, name="ext", grid="grid:\n  tracking.appear_weight: [-0.1]\n",
                      extra=f"database: {{kind: postgresql, host: 127.0.0.1, port: {port}, user: gridsearch,"
                            " dbname: postgres}\nexecutor: {kind: local, workers: 2}\n")
    cli = [sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "refused" in r.stderr

    server = ManagedServer(open_tmp / "srv", port=port)
    server.start()
    try:
        server.credentials()  # sets the role's password to a random one we do not pass on
        r = subprocess.run(cli, capture_output=True, text=True,
                           env={**os.environ, "ULTRACK_DB_PW": "definitely-wrong"})
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"127.0.0.1:{port}" in r.stderr and "password authentication failed" in r.stderr
        assert "definitely-wrong" not in r.stderr
    finally:
        server.stop()


def test_parallel_solve_windows_even_then_odd_match_sqlite(
    open_tmp: Path, movie: dict[str, Path]
) -> None:
    """Windowed solve: even windows in parallel, then odd, reproduces ultrack's sequential order."""
    from gridsearch.engine import run_sweep

    grid = "grid:\n  tracking.window_size: [3, 4]\n  tracking.appear_weight: [-0.1]\n"
    lite = write_spec(open_tmp / "lite", movie, name="winlite", grid=grid)
    pg = write_spec(open_tmp / "pg", movie, name="winpg", grid=grid, extra=PG)
    assert run_sweep(load(lite)).completed == 2
    proc = _sweep(pg)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    tables = []
    for spec in (lite, pg):
        with existing_ledger(load(spec)) as led:
            tables.append(comparable(results.table(load(spec), led)))
            runs = pd.DataFrame(led.stage_runs())
    pd.testing.assert_frame_equal(tables[0], tables[1])
    # 9 frame pairs: window 3 -> 3 windows, window 4 -> 3 windows (even phase 2 + odd phase 1)
    assert sorted(runs[runs.stage == "solve"].batches_total) == [3, 3]


def test_views_during_a_sweep_do_not_disturb_it(open_tmp: Path, movie: dict[str, Path]) -> None:
    """status/results/db url while workers run: no password reset, no failed batch."""
    import datetime

    spec = write_spec(open_tmp, movie, name="pgview", extra=PG)  # 12 trials: time for several views
    proc = _sweep(spec)  # no ULTRACK_DB_PW: the driver sets a random password only it knows
    cli = [sys.executable, "-m", "gridsearch.cli"]
    ok: list[str] = []
    first_view = None
    while proc.poll() is None:
        if _server(spec).is_running():
            for cmd in (["status", "--json"], ["results"], ["db", "url"]):
                r = subprocess.run([*cli, *cmd, str(spec)], capture_output=True, text=True)
                if r.returncode != 0:  # only allowed once the sweep has finished and stopped it
                    assert not _server(spec).is_running(), (cmd, r.stderr)
                    break
                ok.append(cmd[0])
                first_view = first_view or datetime.datetime.now()
        time.sleep(0.5)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert {"status", "results"} <= set(ok), ok
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
    assert set(df.state) == {"done"}
    # workers kept writing after the views had connected: trials finished after the first one
    assert first_view is not None and (df.finished > first_view).sum() >= 2


def test_disk_full_is_one_line_and_leaves_nothing_half_done(movie: dict[str, Path], small_disk) -> None:  # type: ignore[no-untyped-def]
    """A real full disk: the workdir on a 30 MB tmpfs, too small for the managed server's initdb."""
    mnt = small_disk("30m")
    spec = write_spec(mnt, movie, name="full", extra=PG, grid="grid:\n  tracking.appear_weight: [-0.1]\n")
    r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (mnt / "runs" / "full" / "postgres" / "data").exists()  # initdb cleaned up
    assert not _server(spec).is_running()


def test_restart_on_postgres_keeps_the_old_ledger_database(open_tmp: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(open_tmp, movie, name="pgrs", extra=PG,
                      grid="grid:\n  tracking.appear_weight: [-0.1]\n")
    cli = [sys.executable, "-m", "gridsearch.cli"]
    assert subprocess.run([*cli, "sweep", "-q", str(spec)], capture_output=True).returncode == 0
    spec.write_text(spec.read_text().replace("max_area: 1000", "max_area: 900"))
    r = subprocess.run([*cli, "sweep", "-q", str(spec)], capture_output=True, text=True)
    assert r.returncode == 2 and "--restart" in r.stderr
    r = subprocess.run([*cli, "sweep", "-q", "--restart", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    server = _server(spec)
    server.start()
    try:
        names = [d["name"] for d in server.list_databases()]
    finally:
        server.stop()
    assert any(n.startswith("gs_pgrs_state_archived_") for n in names), names
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
        assert len(led.study.get_trials()) == 1
    assert set(df.state) == {"done"}
