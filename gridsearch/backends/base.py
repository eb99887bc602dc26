"""The Backend type: where a sweep's ledger and ultrack's databases live, and how workers reach them.

A leaf of the backends package: executors and the engine depend on this type only, never on which
kind of server is behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gridsearch.ultrackdb import UltrackDB
from gridsearch.workspace import Workspace


@dataclass
class Backend:
    """Connection facts for one sweep. ``env`` (libpq settings, the password among them) goes to
    worker processes through their environment only: never argv, a file or a log."""

    ws: Workspace
    ledger_url: str  # how the driver opens the ledger
    engine_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    worker_ledger_url: str = ""  # how workers open it: no password in it
    env: dict[str, str] = field(default_factory=dict, repr=False)
    parallel_writers: bool = False  # can several batch processes write at once (not SQLite)
    stable_password: bool = True  # can jobs queued by an earlier driver still log in

    def __post_init__(self) -> None:
        self.worker_ledger_url = self.worker_ledger_url or self.ledger_url

    def ultrack_db(self, name: str) -> UltrackDB:
        """The ultrack database ``name`` (the ledger's key for it), created if needed."""
        return UltrackDB(name, self.ws.db_dir(name))

    def archive_ledger(self) -> str | None:
        """--restart: keep the old ledger under a new name; None when the workspace archive
        already holds it (SQLite's state.db is a file in the workdir)."""
        return None
