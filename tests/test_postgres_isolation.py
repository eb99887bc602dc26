"""Sweeps sharing one database of an existing server (issue 9, point 6): a schema per sweep holds its
ledger, optuna's study and ultrack's tables; an advisory lock keeps a second driver off one sweep's
database. The `lab` fixture's server plays the existing server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from helpers import comparable, lab_database, lab_rows, pg_available, write_spec

from gridsearch import results
from gridsearch.backends.postgres import db_name, keep_up, managed_server
from gridsearch.engine import existing_ledger
from gridsearch.postgres import advisory
from gridsearch.spec import load
from gridsearch.workspace import Workspace

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")]

CLI = [sys.executable, "-m", "gridsearch.cli"]
GRID_A = "grid:\n  tracking.appear_weight: [-0.1]\n"
GRID_LONGER = "grid:\n  tracking.appear_weight: [-0.1, -0.5]\n"  # time to start a second driver
GRID_B = "grid:\n  segmentation.min_area: [60]\n  tracking.appear_weight: [-0.1]\n"


def _spec(root: Path, movie: dict[str, Path], port: int, where: str, grid: str) -> Path:
    """The same sweep name and base config in every workdir: only the workdir differs."""
    return write_spec(root / where, movie, name="iso", grid=grid, extra=lab_database(port))


def _ws(spec: Path) -> Workspace:
    return Workspace(load(spec).workdir)


def _schema(spec: Path) -> str:
    return _ws(spec).pg_schema.read_text().strip()


def _start(spec: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "sweep", "-q", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def _sweep(spec: Path) -> None:
    proc = _start(spec)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _state(spec: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The results table (times and paths left out) and the stage runs."""
    with existing_ledger(load(spec)) as led:
        assert led is not None
        return comparable(results.table(load(spec), led)), led.stage_runs()


def _nodes(creds: Any, schema: str) -> list[Any]:
    return lab_rows(creds, f"SELECT (count(*), sum(area), sum(selected::int)) FROM {schema}.nodes")


def _running_in(creds: Any, spec: Path) -> bool:
    ws = _ws(spec)
    if not ws.pg_schema.exists():
        return False
    schema = _schema(spec)
    try:
        return bool(lab_rows(creds, f"SELECT 1 FROM {schema}.gs_stage_run WHERE state = 'running'"))
    except Exception:  # tables not created yet
        return False


def test_two_sweeps_in_one_database_keep_to_their_own_tables(
    open_tmp: Path, movie: dict[str, Path], lab: Any
) -> None:
    server, creds = lab
    a = _spec(open_tmp, movie, server.port, "a", GRID_A)
    b = _spec(open_tmp, movie, server.port, "b", GRID_B)

    # one after the other
    _sweep(a)
    solo_a, runs_a = _state(a)
    nodes_a = _nodes(creds, _schema(a))
    _sweep(b)
    solo_b, _ = _state(b)
    assert _schema(a) != _schema(b) and all(s.startswith("gs_iso_") for s in (_schema(a), _schema(b)))
    assert _nodes(creds, _schema(a)) == nodes_a, "sweep b cleared sweep a's tables"
    assert lab_rows(creds, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    _sweep(a)  # resume: nothing to do, nothing recomputed
    again, runs = _state(a)
    pd.testing.assert_frame_equal(again, solo_a)
    assert len(runs) == len(runs_a)

    # interleaved, in two fresh workdirs; meanwhile sweep a's driver resumes (and recovers)
    a2 = _spec(open_tmp, movie, server.port, "a2", GRID_A)
    b2 = _spec(open_tmp, movie, server.port, "b2", GRID_B)
    procs = [_start(a2), _start(b2)]
    deadline = time.time() + 300
    while not _running_in(creds, b2):
        assert time.time() < deadline and procs[1].poll() is None, procs[1].communicate()
        time.sleep(0.2)
    _sweep(a)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    for spec, solo in ((a2, solo_a), (b2, solo_b)):
        table, runs = _state(spec)
        pd.testing.assert_frame_equal(table, solo)
        assert {r["state"] for r in runs} == {"done"}, runs  # nobody's recover() touched them
    assert len({_schema(s) for s in (a, b, a2, b2)}) == 4


def _other_node(argv: list[str]) -> list[str]:
    """argv with another hostname (same network: the server is on this host's loopback)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make namespaces here")
    return ["unshare", "--uts", "sh", "-c", 'hostname other-node && exec "$0" "$@"', *argv]


def test_a_second_driver_on_one_sweep_database_is_refused_naming_the_holder(
    open_tmp: Path, movie: dict[str, Path], lab: Any
) -> None:
    """A copied workdir (or one reached by another node's path) names the same schema: its driver,
    on another node, is refused by the advisory lock, in one line naming the running driver."""
    server, creds = lab
    a = _spec(open_tmp, movie, server.port, "a", GRID_LONGER)
    copy = _spec(open_tmp, movie, server.port, "copy", GRID_LONGER)
    first = _start(a)
    try:
        deadline = time.time() + 300
        while not lab_rows(creds, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
                           (f"gridsearch driver pid {first.pid} on {socket.gethostname()}",)):
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        _ws(copy).root.mkdir(parents=True)
        shutil.copy(_ws(a).pg_schema, _ws(copy).pg_schema)
        r = subprocess.run(_other_node([*CLI, "sweep", "-q", str(copy)]), capture_output=True, text=True,
                           timeout=300, env={**os.environ})
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, r.stderr
        assert f"schema {_schema(a)}" in line and "another sweep's driver holds it" in line, line
        assert f"pid {first.pid} on {socket.gethostname()}" in line, line
        assert not (_ws(copy).root / "trials").exists() and not _ws(copy).lock_path.exists()
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    table, runs = _state(a)
    assert set(table.state) == {"done"} and {r["state"] for r in runs} == {"done"}


def test_a_managed_servers_sweep_database_is_held_too(
    open_tmp: Path, movie: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a managed server the key is the sweep's ledger database (the lock's session waits in the
    maintenance database, which --restart never renames)."""
    monkeypatch.setenv("ULTRACK_DB_PW", "managed-pw")
    managed = "database: {kind: postgresql, managed: true}\nexecutor: {kind: local, workers: 1}\n"
    spec = write_spec(open_tmp, movie, name="held", grid=GRID_A, extra=managed)
    sw = load(spec)
    server = managed_server(sw, Workspace(sw.workdir))
    keep_up(sw, server)  # `db start`
    try:
        with advisory.held(server.credentials(), "postgres", db_name(sw, "state"), "test"):
            r = subprocess.run([*CLI, "sweep", "-q", str(spec)], capture_output=True, text=True,
                               timeout=300, env={**os.environ})
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "gs_held_state" in r.stderr and f"pid {os.getpid()} on {socket.gethostname()}" in r.stderr
    finally:
        server.stop()


def test_a_role_that_may_not_create_a_schema_is_told_how_in_one_line(
    open_tmp: Path, movie: dict[str, Path], lab: Any
) -> None:
    server, creds = lab
    with psycopg.connect(host=creds.host, port=creds.port, user=creds.user, password=creds.password,
                         dbname="lab", autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON DATABASE lab FROM PUBLIC, gridsearch")
    spec = _spec(open_tmp, movie, server.port, "denied", GRID_A)
    r = subprocess.run([*CLI, "sweep", "-q", str(spec)], capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "permission denied" in r.stderr and "GRANT CREATE ON DATABASE lab TO gridsearch" in r.stderr
    assert not _ws(spec).pg_schema.exists()
