"""The sweep's working directory: its layout and the lock that keeps two drivers off one sweep."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gridsearch.core.errors import BadInput


class Busy(BadInput):
    """Another driver holds the sweep: refused, like bad input, before anything is touched."""


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
        return self.root / ".lock"

    @property
    def pgpass(self) -> Path:
        """libpq's password file for jobs on other nodes (0600 in a 0700 directory), never their
        environment, which the scheduler saves."""
        return self.root / "secrets" / "pgpass"

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
        server, which leaves neither in the workdir, the lock every sweep takes."""
        return self.state_db.exists() or (self.root / "postgres").exists() or self.lock_path.exists()

    def holder(self) -> int | None:
        """PID of the driver holding the lock, or None (the lock dies with its process)."""
        if not self.lock_path.exists():
            return None
        with open(self.lock_path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.pread(fd, 32, 0).decode().strip()
                raise Busy(f"{self.root}: another sweep is running on this workdir (pid {pid})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)
