"""PostgreSQL for a sweep: a managed server (initdb/pg_ctl/pg_isready) or an external one.

Why this shape:
- ultrack builds ``postgresql://{address}`` itself, so the password never goes into the
  address; workers get it through ``PGPASSWORD`` (see :func:`libpq_env`).
- The plaintext password is never stored anywhere. Each driver process (re)sets it over
  the server's private unix socket (peer auth, no password needed there) and sends only a
  SCRAM verifier computed client-side, so neither the wire, the server log nor WAL ever
  sees the plaintext.
- ``initdb``/``pg_ctl`` refuse to run as root, so as root they run as an unprivileged OS
  user (``postgres`` or a system user ``gridsearch-pg``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    import sqlalchemy

T = TypeVar("T")

PASSWORD_ENV = "ULTRACK_DB_PW"
DEFAULT_ROLE = "gridsearch"
FALLBACK_OS_USER = "gridsearch-pg"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, pg_isready) not found on PATH or in "
    "/usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql`"
)
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "pg_isready", "postgres")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_WILDCARD_HOSTS = {"*", "0.0.0.0", "::", ""}
# Variables that could carry a password into a child's /proc/<pid>/environ.
_SECRET_ENV = (PASSWORD_ENV, "PGPASSWORD")


class PostgresError(RuntimeError):
    """A one-line, password-free error meant to be shown to the user as is."""


@dataclass(frozen=True)
class Credentials:
    """Where and as whom clients connect; the password is kept out of repr/tracebacks."""

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException | str) -> str:
    """libpq errors span several lines (DETAIL, HINT); the first one says what happened."""
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def find_binaries(bindir: str | Path | None = None) -> Path:
    """Directory holding initdb/pg_ctl/pg_isready: PATH first, then the highest Debian version."""

    def complete(d: Path) -> bool:
        return all(
            (d / b).is_file() and os.access(d / b, os.X_OK) and (d / b).resolve().name != "pg_wrapper"
            for b in _REQUIRED_BINARIES
        )

    if bindir is not None:
        d = Path(bindir)
        if complete(d):
            return d
        raise PostgresError(f"{d} does not hold {', '.join(_REQUIRED_BINARIES)}; {INSTALL_HINT}")
    on_path = shutil.which("initdb")
    if on_path and complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)

    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if complete(d):
            return d
    raise PostgresError(INSTALL_HINT)


def _child_env() -> dict[str, str]:
    """Environment for server processes: nothing secret may reach /proc/<pid>/environ."""
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env.setdefault("LC_ALL", "C")
    return env


def _conf_str(value: str) -> str:
    """Quote a value for postgresql.conf."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def port_is_free(host: str, port: int) -> bool:
    """Whether the server could bind host:port (same SO_REUSEADDR semantics as postgres)."""
    bind_hosts = ["0.0.0.0"] if host in _WILDCARD_HOSTS else [h.strip() for h in host.split(",")]
    for h in bind_hosts:
        family = socket.AF_INET6 if ":" in h else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((h, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise PostgresError(f"cannot bind {_hostport(h, port)}: {exc.strerror}") from None
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (tiny race with other starters; start() re-checks)."""
    h = "0.0.0.0" if host in _WILDCARD_HOSTS else host.split(",")[0].strip()
    family = socket.AF_INET6 if ":" in h else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((h, 0))
        return int(s.getsockname()[1])


def engine(dbname: str, creds: Credentials, **kwargs: Any) -> sqlalchemy.Engine:
    """SQLAlchemy engine (psycopg2) whose URL holds no password: it goes via connect_args."""
    import sqlalchemy

    url = sqlalchemy.URL.create(
        "postgresql+psycopg2",
        username=creds.user,
        host=creds.host,
        port=creds.port,
        database=dbname,
    )
    connect_args = dict(kwargs.pop("connect_args", {}))
    if creds.password is not None:
        connect_args["password"] = creds.password
    return sqlalchemy.create_engine(url, connect_args=connect_args, **kwargs)


def libpq_env(creds: Credentials) -> dict[str, str]:
    """Environment for worker processes: libpq reads PGPASSWORD, ultrack's address stays clean."""
    return {} if creds.password is None else {"PGPASSWORD": creds.password}


def ultrack_address(creds: Credentials, dbname: str) -> str:
    """``user@host:port/dbname`` for ultrack's ``database.address`` (no password in it)."""
    return f"{quote(creds.user, safe='')}@{_hostport(creds.host, creds.port)}/{quote(dbname, safe='')}"


def connect(creds: Credentials, dbname: str = "postgres", timeout: int = 10) -> psycopg.Connection:
    """Open an autocommit psycopg connection over TCP, turning failures into a PostgresError."""
    kwargs: dict[str, Any] = {
        "host": creds.host,
        "port": creds.port,
        "user": creds.user,
        "dbname": dbname,
        "connect_timeout": timeout,
        "autocommit": True,
    }
    if creds.password is not None:
        kwargs["password"] = creds.password
    try:
        return psycopg.connect(**kwargs)
    except psycopg.Error as exc:
        raise PostgresError(
            f"cannot connect to PostgreSQL at {_hostport(creds.host, creds.port)} as "
            f"{creds.user!r} (database {dbname!r}): {_first_line(exc)}"
        ) from None


# --------------------------------------------------------------------------- servers


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
                    f"{what} failed on PostgreSQL at {_hostport(self.host, self.port)}: {_first_line(exc)}"
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

        def create(conn: psycopg.Connection) -> bool:
            for attempt in range(20):
                if template is not None:
                    # CREATE DATABASE ... TEMPLATE needs the template to have no sessions.
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (template,),
                    )
                try:
                    conn.execute(stmt)
                    return True
                except psycopg.errors.DuplicateDatabase:
                    return False  # someone else created it meanwhile: fine, idempotent
                except psycopg.errors.ObjectInUse:
                    if attempt == 19:
                        raise
                    time.sleep(0.1)  # a client reconnected to the template; terminate again
            return False

        return bool(self._run_admin(f"creating database {name!r}", create))

    def rename_database(self, name: str, new: str) -> None:
        """Rename needs the database idle: its sessions are ended first."""
        stmt = sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(new))

        def rename(conn: psycopg.Connection) -> None:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
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

    def _live_status(self) -> dict[str, Any]:
        return {"databases": self.list_databases(), "connections": self.connections()}


