"""PostgreSQL for a sweep: a managed server (initdb/pg_ctl/pg_isready) or an external one.

- ``client``: credentials, one-line errors, connecting, SQLAlchemy URLs and ultrack addresses.
- ``host``: what this machine offers: the server binaries and free TCP ports.
- ``conf``: pure renderers and parsers of the server's files and output (no I/O).
- ``osuser``: running the server as an unprivileged OS user when gridsearch runs as root.
- ``server``: admin SQL every server shares (databases, roles) and ``ExternalServer``.
- ``managed``: ``ManagedServer``'s lifecycle.
- ``owner``: who runs a managed server (host, pid, port, SLURM job): no second postmaster elsewhere.
- ``users``: who uses it (sweeps, views) and ``running()``, which scopes it to a block.
- ``advisory``: the driver's advisory lock on its sweep's database: one driver per sweep database.
"""

from __future__ import annotations

from gridsearch.postgres.client import (
    DEFAULT_ROLE,
    PASSWORD_ENV,
    Credentials,
    PostgresError,
    connect,
    engine,
    hostport,
    libpq_env,
    sqlalchemy_url,
    ultrack_address,
)
from gridsearch.postgres.host import INSTALL_HINT, find_binaries, free_port, port_is_free
from gridsearch.postgres.managed import ManagedServer
from gridsearch.postgres.osuser import FALLBACK_OS_USER
from gridsearch.postgres.owner import Owner, ServedElsewhere
from gridsearch.postgres.server import DatabaseInUse, ExternalServer, PostgresServer
from gridsearch.postgres.users import running

__all__ = [
    "DEFAULT_ROLE",
    "FALLBACK_OS_USER",
    "INSTALL_HINT",
    "PASSWORD_ENV",
    "Credentials",
    "DatabaseInUse",
    "ExternalServer",
    "ManagedServer",
    "Owner",
    "PostgresError",
    "PostgresServer",
    "ServedElsewhere",
    "connect",
    "engine",
    "find_binaries",
    "free_port",
    "hostport",
    "libpq_env",
    "port_is_free",
    "running",
    "sqlalchemy_url",
    "ultrack_address",
]
