"""What a sweep asks of any PostgreSQL server (credentials, database bookkeeping), and the server
someone else runs. Admin SQL is shared: only how an admin session is opened differs."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import tenacity
from psycopg import sql

from gridsearch.core.errors import first_line
from gridsearch.postgres.client import PASSWORD_ENV, Credentials, PostgresError, connect, hostport

T = TypeVar("T")

_CREATE_ATTEMPTS = 20


def _end_sessions(conn: psycopg.Connection, dbname: str) -> None:
    """CREATE ... TEMPLATE and RENAME need the database idle: end everyone else's sessions on it."""
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )


class DatabaseInUse(PostgresError):
    """A database to copy has sessions open: a template must have none, and ending them (as
    create_database does for its own template) could kill a worker that is still writing."""


class PostgresServer(ABC):
    """What a sweep needs from any server: credentials and database bookkeeping."""

    @property
    @abstractmethod
    def host(self) -> str:
        """Host clients connect to."""

    @property
    @abstractmethod
    def port(self) -> int:
        """TCP port clients connect to."""

    @abstractmethod
    def credentials(self) -> Credentials:
        """Credentials a worker uses over TCP."""

    @abstractmethod
    def _admin(self, dbname: str | None = None) -> psycopg.Connection:
        """An autocommit connection allowed to create/drop databases (None: maintenance db)."""

    @abstractmethod
    def _db_owner(self) -> str | None:
        """Role to own created databases (None: the connecting role)."""

    def _run_admin(self, what: str, fn: Callable[[psycopg.Connection], T], dbname: str | None = None) -> T:
        """Run fn(conn) and report any failure as one line naming host:port."""
        with self._admin(dbname) as conn:
            try:
                return fn(conn)
            except psycopg.Error as exc:
                raise PostgresError(
                    f"{what} failed on PostgreSQL at {hostport(self.host, self.port)}: {first_line(exc)}"
                ) from None

    def database_exists(self, name: str) -> bool:
        """Whether a database of that name exists."""
        return bool(
            self._run_admin(
                f"looking up database {name!r}",
                lambda c: c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone(),
            )
        )

    def create_database(self, name: str, template: str | None = None) -> bool:
        """Create ``name`` (optionally as a TEMPLATE copy); False if it already existed."""
        if self.database_exists(name):
            return False
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        owner = self._db_owner()
        if owner is not None:
            stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        if template is not None:
            stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))

        # ObjectInUse: a client reconnected to the template between ending its sessions and the
        # copy (a template must have none); end them again, a few times.
        @tenacity.retry(retry=tenacity.retry_if_exception_type(psycopg.errors.ObjectInUse),
                        stop=tenacity.stop_after_attempt(_CREATE_ATTEMPTS),
                        wait=tenacity.wait_fixed(0.1), reraise=True)
        def create(conn: psycopg.Connection) -> bool:
            if template is not None:
                _end_sessions(conn, template)
            try:
                conn.execute(stmt)
            except psycopg.errors.DuplicateDatabase:
                return False  # someone else created it meanwhile: fine, idempotent
            return True

        return bool(self._run_admin(f"creating database {name!r}", create))

    def copy_database(self, template: str, name: str) -> None:
        """``CREATE DATABASE name TEMPLATE template``, without ending anyone's sessions: the caller
        closed its own; any left is someone still using it, reported in one line (PostgreSQL
        itself waits 5 s for sessions that are closing before it refuses)."""
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        owner = self._db_owner()
        if owner is not None:
            stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))

        def copy(conn: psycopg.Connection) -> None:
            try:
                conn.execute(stmt)
            except psycopg.errors.ObjectInUse:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                   (template,)).fetchone()
                raise DatabaseInUse(
                    f"cannot copy database {template!r} on PostgreSQL at {hostport(self.host, self.port)}: "
                    f"{row[0] if row else 'some'} session(s) still connected to it (a template must "
                    "have none)") from None

        self._run_admin(f"copying database {template!r} to {name!r}", copy)

    def database_size(self, name: str) -> int:
        """Bytes on disk of database ``name``."""
        row = self._run_admin(f"measuring database {name!r}",
                              lambda c: c.execute("SELECT pg_database_size(%s)", (name,)).fetchone())
        return int(row[0]) if row else 0

    def rename_database(self, name: str, new: str) -> None:
        """Rename needs the database idle: its sessions are ended first."""
        stmt = sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(new))

        def rename(conn: psycopg.Connection) -> None:
            _end_sessions(conn, name)
            conn.execute(stmt)

        self._run_admin(f"rename database {name}", rename)

    def drop_database(self, name: str) -> bool:
        """Drop ``name`` even with open sessions; False if it did not exist."""
        if not self.database_exists(name):
            return False
        stmt = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        self._run_admin(f"dropping database {name!r}", lambda c: c.execute(stmt))
        return True

    def list_databases(self) -> list[dict[str, Any]]:
        """Non-template databases with their size in bytes (None where we may not connect)."""
        rows = self._run_admin(
            "listing databases",
            lambda c: c.execute(
                "SELECT datname, CASE WHEN has_database_privilege(datname, 'CONNECT') "
                "THEN pg_database_size(datname) END FROM pg_database "
                "WHERE NOT datistemplate ORDER BY datname"
            ).fetchall(),
        )
        return [{"name": n, "size_bytes": None if s is None else int(s)} for n, s in rows]

    def connections(self) -> int:
        """Client sessions other than the one asking."""
        row = self._run_admin(
            "counting connections",
            lambda c: c.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone(),
        )
        return int(row[0])

    def _create_role(self, role: str) -> None:
        """The unprivileged LOGIN role workers connect as; it owns the sweep's databases. CREATEDB:
        over TCP (a SLURM server job), --restart renames the ledger's database as this role."""

        def create(conn: psycopg.Connection) -> None:
            row = conn.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if row is not None:
                if not row[0]:
                    conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))
                return
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(role)))

        self._run_admin(f"creating role {role!r}", create)

    def _set_password(self, role: str, password: str) -> None:
        """Send only a SCRAM verifier computed here by libpq: the wire, log and WAL never see plaintext."""

        def set_password(conn: psycopg.Connection) -> None:
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(verifier.decode())
                )
            )

        self._run_admin(f"setting the password of role {role!r}", set_password)

    def _live_status(self) -> dict[str, Any]:
        return {"databases": self.list_databases(), "connections": self.connections()}


