"""The sweep's advisory lock in its database: one driver per sweep database, whatever its node or
workdir (a copied workdir, a second node with its own view of the filesystem).

The driver holds ``pg_try_advisory_lock`` in a session of its own for its whole life. The server
releases it when that session ends, so a killed driver never leaves it behind (a crashed node's
session ends once TCP keepalives give up on it). The session's ``application_name`` names the
driver's host and pid: a refused driver says who holds the lock."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator

import psycopg

from gridsearch.core.errors import Busy, first_line
from gridsearch.postgres.client import Credentials, PostgresError, connect, hostport

_APP_PREFIX = "gridsearch driver"
# A crashed node's session (and lock) should not outlive it by the kernel's default two hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 6}

_HOLDER = """
SELECT a.application_name, host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %s AND l.objid::bigint = %s
"""


def key(name: str) -> int:
    """A signed 64-bit key for ``name`` (the sweep's schema or database)."""
    return int.from_bytes(hashlib.sha256(f"gridsearch:{name}".encode()).digest()[:8], "big", signed=True)


def application_name() -> str:
    return f"{_APP_PREFIX} pid {os.getpid()} on {socket.gethostname()}"[:63]


def _holder(conn: psycopg.Connection, k: int) -> str:
    unsigned = k & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(_HOLDER, (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
    if row is None:
        return "a session that has just ended; run the command again"
    app, addr = row
    who = app.removeprefix(_APP_PREFIX).strip() if app and app.startswith(_APP_PREFIX) else f"session {app!r}"
    return who + (f", connected from {addr}" if addr else "")


@contextlib.contextmanager
def held(creds: Credentials, dbname: str, name: str, what: str) -> Iterator[None]:
    """Hold the advisory lock for ``name`` in ``dbname`` for the block, or raise Busy naming the
    driver that holds it. ``what`` names the sweep's place in messages."""
    k = key(name)
    conn = connect(creds, dbname, application_name=application_name(), **_KEEPALIVES)
    try:
        try:
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (k,)).fetchone()[0]:
                raise Busy(f"{what}: another sweep's driver holds it: {_holder(conn, k)}")
        except psycopg.Error as exc:
            raise PostgresError(f"taking the sweep's lock in database {dbname!r} at "
                                f"{hostport(creds.host, creds.port)}: {first_line(exc)}") from None
        yield
    finally:
        conn.close()  # ends the session: the server releases the lock
