"""The sweep's working directory: its layout and the lock that keeps two drivers off one sweep."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from gridsearch.core import lease
from gridsearch.core.errors import Busy, ignore
from gridsearch.core.lease import Holder, Lease

__all__ = ["Busy", "Holder", "Lease", "Workspace"]

# What older gridsearch versions locked with flock, never removed: it marks a workdir they ran in.
LEGACY_LOCK = ".lock"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock_path(self) -> Path:
        """The driver's lock (core/lease.py): present only while a driver holds it."""
        return self.root / "driver.lock"

    @property
    def pg_schema(self) -> Path:
        """On an existing PostgreSQL server: the schema of the user's database that holds this
        sweep, recorded at its first sweep (the workdir may later be reached by another path)."""
        return self.root / "pg-schema"

    @property
    def pgpass(self) -> Path:
        """libpq's password file for jobs on other nodes (0600 in a 0700 directory), never their
        environment, which the scheduler saves."""
        return self.root / "secrets" / "pgpass"

    @property
    def driver_pgpass(self) -> Path:
        """The password a `sweep --submit` was given, for its driver jobs (same rules as pgpass)."""
        return self.root / "secrets" / "driver-pgpass"

    @property
    def cancel_request(self) -> Path:
        """Written by `gridsearch cancel`: a file on the shared filesystem reaches a driver on any
        node, and needs no database password to write."""
        return self.root / "cancel.requested"

    def trial_dir(self, key: str) -> Path:
        return self.root / "trials" / key

    def db_dir(self, name: str) -> Path:
        return self.root / "db" / name

    def exists(self) -> bool:
        """A sweep ran here: its state (SQLite file, managed server) or, on an existing PostgreSQL
        server, which leaves neither in the workdir, its schema's record (or an older version's lock)."""
        return any(p.exists() for p in (self.state_db, self.root / "postgres", self.pg_schema,
                                        self.root / LEGACY_LOCK))

    def legacy(self) -> bool:
        """An older gridsearch ran a sweep here (its lock file stays), before schemas were recorded."""
        return (self.root / LEGACY_LOCK).exists() and not self.pg_schema.exists()

    def holder(self) -> Holder | None:
        """The driver holding the lock (host, pid), or None."""
        return lease.holder(self.lock_path)

    def lock(self, notify: Callable[[str], None] = ignore) -> AbstractContextManager[Lease]:
        """Held by the driver for the whole sweep; a second driver, from any node, gets Busy."""
        self.root.mkdir(parents=True, exist_ok=True)
        return lease.held(self.lock_path, f"{self.root}: another sweep is running on this workdir", notify)
