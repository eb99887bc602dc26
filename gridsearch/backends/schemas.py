"""Where a sweep's tables live in the user's database on an existing server: a schema per sweep.

Everything of the sweep (our gs_* tables, optuna's, ultrack's nodes/links/overlaps) lives in one
schema, reached through libpq's ``search_path`` (client.search_path) by the ledger, the workers
and ultrack alike, so ultrack's clears and the ledger's recovery only ever see this sweep's tables.
The schema's name is recorded in the workdir at the first sweep (Workspace.pg_schema).

A workdir an older gridsearch made kept everything in ``public``: it stays there (``LEGACY``), so its
ledger is not lost; the advisory lock (postgres/advisory.py) still keeps a second driver off it."""

from __future__ import annotations

import psycopg
from psycopg import sql

from gridsearch.backends.names import fit_identifier, schema_name
from gridsearch.core.files import atomic_write
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

LEGACY = "public"


def recorded(ws: Workspace) -> str | None:
    try:
        return ws.pg_schema.read_text().strip() or None
    except FileNotFoundError:
        return None


def _has_ledger(conn: psycopg.Connection, schema: str, study: str) -> bool:
    """``schema`` holds our tables and optuna's study ``study``."""
    found = conn.execute("SELECT to_regclass(%s), to_regclass(%s)",
                         (f"{schema}.gs_meta", f"{schema}.studies")).fetchone()
    if found is None or None in found:
        return False
    row = conn.execute(sql.SQL("SELECT 1 FROM {}.studies WHERE study_name = %s").format(
        sql.Identifier(schema)), (study,)).fetchone()
    return row is not None


def choose(sweep: Sweep, ws: Workspace, conn: psycopg.Connection) -> str:
    """The recorded schema; else ``public`` for an older workdir whose ledger is there; else the
    sweep's own (names.schema_name)."""
    if (name := recorded(ws)) is not None:
        return name
    if ws.legacy() and _has_ledger(conn, LEGACY, sweep.name):
        return LEGACY
    return schema_name(sweep, ws)


def prepare(conn: psycopg.Connection, ws: Workspace, schema: str) -> None:
    """Create the schema (if needed) and record it in the workdir."""
    if schema != LEGACY:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    if recorded(ws) != schema:
        atomic_write(ws.pg_schema, schema + "\n")


def archive(conn: psycopg.Connection, schema: str, stamp: str) -> str | None:
    """--restart: the sweep's schema, every table in it, is renamed; an empty one replaces it.
    Returns the archived schema's name, None when there was nothing to keep."""
    tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)).fetchone()
    if not tables or not tables[0]:
        return None
    new = fit_identifier(schema, f"_archived_{stamp}", schema)
    with conn.transaction():
        conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(schema),
                                                                     sql.Identifier(new)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return new
