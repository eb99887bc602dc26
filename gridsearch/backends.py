"""Where the sweep's state and ultrack's databases live: SQLite files, or a PostgreSQL server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gridsearch.spec import Sweep
from gridsearch.ultrackdb import UltrackDB
from gridsearch.workspace import Workspace


@dataclass
class Backend:
    ledger_url: str
    engine_kwargs: dict[str, Any]
    ws: Workspace
    kind: str = "sqlite"
    env: dict[str, str] = field(default_factory=dict, repr=False)  # for worker processes (libpq)
    address_of: Any = None  # dbname -> user@host:port/dbname (PostgreSQL)
    server: Any = None  # gridsearch.postgres.PostgresServer
    state_db: str = ""

    def ultrack_db(self, name: str) -> UltrackDB:
        if self.kind == "sqlite":
            return UltrackDB(name, self.ws.db_dir(name))
        return UltrackDB(
            name, self.ws.db_dir(name), "postgresql", self.address_of(name), dict(self.env)
        )


@contextlib.contextmanager
def open_backend(sweep: Sweep, ws: Workspace, read_only: bool = False) -> Iterator[Backend]:
    """read_only: for views (status, results) that must not start a sweep's resources for long."""
    if sweep.database.kind == "sqlite":
        yield Backend(f"sqlite:///{ws.state_db}", {}, ws)
        return
    from gridsearch.pgbackend import open_postgres

    with open_postgres(sweep, ws, read_only=read_only) as be:
        yield be