class ExternalServer(PostgresServer):
    """A server someone else runs (e.g. the lab's); password from ULTRACK_DB_PW or ~/.pgpass."""

    def __init__(self, host: str, port: int, user: str, dbname: str = "postgres",
                 password: str | None = None) -> None:
        self._host = host
        self._port = int(port)
        self.user = user
        self.dbname = dbname
        self._password = password  # known to the caller (a server job's random one), else env/pgpass

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def credentials(self) -> Credentials:
        """None as password lets libpq fall back to PGPASSFILE/.pgpass."""
        return Credentials(self._host, self._port, self.user,
                           self._password or os.environ.get(PASSWORD_ENV))

    def _admin(self, dbname: str | None = None) -> psycopg.Connection:
        return connect(self.credentials(), dbname or self.dbname)

    def _db_owner(self) -> str | None:
        return None

    def status(self) -> dict[str, Any]:
        """Reachability and contents; an unreachable server is reported, not raised."""
        out: dict[str, Any] = {
            "managed": False,
            "running": False,
            "host": self._host,
            "port": self._port,
            "pid": None,
            "data_dir": None,
            "databases": [],
            "connections": 0,
        }
        try:
            out.update(self._live_status())
            out["running"] = True
        except PostgresError as exc:
            out["error"] = str(exc)
        return out
