"""The sweep on PostgreSQL: a managed server (started for the sweep, or one `db start` left up) or an
existing one. The password reaches libpq through connect_args and PGPASSWORD only."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator

from gridsearch.backends import Backend
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
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace


def db_name(sweep: Sweep, what: str) -> str:
    """PostgreSQL folds case and dislikes '-': one predictable name per sweep and role."""
    base = re.sub(r"[^a-z0-9_]", "_", sweep.name.lower())
    return f"gs_{base}_{what}"


def managed_server(sweep: Sweep, ws: Workspace) -> ManagedServer:
    db = sweep.database
    return ManagedServer(ws.root / "postgres", workers=sweep.executor.workers,
                         listen_addresses=db.listen)


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
def open_postgres(sweep: Sweep, ws: Workspace, read_only: bool = False) -> Iterator[Backend]:
    if sweep.database.managed and sweep.executor.kind == "slurm" and not read_only:
        from gridsearch.slurm.server import open_server_job  # the server runs as a SLURM job

        with open_server_job(sweep, ws) as be:
            yield be
        return
    if read_only and sweep.database.managed and sweep.executor.kind == "slurm":
        remote = _remote_server_job(sweep, ws)
        if remote is not None:
            yield remote
            return
    server = server_for(sweep, ws)
    with contextlib.ExitStack() as stack:
        if isinstance(server, ManagedServer):
            ws.root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(running(server, keep=sweep.database.keep))
            state_db, main_db = db_name(sweep, "state"), db_name(sweep, "main")
            server.create_database(state_db)
        else:
            # An existing server: the user's database holds everything (ultrack's tables, optuna's
            # and ours); creating databases may not be allowed there.
            state_db = main_db = sweep.database.dbname or "postgres"
        if read_only and isinstance(server, ManagedServer):
            url, kwargs = server.socket_url(state_db)
            yield Backend(url, kwargs, ws, kind="postgresql", server=server, state_db=state_db)
            return
        creds = server.credentials()
        connect(creds, state_db).close()  # unreachable, wrong password: one line, before any work
        env = stack.enter_context(libpq_environ(creds))
        url = f"postgresql+psycopg2://{creds.user}@{creds.host}:{creds.port}/{state_db}"
        kwargs = {"connect_args": {"password": creds.password}} if creds.password else {}

        def address_of(name: str) -> str:
            if isinstance(server, ManagedServer):
                dbname = db_name(sweep, name)
                if not read_only:
                    server.create_database(dbname)
                return ultrack_address(creds, dbname)
            return ultrack_address(creds, main_db)

        yield Backend(url, kwargs, ws, kind="postgresql", env=env, address_of=address_of,
                      server=server, state_db=state_db)


def _remote_server_job(sweep: Sweep, ws: Workspace) -> Backend | None:
    """A view of a SLURM sweep whose server job runs on another node: over TCP, never by starting
    a second server on the shared data directory (two postmasters would corrupt it)."""
    from gridsearch.slurm.server import live_server

    live = live_server(ws)
    if live is None or live[1] in (socket.gethostname(), "localhost", "127.0.0.1"):
        return None  # not running, or on this node: the unix socket path works
    job, host, port = live
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise PostgresError(f"the sweep's PostgreSQL runs as SLURM job {job} on {host}:{port}; "
                            f"set {PASSWORD_ENV} (the password the sweep was started with) to read it")
    creds = Credentials(host, port, DEFAULT_ROLE, password)
    state_db = db_name(sweep, "state")
    connect(creds, state_db).close()
    return Backend(f"postgresql+psycopg2://{creds.user}@{host}:{port}/{state_db}",
                   {"connect_args": {"password": password}}, ws, kind="postgresql", state_db=state_db)


def archive_state(backend: Backend) -> str | None:
    """--restart keeps the old ledger: the state database is renamed, not dropped."""
    server = backend.server
    if not isinstance(server, ManagedServer):
        return None
    new = f"{backend.state_db}_archived_{time.strftime('%Y%m%d%H%M%S')}"
    server.rename_database(backend.state_db, new)
    server.create_database(backend.state_db)
    return new
