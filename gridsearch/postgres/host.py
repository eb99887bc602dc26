"""What this machine offers a managed server: the PostgreSQL binaries and a free TCP port."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path

from gridsearch.postgres.client import PostgresError, hostport

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, pg_isready) not found on PATH or in "
    "/usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql`"
)
REQUIRED_BINARIES = ("initdb", "pg_ctl", "pg_isready", "postgres")
WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", ""})


def _complete(d: Path) -> bool:
    """Debian's pg_wrapper symlinks on PATH pick a cluster by config, not a data dir: not usable."""
    return all(
        (d / b).is_file() and os.access(d / b, os.X_OK) and (d / b).resolve().name != "pg_wrapper"
        for b in REQUIRED_BINARIES
    )


def _version(d: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)


def find_binaries(bindir: str | Path | None = None) -> Path:
    """Directory holding initdb/pg_ctl/pg_isready: PATH first, then the highest Debian version."""
    if bindir is not None:
        d = Path(bindir)
        if _complete(d):
            return d
        raise PostgresError(f"{d} does not hold {', '.join(REQUIRED_BINARIES)}; {INSTALL_HINT}")
    on_path = shutil.which("initdb")
    if on_path and _complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True):
        if _complete(d):
            return d
    raise PostgresError(INSTALL_HINT)


def port_is_free(host: str, port: int) -> bool:
    """Whether the server could bind host:port (same SO_REUSEADDR semantics as postgres)."""
    bind_hosts = ["0.0.0.0"] if host in WILDCARD_HOSTS else [h.strip() for h in host.split(",")]
    for h in bind_hosts:
        family = socket.AF_INET6 if ":" in h else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((h, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise PostgresError(f"cannot bind {hostport(h, port)}: {exc.strerror}") from None
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (tiny race with other starters; start() re-checks)."""
    h = "0.0.0.0" if host in WILDCARD_HOSTS else host.split(",")[0].strip()
    family = socket.AF_INET6 if ":" in h else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((h, 0))
        return int(s.getsockname()[1])


def choose_port(listen_addresses: str, requested: int | None, last: int | None, host: str) -> int:
    """The requested port, else the last start's if still free (addresses stay valid), else a fresh one.

    ``host`` is only for the message: the address clients were told to use."""
    port = requested or last
    if port is None or (requested is None and not port_is_free(listen_addresses, port)):
        port = free_port(listen_addresses)
    if not port_is_free(listen_addresses, port):
        raise PostgresError(
            f"cannot start PostgreSQL on {hostport(host, port)}: port {port} is already in use"
        )
    return port