class ExternalServer(PostgresServer):
    """A server someone else runs (e.g. the lab's); password from ULTRACK_DB_PW or ~/.pgpass."""

    def __init__(self, host: str, port: int, user: str, dbname: str = "postgres") -> None:
        self._host = host
        self._port = int(port)
        self.user = user
        self.dbname = dbname

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def credentials(self) -> Credentials:
        """None as password lets libpq fall back to PGPASSFILE/.pgpass."""
        return Credentials(self._host, self._port, self.user, os.environ.get(PASSWORD_ENV))

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


class ManagedServer(PostgresServer):
    """A PostgreSQL server gridsearch owns: data, socket and log all live under ``root``.

    Layout: ``root/data`` (PGDATA), ``root/run`` (0700 unix-socket dir), ``root/server.log``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        port: int | None = None,
        listen_addresses: str = "127.0.0.1",
        host: str | None = None,
        workers: int = 1,
        role: str = DEFAULT_ROLE,
        bindir: str | Path | None = None,
        timeout: int = 60,
    ) -> None:
        self.root = Path(root).absolute()
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self.requested_port = port
        self.listen_addresses = listen_addresses
        self._advertised_host = host
        self.workers = workers
        self.role = role
        self._bindir = bindir
        self._resolved_bindir: Path | None = None
        self.timeout = timeout
        self._creds: Credentials | None = None
        self._port: int | None = None

    # ---- facts about this server

    @property
    def bindir(self) -> Path:
        """Resolved lazily so that merely describing a server needs no binaries."""
        if self._resolved_bindir is None:
            self._resolved_bindir = find_binaries(self._bindir)
        return self._resolved_bindir

    @property
    def host(self) -> str:
        """Listening on all interfaces means remote (SLURM) workers: advertise our hostname."""
        if self._advertised_host:
            return self._advertised_host
        first = self.listen_addresses.split(",")[0].strip()
        return socket.gethostname() if first in _WILDCARD_HOSTS else first

    @property
    def port(self) -> int:
        """The running server's port, else the configured/requested one, else a fresh free one."""
        info = self._pidfile()
        if info is not None and info.get("port"):
            return int(info["port"])
        if self._port is None:
            self._port = self.requested_port or self._configured_port() or free_port(self.listen_addresses)
        return self._port

    @property
    def max_connections(self) -> int:
        """Each worker may hold a few sessions (ultrack opens one per call; a segment batch with
        n_workers frames opens one per frame), plus the driver's pools, optuna's and admins."""
        return max(50, 8 * self.workers + 30)

    @property
    def socket_dir(self) -> Path:
        """``root/run`` unless the socket path would exceed sun_path; then a private dir in /tmp."""
        preferred = self.root / "run"
        if len(str(preferred / ".s.PGSQL.65535")) <= _SUN_PATH_MAX:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return Path("/tmp") / f"gridsearch-pg-{digest}"

    @property
    def os_user(self) -> str:
        """Who runs initdb/pg_ctl: the data dir's owner, else self, else (as root) a system user."""
        if self.data_dir.exists():
            return pwd.getpwuid(self.data_dir.stat().st_uid).pw_name
        if os.geteuid() != 0:
            return pwd.getpwuid(os.geteuid()).pw_name
        try:
            pwd.getpwnam("postgres")
            return "postgres"
        except KeyError:
            return FALLBACK_OS_USER

    @property
    def superuser(self) -> str:
        """initdb's bootstrap superuser: named after the OS user that runs the server."""
        return self.os_user

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def _pidfile(self) -> dict[str, str] | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        keys = (
            "pid",
            "data_dir",
            "start",
            "port",
            "socket_dir",
            "listen",
            "shm",
            "state",
        )
        return {k: v.strip() for k, v in zip(keys, lines, strict=False)}

    def pid(self) -> int | None:
        """Postmaster pid if one is alive for this data dir."""
        info = self._pidfile()
        if not info or not info.get("pid", "").lstrip("-").isdigit():
            return None
        pid = abs(int(info["pid"]))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by the server user
        return pid

    def _configured_port(self) -> int | None:
        try:
            m = re.search(
                r"^port\s*=\s*(\d+)",
                (self.data_dir / "gridsearch.conf").read_text(),
                re.MULTILINE,
            )
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def is_running(self) -> bool:
        """postmaster.pid present and pg_isready accepts on our socket."""
        info = self._pidfile()
        if info is None or self.pid() is None:
            return False
        return self._isready(info.get("socket_dir") or str(self.socket_dir), int(info.get("port") or 0))

    def _isready(self, socket_dir: str, port: int) -> bool:
        """pg_isready on the socket, as the superuser so no rejected login clutters the log."""
        res = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                socket_dir,
                "-p",
                str(port),
                "-U",
                self.superuser,
                "-d",
                "postgres",
                "-t",
                "5",
            ],
            env=_child_env(),
            capture_output=True,
            check=False,
        )
        return res.returncode == 0

    # ---- running commands as the server's OS user

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.os_user, "--", *argv]
        return argv

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self._as_server_user(argv),
                env=_child_env(),
                cwd="/",
                capture_output=True,
                text=True,
                check=False,
                timeout=self.timeout + 30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{what} in {self.data_dir}: {_first_line(exc)}") from None

    def _ensure_os_user(self) -> None:
        """As root, make sure the unprivileged server user exists (create a system user if needed)."""
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(self.os_user)
            return
        except KeyError:
            pass
        res = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                FALLBACK_OS_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode not in (0, 9):  # 9: already exists (a concurrent starter)
            raise PostgresError(
                f"cannot create system user {FALLBACK_OS_USER!r} to run PostgreSQL (initdb refuses root): "
                f"{_first_line(res.stderr or res.stdout)}"
            )

    def _check_reachable(self) -> None:
        """As root, the server user must be able to traverse every ancestor of root."""
        if os.geteuid() != 0:
            return
        for parent in reversed(self.root.parents):
            res = subprocess.run(
                ["runuser", "-u", self.os_user, "--", "test", "-x", str(parent)],
                capture_output=True,
                check=False,
            )
            if res.returncode != 0:
                raise PostgresError(
                    f"PostgreSQL runs as OS user {self.os_user!r}, which cannot enter {parent}; "
                    f"choose a root outside it or `chmod o+x {parent}`"
                )

    def _chown(self, path: Path) -> None:
        """As root, hand a file we wrote to the server user (it must read it)."""
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _private_dir(self, path: Path) -> None:
        """A 0700 directory owned by the server user (root dir, socket dir)."""
        path.mkdir(parents=True, exist_ok=True)
        st = path.lstat()
        owner_ok = {os.geteuid(), pwd.getpwnam(self.os_user).pw_uid}
        if path.is_symlink() or st.st_uid not in owner_ok:
            raise PostgresError(f"{path} is not a private directory of {self.os_user!r}; remove it")
        os.chmod(path, 0o700)
        self._chown(path)

    # ---- lifecycle

    def init(self) -> bool:
        """initdb with peer auth on the socket and scram-sha-256 over TCP; False if already done."""
        if self.initialized():
            return False
        self._ensure_os_user()
        self._private_dir(self.root)
        self._check_reachable()
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PostgresError(f"{self.data_dir} exists, is not empty and holds no PostgreSQL cluster")
        res = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            "initdb",
        )
        if res.returncode != 0:
            lines = [ln for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
            # The cause (e.g. a FATAL "No space left on device") is on stderr, between initdb's
            # progress lines: prefer it over the last progress line.
            markers = ("fatal:", "no space left", "could not", "error")
            reason = next(
                (ln.split("FATAL:", 1)[-1] for m in markers for ln in lines if m in ln.lower()),
                lines[-1] if lines else "no output",
            )
            raise PostgresError(f"initdb failed in {self.data_dir}: {reason.strip()}")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\n# gridsearch settings, rewritten at every start\ninclude 'gridsearch.conf'\n")
        return True

    def _write_config(self, port: int) -> None:
        """Settings, pg_hba.conf (no trust over TCP) and pg_ident.conf, as of this start."""
        settings = {
            "port": str(port),
            "listen_addresses": _conf_str(self.listen_addresses),
            "unix_socket_directories": _conf_str(str(self.socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": str(self.max_connections),
            "password_encryption": "'scram-sha-256'",
            # Never log statement text: ALTER ROLE ... PASSWORD must not reach the log.
            "log_statement": "'none'",
            "log_min_error_statement": "'panic'",
            "log_min_duration_statement": "-1",
            "log_connections": "off",
        }
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        me = pwd.getpwuid(os.geteuid()).pw_name
        ident_users = dict.fromkeys([self.os_user, me])
        files = {
            "gridsearch.conf": "# written by gridsearch at start\n" + conf,
            "pg_hba.conf": (
                "# written by gridsearch: the socket is for the server's OS user (peer, via\n"
                "# pg_ident map 'gridsearch'); every TCP connection needs scram-sha-256.\n"
                f"local all {self.superuser} peer map=gridsearch\n"
                "host  all all 0.0.0.0/0 scram-sha-256\n"
                "host  all all ::/0      scram-sha-256\n"
            ),
            "pg_ident.conf": "".join(f"gridsearch {u} {self.superuser}\n" for u in ident_users),
        }
        for name, text in files.items():
            path = self.data_dir / name
            path.write_text(text)
            os.chmod(path, 0o600)
            self._chown(path)

    def start(self) -> bool:
        """Start if needed; True only if this call started it (so the caller stops it)."""
        if self.is_running():
            self._ensure_role()
            return False
        # A postmaster that is alive but not accepting yet is starting up: wait for it.
        if self.pid() is not None and self._wait_ready():
            self._ensure_role()
            return False
        port = self.requested_port or self._configured_port()
        if port is None or (self.requested_port is None and not port_is_free(self.listen_addresses, port)):
            port = free_port(self.listen_addresses)
        if not port_is_free(self.listen_addresses, port):
            raise PostgresError(
                f"cannot start PostgreSQL on {_hostport(self.host, port)}: port {port} is already in use"
            )
        self._port = port
        self.init()
        self._private_dir(self.socket_dir)
        self._write_config(port)
        res = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(self.timeout),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
            ],
            "pg_ctl start",
        )
        if res.returncode != 0 or not self._isready(str(self.socket_dir), port):
            raise PostgresError(
                f"PostgreSQL in {self.data_dir} failed to start on {_hostport(self.host, port)}: "
                f"{self._log_reason(res.stderr)} (log: {self.log_file})"
            )
        self._ensure_role()
        return True

    def _wait_ready(self) -> bool:
        """Poll pg_isready while a postmaster we found is starting; never assume readiness."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.pid() is not None:
            if self.is_running():
                return True
            time.sleep(0.2)
        return False

    def _log_reason(self, fallback: str) -> str:
        """Why a start failed, from the server log (its FATAL line, or the bind error)."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-50:]
        except OSError:
            lines = []
        msgs = [
            (m.group(1), m.group(2).strip())
            for ln in lines
            if (m := re.search(r"\b(LOG|FATAL|PANIC|ERROR):\s+(.*)", ln))
        ]
        for _, msg in reversed(msgs):
            if "could not bind" in msg:
                return f"port already in use ({msg})"
        for i in range(len(msgs) - 1, -1, -1):
            level, msg = msgs[i]
            if level in ("FATAL", "PANIC"):
                if "contains errors" in msg and i > 0:
                    return f"{msgs[i - 1][1]}; {msg}"
                return msg
        return _first_line(fallback or "pg_ctl start failed")

    def stop(self) -> bool:
        """pg_ctl stop -m fast; True if a server was running and is now down."""
        if self.pid() is None:
            return False
        res = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-m",
                "fast",
                "-w",
                "-t",
                str(self.timeout),
                "-D",
                str(self.data_dir),
            ],
            "pg_ctl stop",
        )
        if res.returncode != 0 and self.pid() is not None:
            raise PostgresError(
                f"pg_ctl stop failed for {self.data_dir} ({_hostport(self.host, self.port)}): "
                f"{_first_line(res.stderr or res.stdout)}"
            )
        self._creds = None
        return True

    # ---- connections and credentials

    def socket_url(self, dbname: str) -> tuple[str, dict[str, Any]]:
        """SQLAlchemy URL + connect_args for the superuser over the private unix socket.

        Read-only views (status, results, plot) use it: they must not reset the role's password
        under a running sweep's workers, and need none on this machine."""
        info = self._pidfile() or {}
        sock = info.get("socket_dir") or str(self.socket_dir)
        return (f"postgresql+psycopg2://{self.superuser}@/{dbname}",
                {"connect_args": {"host": sock, "port": self.port}})

    def _admin(self, dbname: str | None = None) -> psycopg.Connection:
        """Superuser session over the private unix socket (peer auth: no password involved)."""
        info = self._pidfile() or {}
        sock = info.get("socket_dir") or str(self.socket_dir)
        try:
            return psycopg.connect(
                host=sock,
                port=self.port,
                user=self.superuser,
                dbname=dbname or "postgres",
                autocommit=True,
                connect_timeout=10,
            )
        except psycopg.Error as exc:
            raise PostgresError(
                f"cannot connect to managed PostgreSQL ({_hostport(self.host, self.port)}, socket {sock}): "
                f"{_first_line(exc)}"
            ) from None

    def _db_owner(self) -> str | None:
        return self.role

    def _ensure_role(self) -> None:
        """The unprivileged role workers log in as; it owns the sweep's databases."""

        def create(conn: psycopg.Connection) -> None:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.role,)).fetchone():
                return
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.role)))

        self._run_admin(f"creating role {self.role!r}", create)

    def credentials(self) -> Credentials:
        """Set the role's password (ULTRACK_DB_PW, else a fresh random one) and return it.

        The plaintext is stored nowhere, so each driver process sets it anew. Only a SCRAM
        verifier computed here by libpq is sent, so the server log/WAL never see plaintext.
        Cached per instance: workers started from this process keep a valid password.
        """
        if self._creds is not None:
            return self._creds
        password = os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(24)
        self._ensure_role()

        def set_password(conn: psycopg.Connection) -> None:
            verifier = conn.pgconn.encrypt_password(
                password.encode(), self.role.encode(), b"scram-sha-256"
            ).decode()
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(self.role), sql.Literal(verifier)
                )
            )

        self._run_admin(f"setting the password of role {self.role!r}", set_password)
        self._creds = Credentials(self.host, self.port, self.role, password)
        return self._creds

    def status(self) -> dict[str, Any]:
        """What ``gridsearch db status`` shows; works (running=False) when the server is down."""
        running = self.is_running()
        out: dict[str, Any] = {
            "managed": True,
            "running": running,
            "host": self.host,
            "port": self.port if (running or self.initialized()) else self.requested_port,
            "pid": self.pid() if running else None,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "socket_dir": str(self.socket_dir),
            "databases": [],
            "connections": 0,
        }
        if running:
            out.update(self._live_status())
        return out


# --------------------------------------------------------------------------- lifecycle helper


@contextlib.contextmanager
def running(server: ManagedServer, keep: bool = False) -> Iterator[ManagedServer]:
    """Start ``server`` if needed and stop it on any exit unless ``keep`` or it was already up.

    SIGTERM/SIGHUP are turned into SystemExit (SIGINT already raises KeyboardInterrupt) so
    that the ``finally`` runs when a scheduler or a user kills the driver.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Decided before start(): a signal during start() must still lead to a stop.
    was_running = server.is_running()
    try:
        server.start()
        yield server
    finally:
        try:
            if not (keep or was_running):
                server.stop()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
