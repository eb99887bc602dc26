"""The sweep on PostgreSQL: a managed server (started for the sweep, or one `db start` left up), an
existing server, or (read-only views) a server job that runs on another node.

The password reaches libpq through connect_args and PGPASSWORD only."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gridsearch.backends.base import Backend
from gridsearch.postgres import (
    DEFAULT_ROLE,
    PASSWORD_ENV,
    Credentials,
    ExternalServer,
    ManagedServer,
    PostgresError,
    PostgresServer,
    connect,
    libpq_env,
    running,
    ultrack_address,
)
from gridsearch.postgres.client import sqlalchemy_url
from gridsearch.spec import Sweep
from gridsearch.ultrackdb import UltrackDB
from gridsearch.workspace import Workspace

# PostgreSQL truncates identifiers to 63 bytes: names stay below it (the sweep name is cut, a hash
# of the whole keeps cut names apart).
_MAX_IDENTIFIER = 63


def db_name(sweep: Sweep, what: str) -> str:
    """PostgreSQL folds case and dislikes '-': one predictable name per sweep and role."""
    base = re.sub(r"[^a-z0-9_]", "_", sweep.name.lower())
    return f"gs_{base}_{what}"


@dataclass
class PostgresBackend(Backend):
    """``server``: None for a view over TCP of a server another node runs."""

    server: PostgresServer | None = None
    sweep: Sweep | None = field(default=None, repr=False)
    creds: Credentials | None = field(default=None, repr=False)
    state_db: str = ""
    create_databases: bool = True  # a managed server: one database per ultrack db

    def ultrack_db(self, name: str) -> UltrackDB:
        assert self.creds is not None and self.sweep is not None
        dbname = db_name(self.sweep, name) if self.create_databases else self.state_db
        if self.create_databases and isinstance(self.server, ManagedServer):
            self.server.create_database(dbname)
        return UltrackDB(name, self.ws.db_dir(name), "postgresql", ultrack_address(self.creds, dbname))

    def archive_ledger(self) -> str | None:
        """--restart keeps the old ledger: the state database is renamed, not dropped."""
        if not isinstance(self.server, ManagedServer):
            return None
        stamp = time.strftime("%Y%m%d%H%M%S")
        new = f"{self.state_db[:_MAX_IDENTIFIER - len(stamp) - 10]}_archived_{stamp}"
        self.server.rename_database(self.state_db, new)
        self.server.create_database(self.state_db)
        return new


def managed_server(sweep: Sweep, ws: Workspace) -> ManagedServer:
    return ManagedServer(ws.root / "postgres", workers=sweep.executor.workers,
                         listen_addresses=sweep.database.listen)


def server_for(sweep: Sweep, ws: Workspace) -> PostgresServer:
    db = sweep.database
    if db.managed:
        return managed_server(sweep, ws)
    assert db.host and db.user
    return ExternalServer(db.host, db.port, db.user, db.dbname or "postgres")


@contextlib.contextmanager
def libpq_environ(creds: Credentials) -> Iterator[dict[str, str]]:
    """ultrack builds its own engines from `data.address`: in the driver, libpq finds the password
    in this process's environment, for the sweep's duration only."""
    env = libpq_env(creds)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def connected(sweep: Sweep, ws: Workspace, creds: Credentials, server: PostgresServer | None,
              state_db: str, *, create_databases: bool = True) -> Iterator[PostgresBackend]:
    """The writer's backend once the server answers: checked login, libpq env for ultrack."""
    connect(creds, state_db).close()  # unreachable, wrong password: one line, before any work
    url = sqlalchemy_url(creds, state_db)
    kwargs = {"connect_args": {"password": creds.password}} if creds.password else {}
    stable = not (sweep.database.managed and not os.environ.get(PASSWORD_ENV))
    with libpq_environ(creds) as env:
        yield PostgresBackend(ws, url, kwargs, url, env, parallel_writers=True, stable_password=stable,
                              server=server, sweep=sweep, creds=creds, state_db=state_db,
                              create_databases=create_databases)


@contextlib.contextmanager
def open_postgres(sweep: Sweep, ws: Workspace, read_only: bool = False) -> Iterator[Backend]:
    """A server this driver reaches directly (managed here, or existing)."""
    server = server_for(sweep, ws)
    with contextlib.ExitStack() as stack:
        if isinstance(server, ManagedServer):
            ws.root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(running(server, keep=sweep.database.keep))
            state_db = db_name(sweep, "state")
            server.create_database(state_db)
            if read_only:
                url, kwargs = server.socket_url(state_db)
                yield PostgresBackend(ws, url, kwargs, server=server, sweep=sweep, state_db=state_db)
                return
        else:
            # An existing server: the user's database holds everything (ultrack's tables, optuna's
            # and ours); creating databases may not be allowed there.
            state_db = sweep.database.dbname or "postgres"
        creds = server.credentials()
        yield stack.enter_context(connected(sweep, ws, creds, server, state_db,
                                            create_databases=isinstance(server, ManagedServer)))


def remote_credentials(host: str, port: int, what: str) -> Credentials:
    """A view of a server another node runs needs the password the sweep was started with."""
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise PostgresError(f"the sweep's PostgreSQL runs as {what} on {host}:{port}; "
                            f"set {PASSWORD_ENV} (the password the sweep was started with) to read it")
    return Credentials(host, port, DEFAULT_ROLE, password)


def is_this_host(host: str) -> bool:
    return host in (socket.gethostname(), "localhost", "127.0.0.1")
