"""A PostgreSQL server gridsearch owns (initdb/pg_ctl/pg_isready); ``users.running()`` scopes it.

The plaintext password is never stored anywhere. Each driver process (re)sets it over the server's
private unix socket (peer auth, no password needed there) and sends only a SCRAM verifier computed
client-side, so neither the wire, the server log nor WAL ever sees the plaintext."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from gridsearch.core.errors import first_line
from gridsearch.core.files import atomic_write
from gridsearch.core.waiting import wait_until
from gridsearch.postgres import conf, osuser, owner
from gridsearch.postgres.client import (
    DEFAULT_ROLE,
    PASSWORD_ENV,
    Credentials,
    PostgresError,
    hostport,
    sqlalchemy_url,
)
from gridsearch.postgres.host import WILDCARD_HOSTS, choose_port, find_binaries, free_port
from gridsearch.postgres.server import PostgresServer

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_READY_POLL = 0.2  # seconds between pg_isready probes while a found postmaster starts up


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
        return socket.gethostname() if first in WILDCARD_HOSTS else first

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
        """Who runs initdb/pg_ctl (see :func:`osuser.server_os_user`)."""
        return osuser.server_os_user(self.data_dir)

    @property
    def superuser(self) -> str:
        """initdb's bootstrap superuser: named after the OS user that runs the server."""
        return self.os_user

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def _pidfile(self) -> dict[str, str] | None:
        try:
            return conf.parse_pidfile((self.data_dir / "postmaster.pid").read_text())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None

    def _live_socket_dir(self, info: dict[str, str] | None) -> str:
        """The socket dir the running postmaster announced (a moved root keeps its old one)."""
        return (info or {}).get("socket_dir") or str(self.socket_dir)

    def pid(self) -> int | None:
        """Postmaster pid if one of this data dir runs on this host (a recycled pid is not one)."""
        info = self._pidfile()
        if not info or not info.get("pid", "").lstrip("-").isdigit():
            return None
        pid = abs(int(info["pid"]))
        return pid if owner.is_postmaster(pid, self.data_dir) else None

    def _configured_port(self) -> int | None:
        try:
            return conf.configured_port((self.data_dir / conf.SETTINGS_FILE).read_text())
        except OSError:
            return None

    def is_running(self) -> bool:
        """postmaster.pid present and pg_isready accepts on our socket."""
        info = self._pidfile()
        if info is None or self.pid() is None:
            return False
        return self._isready(self._live_socket_dir(info), int(info.get("port") or 0))

    def _isready(self, socket_dir: str, port: int) -> bool:
        """pg_isready on the socket, as the superuser so no rejected login clutters the log."""
        argv = [str(self.bindir / "pg_isready"), "-q", "-h", socket_dir, "-p", str(port),
                "-U", self.superuser, "-d", "postgres", "-t", "5"]
        res = subprocess.run(argv, env=osuser.child_env(), capture_output=True, check=False)
        return res.returncode == 0

    # ---- files and commands as the server's OS user

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                osuser.as_user(self.os_user, argv),
                env=osuser.child_env(),
                cwd="/",
                capture_output=True,
                text=True,
                check=False,
                timeout=self.timeout + 30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{what} in {self.data_dir}: {first_line(exc)}") from None

    def _write_private(self, path: Path, text: str) -> None:
        """Whole or not at all (a reload must never read half a pg_hba.conf), 0600, the server's."""
        user = self.os_user

        def write(tmp: Path) -> None:
            tmp.write_text(text)
            osuser.chown_to(tmp, user)

        atomic_write(path, write, mode=0o600)

    def _write_config(self, port: int) -> None:
        """Settings, pg_hba.conf (no trust over TCP) and pg_ident.conf, as of this start."""
        files = {
            conf.SETTINGS_FILE: conf.render_settings(
                port=port,
                listen_addresses=self.listen_addresses,
                socket_dir=str(self.socket_dir),
                max_connections=self.max_connections,
            ),
            "pg_hba.conf": conf.render_hba(self.superuser),
            "pg_ident.conf": conf.render_ident(self.superuser, [self.os_user, osuser.current_os_user()]),
        }
        for name, text in files.items():
            self._write_private(self.data_dir / name, text)

    # ---- lifecycle

    def init(self) -> bool:
        """initdb with peer auth on the socket and scram-sha-256 over TCP; False if already done.

        initdb writes PG_VERSION first and the catalogs last: a driver killed in between would leave
        a data dir that looks initialised and never starts. So the cluster is made beside it, in
        ``root/data.initdb`` (a killed attempt's is thrown away), and renamed into place complete."""
        if self.initialized():
            return False
        user = self.os_user  # decided before the data dir exists: the server user, as root
        osuser.ensure_os_user(user)
        osuser.private_dir(self.root, user)
        osuser.check_traversable(user, self.root)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PostgresError(f"{self.data_dir} exists, is not empty and holds no PostgreSQL cluster")
        staging = self.root / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        argv = [str(self.bindir / "initdb"), "-D", str(staging), "-U", self.superuser,
                "--auth-local=peer", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                "--no-instructions"]
        res = self._run(argv, "initdb")
        if res.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            reason = conf.initdb_failure_reason(res.stdout, res.stderr)
            raise PostgresError(f"initdb failed in {self.data_dir}: {reason}")
        main_conf = staging / "postgresql.conf"
        self._write_private(main_conf, main_conf.read_text() + conf.INCLUDE_SETTINGS)
        os.replace(staging, self.data_dir)  # an empty data dir is replaced; a full one refused above
        return True

    def start(self, *, on_demand: bool = False) -> bool:
        """Start if needed; True only if this call started it. ``on_demand``: its last user stops
        it (see users.running); False keeps it up, and keeps up a server found running.

        Raises ServedElsewhere, before anything is touched, when another host runs it."""
        rec = owner.check(self.root, self.data_dir)
        # A postmaster that is alive but not accepting yet is starting up: wait for it.
        if self.is_running() or (self.pid() is not None and self._wait_ready()):
            self._create_role(self.role)
            if rec is None:  # its starter died before recording it: on demand if it meant so
                self._record(on_demand=on_demand and owner.intended_on_demand(self.root, self._started()))
            elif rec.on_demand and not on_demand:
                self._record(on_demand=False)
            owner.forget_intent(self.root)
            return False
        port = self._port = choose_port(
            self.listen_addresses, self.requested_port, self._configured_port(), self.host
        )
        self.init()
        osuser.private_dir(self.socket_dir, self.os_user)
        self._write_config(port)
        argv = [str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(self.timeout),
                "-D", str(self.data_dir), "-l", str(self.log_file)]
        owner.intend(self.root, on_demand, self.timeout + 30.0)
        res = self._run(argv, "pg_ctl start")
        if res.returncode != 0 or not self._isready(str(self.socket_dir), port):
            raise PostgresError(
                f"PostgreSQL in {self.data_dir} failed to start on {hostport(self.host, port)}: "
                f"{self._log_reason(res.stderr)} (log: {self.log_file})"
            )
        self._create_role(self.role)
        self._record(on_demand)
        owner.forget_intent(self.root)
        return True

    def _started(self) -> float | None:
        """When the running postmaster started (postmaster.pid's third line, epoch seconds)."""
        start = (self._pidfile() or {}).get("start", "")
        return float(start) if start.isdigit() else None

    def _record(self, on_demand: bool) -> None:
        """The owner record, once the server answers (a server found without one is kept up,
        unless its starter's intent says it was started on demand)."""
        pid = self.pid()
        if pid is not None:
            owner.record(self.root, self.host, self.port, pid, on_demand)

    def on_demand(self, default: bool) -> bool:
        """Whether this host's running server is only up for its users (``default``: no record)."""
        rec = owner.read(self.root)
        return default if rec is None else rec.here() and rec.on_demand

    def _wait_ready(self) -> bool:
        """Poll pg_isready while a postmaster we found is starting; never assume readiness."""
        ready = wait_until(self.is_running, self.timeout, _READY_POLL, while_=lambda: self.pid() is not None)
        return bool(ready)

    def _log_reason(self, fallback: str) -> str:
        """Why a start failed, from the server log (its FATAL line, or the bind error)."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return conf.start_failure_reason(lines, fallback)

    def stop(self) -> bool:
        """pg_ctl stop -m fast; True if a server was running and is now down. Another host's
        server is not "not running": ServedElsewhere says who runs it and where to stop it."""
        gone = owner.elsewhere(self.root, self.data_dir)
        if gone is not None:
            rec = gone.owner
            how = f"scancel {rec.job}" if rec.job else f"`gridsearch db stop` on {rec.host}"
            raise owner.ServedElsewhere(f"{gone}; stop it there ({how})", rec, gone.reachable)
        if self.pid() is None:
            owner.clear(self.root)
            return False
        argv = [str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", str(self.timeout),
                "-D", str(self.data_dir)]
        res = self._run(argv, "pg_ctl stop")
        if res.returncode != 0 and self.pid() is not None:
            raise PostgresError(
                f"pg_ctl stop failed for {self.data_dir} ({hostport(self.host, self.port)}): "
                f"{first_line(res.stderr or res.stdout)}"
            )
        self._creds = None
        owner.clear(self.root)
        return True

    # ---- connections and credentials

    def socket_url(self, dbname: str) -> tuple[str, dict[str, Any]]:
        """SQLAlchemy URL + connect_args for the superuser over the private unix socket.

        Read-only views (status, results, plot) use it: they must not reset the role's password
        under a running sweep's workers, and need none on this machine. The session acts as the
        sweep's role: what a view creates in a new ledger (optuna's tables, ours) stays the sweep's."""
        sock = self._live_socket_dir(self._pidfile())
        url = sqlalchemy_url(Credentials("", self.port, self.superuser), dbname)
        return url, {"connect_args": {"host": sock, "port": self.port, "options": f"-c role={self.role}"}}

    def _admin(self, dbname: str | None = None) -> psycopg.Connection:
        """Superuser session over the private unix socket (peer auth: no password involved)."""
        sock = self._live_socket_dir(self._pidfile())
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
                f"cannot connect to managed PostgreSQL ({hostport(self.host, self.port)}, socket {sock}): "
                f"{first_line(exc)}"
            ) from None

    def _db_owner(self) -> str | None:
        return self.role

    def credentials(self) -> Credentials:
        """Set the role's password (ULTRACK_DB_PW, else a fresh random one) and return it.

        The plaintext is stored nowhere, so each driver process sets it anew. Cached per instance:
        workers started from this process keep a valid password.
        """
        if self._creds is not None:
            return self._creds
        password = os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(24)
        self._create_role(self.role)
        self._set_password(self.role, password)
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
        elif (gone := owner.elsewhere(self.root, self.data_dir)) is not None:
            rec = gone.owner  # another host's: say whose, never "stopped"
            out.update(running=gone.reachable, host=rec.address, port=rec.port, pid=rec.pid,
                       owner=str(gone))
        return out

