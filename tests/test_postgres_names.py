"""Database names within PostgreSQL's 63 bytes, and --restart keeping the old ledger on every kind
of PostgreSQL server (issue 9, point 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from helpers import lab_database, lab_rows, pg_available, write_spec

from gridsearch import results
from gridsearch.backends.names import schema_name
from gridsearch.backends.postgres import PostgresBackend, db_name, fit_identifier
from gridsearch.engine import existing_ledger
from gridsearch.ledger import Ledger
from gridsearch.postgres import Credentials, ExternalServer, ManagedServer, sqlalchemy_url
from gridsearch.spec import load
from gridsearch.workspace import Workspace

CLI = [sys.executable, "-m", "gridsearch.cli"]
GRID = "grid:\n  tracking.appear_weight: [-0.1]\n"
PG = "database: {kind: postgresql, managed: true}\nexecutor: {kind: local, workers: 2}\n"
LONG = "long_sweep_name_" + "x" * 44 + "_one"  # 64 characters, the most a sweep name may have
needs_pg = pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")


def _named(name: str) -> Any:
    return SimpleNamespace(name=name)


# ------------------------------------------------------------------ names, no server


def test_names_that_fit_stay_as_they_always_were() -> None:
    assert db_name(_named("pgkeep"), "main") == "gs_pgkeep_main"
    assert db_name(_named("My-Sweep"), "state") == "gs_my_sweep_state"
    fits = "a" * (63 - len("gs__state"))
    assert db_name(_named(fits), "state") == f"gs_{fits}_state"


def test_long_names_fit_and_never_collide() -> None:
    assert len(LONG) == 64
    twin = LONG[:-3] + "two"  # the same first 61 characters
    names = [db_name(_named(n), what) for n in (LONG, twin, LONG.upper(), LONG[:60]) for what in
             ("state", "main")]
    assert len(set(names)) == len(names), names
    assert all(len(n.encode()) <= 63 for n in names), names
    assert all(n.startswith("gs_long_sweep_name_") for n in names)
    assert db_name(_named(LONG), "state").endswith("_state")
    state = db_name(_named(LONG), "state")
    states = (state, db_name(_named(twin), "state"))
    archived = {fit_identifier(s, "_archived_20260101120000", s) for s in states}
    assert len(archived) == 2 and all(len(a) <= 63 for a in archived)


# ------------------------------------------------------------------ restart on a managed server


def _databases(server: ManagedServer) -> list[str]:
    server.start()
    try:
        return [d["name"] for d in server.list_databases()]
    finally:
        server.stop()


def _sweep(spec: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "sweep", "-q", *args, str(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _touch_base(spec: Path) -> None:
    spec.write_text(spec.read_text().replace("max_area: 1000", "max_area: 900"))


@pytest.mark.postgres
@needs_pg
def test_a_64_character_sweep_runs_and_restarts_on_managed_postgres(
    open_tmp: Path, movie: dict[str, Path]
) -> None:
    spec = write_spec(open_tmp, movie, name=LONG, extra=PG, grid=GRID)
    assert _sweep(spec).returncode == 0
    _touch_base(spec)
    r = _sweep(spec, "--restart")
    assert r.returncode == 0, r.stderr
    sw = load(spec)
    names = _databases(ManagedServer(Workspace(sw.workdir).root / "postgres"))
    ours = [n for n in names if n.startswith("gs_")]
    state, main = db_name(sw, "state"), db_name(sw, "main")
    assert state in ours and main in ours and state != main
    archived = [n for n in ours if "_archived_" in n]
    assert len(archived) == 1 and len(ours) == 3 and all(len(n.encode()) <= 63 for n in ours), ours
    with existing_ledger(sw) as led:
        assert led is not None and len(led.study.get_trials()) == 1
        assert set(results.table(sw, led).state) == {"done"}


# ------------------------------------------------------------------ restart on an existing server


def _old_ledger(creds: Credentials, schema: str, study: str, fresh: str | None) -> None:
    """The archived ledger reads whole: its trial, its three stage runs, its own base config."""
    url = sqlalchemy_url(creds, "lab", schema)
    old = Ledger(url, study, {"connect_args": {"password": creds.password}}, read_only=True)
    try:
        assert len(old.study.get_trials()) == 1 and len(old.stage_runs()) == 3
        assert old.get_meta("base_fingerprint") not in (None, fresh)
    finally:
        old.close()


def _fresh_fingerprint(sw: Any) -> str | None:
    with existing_ledger(sw) as led:  # the fresh ledger
        assert led is not None and len(led.study.get_trials()) == 1
        return led.get_meta("base_fingerprint")


@pytest.mark.postgres
@needs_pg
def test_restart_on_an_existing_server_keeps_the_old_ledger_readable(
    open_tmp: Path, movie: dict[str, Path], lab: Any
) -> None:
    """The sweep's schema is archived whole; nothing of it is in public."""
    server, creds = lab
    spec = write_spec(open_tmp, movie, name="ext-rs", extra=lab_database(server.port), grid=GRID)
    assert _sweep(spec).returncode == 0
    _touch_base(spec)
    r = _sweep(spec, "--restart")
    assert r.returncode == 0, r.stderr
    sw = load(spec)
    schema = schema_name(sw, Workspace(sw.workdir))
    fresh = _fresh_fingerprint(sw)
    (archived,) = lab_rows(creds, "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                           (f"{schema}_archived_%",))
    assert "nodes" in lab_rows(creds, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (archived,))
    assert lab_rows(creds, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    _old_ledger(creds, archived, "ext-rs", fresh)


@pytest.mark.postgres
@needs_pg
def test_a_workdir_from_before_schemas_keeps_its_ledger_in_public(
    open_tmp: Path, movie: dict[str, Path], lab: Any
) -> None:
    """An older gridsearch kept everything in public (and left its flock file, `.lock`): the
    workdir goes on there, nothing recomputed; --restart archives it as it always did."""
    server, creds = lab
    spec = write_spec(open_tmp, movie, name="old", extra=lab_database(server.port), grid=GRID)
    ws = Workspace(load(spec).workdir)
    ws.root.mkdir(parents=True)
    ws.pg_schema.write_text("public\n")  # lays the tables out as older versions did
    assert _sweep(spec).returncode == 0
    ws.pg_schema.unlink()
    (ws.root / ".lock").write_text("12345")
    assert "gs_meta" in lab_rows(creds, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")

    r = _sweep(spec)
    assert r.returncode == 0, r.stderr
    assert ws.pg_schema.read_text() == "public\n"
    assert lab_rows(creds, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'gs_old%'") == []
    with existing_ledger(load(spec)) as led:
        assert led is not None and len(led.stage_runs()) == 3  # nothing ran again
        assert set(results.table(load(spec), led).state) == {"done"}

    _touch_base(spec)
    r = _sweep(spec, "--restart")
    assert r.returncode == 0, r.stderr
    fresh = _fresh_fingerprint(load(spec))
    # the old one: our tables in a schema of their own, optuna's study renamed beside the new one
    (schema,) = lab_rows(creds, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'gs_old_archived_%'")
    stamp = schema.rsplit("_", 1)[1]
    assert set(lab_rows(creds, "SELECT study_name FROM studies")) == {"old", f"old_archived_{stamp}"}
    _old_ledger(creds, f"{schema},public", f"old_archived_{stamp}", fresh)


@pytest.mark.postgres
@needs_pg
def test_restart_renames_the_ledger_over_tcp_as_the_sweeps_role(open_tmp: Path, lab: Any) -> None:
    """What a SLURM server job's sweep does: the same managed server, reached over TCP as the role
    that owns the sweep's databases (no superuser socket on the login node)."""
    server, creds = lab
    sweep = _named(LONG)
    state = db_name(sweep, "state")
    server.create_database(state)  # as the server job does (--dbs): owned by the role
    with psycopg.connect(host=creds.host, port=creds.port, user=creds.user, password=creds.password,
                         dbname=state, autocommit=True) as conn:
        conn.execute("CREATE TABLE gs_meta (key text)")
    backend = PostgresBackend(Workspace(open_tmp), "", server=ExternalServer("127.0.0.1", creds.port,
                              "gridsearch"), sweep=sweep, creds=creds, state_db=state)
    kept = backend.archive_ledger()
    assert kept is not None and kept.startswith("database gs_long_sweep_name_")
    old = kept.split()[1]
    names = {d["name"] for d in server.list_databases()}
    assert {state, old} <= names and len(old.encode()) <= 63
    with psycopg.connect(host=creds.host, port=creds.port, user=creds.user, password=creds.password,
                         dbname=old) as conn:
        assert conn.execute("SELECT to_regclass('gs_meta')").fetchone()[0] is not None
