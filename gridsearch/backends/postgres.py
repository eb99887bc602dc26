"""The sweep on PostgreSQL: a managed server (started for the sweep, or one `db start` left up), an
existing server, or (read-only views) a server job that runs on another node.

The password reaches libpq through connect_args and PGPASSWORD only."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psycopg
import sqlalchemy as sa
from psycopg import sql

from gridsearch.backends import schemas
from gridsearch.backends.base import (
    FORK_NAME,
    MAIN,
    Backend,
    ForkError,
    check_fork_name,
    copy_working_dir,
    fork_dirs,
    free_bytes,
    remove_working_dir,
    room,
)
from gridsearch.backends.names import db_name, fit_identifier
from gridsearch.core import files
from gridsearch.core.errors import first_line
from gridsearch.postgres import (
    DEFAULT_ROLE,
    PASSWORD_ENV,
    Credentials,
    ExternalServer,
    ManagedServer,
    Owner,
    PostgresError,
    PostgresServer,
    ServedElsewhere,
    advisory,
    connect,
    libpq_env,
    running,
    ultrack_address,
)
from gridsearch.postgres.client import hostport, sqlalchemy_url
from gridsearch.runtime import release_connections
from gridsearch.schema import metadata
from gridsearch.spec import Sweep
from gridsearch.ultrackdb import UltrackDB
from gridsearch.workspace import Workspace

__all__ = ["PostgresBackend", "db_name", "fit_identifier", "open_postgres"]

T = TypeVar("T")

@dataclass
class PostgresBackend(Backend):
    """``server``: None for a view over TCP of a server another node runs."""

    server: PostgresServer | None = None
    sweep: Sweep | None = field(default=None, repr=False)
    creds: Credentials | None = field(default=None, repr=False)
    state_db: str = ""
    create_databases: bool = True  # a managed server: one database per ultrack db
    schema: str | None = None  # an existing server: the sweep's schema (None: public, as before)

    def ultrack_db(self, name: str) -> UltrackDB:
        assert self.creds is not None and self.sweep is not None
        dbname = db_name(self.sweep, name) if self.create_databases else self.state_db
        if self.create_databases and self.server is not None:  # ours: here, or a SLURM server job
            self.server.create_database(dbname)
        address = ultrack_address(self.creds, dbname, self.schema)
        return UltrackDB(name, self.ws.db_dir(name), "postgresql", address)

    @property
    def can_fork(self) -> bool:
        """Only where the sweep creates its own databases (a managed server, here or as a SLURM
        job). On an existing server ultrack's tables live in the sweep's schema of the user's
        database: CREATE DATABASE ... TEMPLATE copies whole databases (the user's other data with
        them, and we may not create databases there), and PostgreSQL has no way to copy a schema;
        a second schema would have to be filled table by table. The scheduler then runs one
        branch at a time in the one database."""
        return self.create_databases and self.server is not None and self.sweep is not None

    def fork(self, src: str, dst: str) -> UltrackDB:
        """``CREATE DATABASE dst TEMPLATE src`` (gs_solve_before, in it, comes along), then its
        working dir (metadata.toml). Nothing may be connected to ``src``: the caller closed its
        engines; ultrack's, in this process, are disposed here; any other session is an error
        (DatabaseInUse), never ended (it could be a worker still writing)."""
        check_fork_name(dst)
        server, sweep = self._forking()
        release_connections()
        self.drop(dst)
        server.copy_database(db_name(sweep, src), db_name(sweep, dst))
        try:
            copy_working_dir(self.ws.db_dir(src), self.ws.db_dir(dst))
        except OSError as exc:
            raise ForkError(f"copying the working dir of database {src} to {dst}: {exc}") from None
        return self.ultrack_db(dst)

    def drop(self, name: str) -> None:
        """Its working dir, then its database (sessions on it ended): a crash in between leaves a
        database forks() still finds."""
        check_fork_name(name)
        server, sweep = self._forking()
        remove_working_dir(self.ws.db_dir(name))
        server.drop_database(db_name(sweep, name))

    def fork_room(self, src: str, wanted: int) -> tuple[int, str]:
        """pg_database_size against the free space of the server's data directory when this
        machine sees it (a managed server; a SLURM server job's, on the shared workdir); else
        unknown, and room is assumed."""
        server, sweep = self._forking()
        size = server.database_size(db_name(sweep, src))
        data_dir = self._data_dir()
        if data_dir is None:
            return wanted, (f"free space of PostgreSQL at {hostport(server.host, server.port)} is "
                            f"unknown here: assuming room for {wanted} copies of database {src}")
        free, where = free_bytes(data_dir)
        return room(src, size, free, where, wanted)

    def forks(self) -> list[str]:
        """Fork databases of this sweep on the server, and fork working dirs in the workdir."""
        server, sweep = self._forking()
        names = fork_dirs(self.ws)
        for db in server.list_databases():
            what = db["name"].rsplit("_", 1)[-1]
            if _is_fork(what) and db_name(sweep, what) == db["name"]:
                names.add(what)
        return sorted(names, key=lambda n: int(n[1:]))

    def database_sizes(self, names: Iterable[str], ledger: sa.Engine) -> dict[str, int]:
        """pg_database_size of each of the sweep's databases on the server, read through the
        ledger's own connection (a view over TCP has no admin one). On an existing server the
        sweep is one schema of the user's database: main is the size of that schema's tables (the
        ledger's too, a small part); a workdir from before schemas shares `public`: unknown."""
        names = list(names)
        if self.sweep is None:
            return {}
        with ledger.connect() as c:
            if self.create_databases:
                want = {db_name(self.sweep, n): n for n in names}
                rows = c.execute(sa.text("SELECT datname, pg_database_size(datname) FROM pg_database "
                                         "WHERE datname = ANY(:names)"), {"names": list(want)})
                return {want[d]: int(size) for d, size in rows}
            if self.schema is None or MAIN not in names:
                return {}
            size = c.execute(sa.text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = :schema AND c.relkind IN ('r', 'm')"),
                {"schema": self.schema}).scalar_one()
            return {MAIN: int(size)}

    def _forking(self) -> tuple[PostgresServer, Sweep]:
        if not self.can_fork or self.server is None or self.sweep is None:
            raise ForkError("this sweep's PostgreSQL databases cannot be forked (its tables live in a "
                            "schema of an existing server's database, or this is a read-only view)")
        return self.server, self.sweep

    def _data_dir(self) -> Path | None:
        """The server's data directory, if this machine sees it."""
        if isinstance(self.server, ManagedServer):
            return self.server.data_dir
        assert self.sweep is not None
        if self.create_databases and self.sweep.database.managed:  # a SLURM server job's files
            data_dir = managed_server(self.sweep, self.ws).data_dir
            return data_dir if data_dir.parent.exists() else None
        return None

    def archive_ledger(self) -> str | None:
        """--restart keeps the old ledger: the state database is renamed (managed here or as a SLURM
        job), or, in an existing server's database, the ledger's tables move aside."""
        if self.server is None or self.sweep is None:
            return None
        stamp = files.stamp()
        if not self.create_databases:
            return self._archive_schema(stamp) if self.schema else self._archive_tables(stamp)
        new = fit_identifier(self.state_db, f"_archived_{stamp}", self.state_db)
        self.server.rename_database(self.state_db, new)
        self.server.create_database(self.state_db)
        return f"database {new}"

    def _in_state_db(self, what: str, fn: Callable[[psycopg.Connection], T]) -> T:
        """fn on a connection to the state database; its failure is one line naming the server."""
        assert self.creds is not None
        try:
            with connect(self.creds, self.state_db) as conn:
                return fn(conn)
        except psycopg.Error as exc:
            raise PostgresError(f"{what} in database {self.state_db!r} at "
                                f"{hostport(self.creds.host, self.creds.port)}: {first_line(exc)}") from None

    def _archive_schema(self, stamp: str) -> str | None:
        """The sweep's schema is renamed whole (its ledger, optuna's study, ultrack's tables)."""
        assert self.schema is not None
        schema = self.schema
        new = self._in_state_db("archiving the ledger", lambda c: schemas.archive(c, schema, stamp))
        return None if new is None else f"schema {new} of database {self.state_db}"

    def _archive_tables(self, stamp: str) -> str | None:
        """A workdir from before schemas, its ledger in ``public`` (which may hold more than ours:
        optuna's tables other studies, ultrack's are caches): our gs_* tables move to a schema of
        their own, indexes and sequences with them, and optuna's study is renamed, in one
        transaction. None: nothing to archive."""
        assert self.sweep is not None and self.creds is not None
        schema = db_name(self.sweep, f"archived_{stamp}")
        study = f"{self.sweep.name}_archived_{stamp}"

        def move(conn: psycopg.Connection) -> bool:
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename = ANY(%s)", (sorted(metadata.tables),)).fetchall()]
            renamed = 0
            if conn.execute("SELECT to_regclass('studies')").fetchone()[0] is not None:
                renamed = conn.execute("UPDATE studies SET study_name = %s WHERE study_name = %s",
                                       (study, self.sweep.name)).rowcount
            if tables:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for t in tables:
                conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(sql.Identifier(t),
                                                                             sql.Identifier(schema)))
            return bool(tables or renamed)

        def move_all(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                return move(conn)

        if not self._in_state_db("archiving the ledger", move_all):
            return None
        return f"schema {schema} of database {self.state_db} (optuna study {study})"


def _is_fork(name: str) -> bool:
    return FORK_NAME.fullmatch(name) is not None


def managed_server(sweep: Sweep, ws: Workspace) -> ManagedServer:
    return ManagedServer(ws.root / "postgres", workers=sweep.executor.workers,
                         listen_addresses=sweep.database.listen)


def keep_up(sweep: Sweep, server: ManagedServer) -> bool:
    """`gridsearch db start`: start and leave up, with the sweep's databases; True if started here.
    A server started here also gets ULTRACK_DB_PW as its role's password (if set), so that views on
    other nodes can read it over TCP (never reset under a running server: its sweep's workers use it)."""
    sweep.workdir.mkdir(parents=True, exist_ok=True)
    started = server.start()
    if started and os.environ.get(PASSWORD_ENV):
        server.credentials()
    for name in sweep_dbs(sweep):
        server.create_database(name)
    return started


def sweep_dbs(sweep: Sweep) -> list[str]:
    """The ledger's database and the ultrack database trials run in (engine.MAIN_DB)."""
    return [db_name(sweep, "state"), db_name(sweep, "main")]


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


def _claim(stack: contextlib.ExitStack, sweep: Sweep, ws: Workspace, creds: Credentials, state_db: str,
           *, own_schema: bool, read_only: bool) -> str | None:
    """Once the server answers (unreachable, wrong password: one line, before any work): the
    sweep's schema in an existing server's database (None: its own databases on a managed server),
    and, for a writer, the sweep's advisory lock, taken before anything is changed."""
    with connect(creds, state_db) as conn:
        layout = schemas.choose(sweep, ws, conn) if own_schema else None
        if read_only:
            return layout
        where = f"sweep database {state_db!r} at {hostport(creds.host, creds.port)}"
        where += f", schema {layout}" if layout else ""
        # A managed server's ledger database is renamed by --restart, which ends its sessions:
        # the lock's session waits in the maintenance database instead.
        lock_db = state_db if own_schema else "postgres"
        stack.enter_context(advisory.held(creds, lock_db, layout or state_db, where))
        if layout:
            _prepare(conn, ws, layout, creds, state_db)
    return layout


def _prepare(conn: psycopg.Connection, ws: Workspace, schema: str, creds: Credentials, dbname: str) -> None:
    try:
        schemas.prepare(conn, ws, schema)
    except psycopg.Error as exc:
        grant = f"GRANT CREATE ON DATABASE {dbname} TO {creds.user}"
        raise PostgresError(f"creating schema {schema} in database {dbname!r} at "
                            f"{hostport(creds.host, creds.port)}: {first_line(exc)} (each sweep needs a "
                            f"schema of its own: {grant})") from None


@contextlib.contextmanager
def connected(sweep: Sweep, ws: Workspace, creds: Credentials, server: PostgresServer | None,
              state_db: str, *, create_databases: bool = True, read_only: bool = False
              ) -> Iterator[PostgresBackend]:
    """The sweep's backend once the server answers: its schema, the writer's advisory lock, libpq
    env for ultrack."""
    with contextlib.ExitStack() as stack:
        layout = _claim(stack, sweep, ws, creds, state_db, own_schema=not create_databases,
                        read_only=read_only)
        schema = None if layout in (None, schemas.LEGACY) else layout
        url = sqlalchemy_url(creds, state_db, schema)
        kwargs = {"connect_args": {"password": creds.password}} if creds.password else {}
        stable = not (sweep.database.managed and not os.environ.get(PASSWORD_ENV))
        env = stack.enter_context(libpq_environ(creds))
        yield PostgresBackend(ws, url, kwargs, url, env, parallel_writers=True, stable_password=stable,
                              server=server, sweep=sweep, creds=creds, state_db=state_db,
                              create_databases=create_databases, schema=schema)


def _join(stack: contextlib.ExitStack, server: ManagedServer, sweep: Sweep, read_only: bool) -> Owner | None:
    """Use the managed server (starting it if needed); a view of one another host runs gets its
    owner instead, to read it over TCP. Nobody else may start a second server on its files."""
    try:
        stack.enter_context(running(server, keep=sweep.database.keep))
    except ServedElsewhere as exc:
        if not (read_only and exc.reachable):
            raise
        return exc.owner
    return None


@contextlib.contextmanager
def open_postgres(sweep: Sweep, ws: Workspace, read_only: bool = False) -> Iterator[Backend]:
    """A server this driver reaches directly (managed here, or existing)."""
    server = server_for(sweep, ws)
    with contextlib.ExitStack() as stack:
        if isinstance(server, ManagedServer):
            ws.root.mkdir(parents=True, exist_ok=True)
            remote = _join(stack, server, sweep, read_only)
            if remote is not None:
                yield tcp_view(sweep, ws, remote.address, remote.port, remote.describe())
                return
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
        yield stack.enter_context(connected(sweep, ws, creds, server, state_db, read_only=read_only,
                                            create_databases=isinstance(server, ManagedServer)))


def remote_credentials(host: str, port: int, what: str) -> Credentials:
    """A view of a server another node runs needs the password the sweep was started with."""
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise PostgresError(f"the sweep's PostgreSQL runs as {what} on {hostport(host, port)}; set "
                            f"{PASSWORD_ENV} (the password the sweep was started with) to read it")
    return Credentials(host, port, DEFAULT_ROLE, password)


def tcp_view(sweep: Sweep, ws: Workspace, host: str, port: int, what: str) -> PostgresBackend:
    """A read-only view over TCP of a server another node runs, never a second server on its files
    (two postmasters on one data directory corrupt it). ``what``: who runs it, for errors."""
    creds = remote_credentials(host, port, what)
    state_db = db_name(sweep, "state")
    connect(creds, state_db).close()
    kwargs = {"connect_args": {"password": creds.password}}
    return PostgresBackend(ws, sqlalchemy_url(creds, state_db), kwargs, sweep=sweep, creds=creds,
                           state_db=state_db)


def is_this_host(host: str) -> bool:
    return host in (socket.gethostname(), "localhost", "127.0.0.1")
