"""The Backend type: where a sweep's ledger and ultrack's databases live, and how workers reach them.

A leaf of the backends package: executors and the engine depend on this type only, never on which
kind of server is behind it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gridsearch.core.errors import GridsearchError
from gridsearch.ultrackdb import UltrackDB
from gridsearch.workspace import Workspace

if TYPE_CHECKING:
    import sqlalchemy as sa

MAIN = "main"  # engine.MAIN_DB: the database trials run in; never a fork, never dropped here
# Forks are named f<number>: a fixed pattern lets forks() find them among the server's databases
# (and a workdir's db dirs) without ever taking another sweep's database, or main, for one.
FORK_NAME = re.compile(r"f[0-9]+")
_FORKING = ".forking"  # suffix of a fork's working dir while it is being copied
_SQLITE_FILE = "data.db"  # UltrackDB.data_section's database_file_name
# A fork is planned at twice its source's size: the copy, plus what the branch's own stages then
# write into it (links, solutions) and, on PostgreSQL 15, the WAL that CREATE DATABASE writes for
# the copy until the next checkpoint. A margin in proportion to what we write, unlike a fraction
# of the free space, which is nothing on a small disk and terabytes on a shared filesystem.
ROOM_FACTOR = 2


class ForkError(GridsearchError):
    """A fork or drop refused or failed: one line naming the database."""


def check_fork_name(name: str) -> None:
    """Only f<number> is forked or dropped: main, the ledger's database and other sweeps' stay out
    of reach whatever a caller passes."""
    if not FORK_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a fork's name (f<number>)")


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes of the filesystem ``path`` is (or will be) on, and the existing path measured."""
    p = path
    while True:
        try:
            return shutil.disk_usage(p).free, p
        except (FileNotFoundError, PermissionError):
            if p.parent == p:
                raise
            p = p.parent


def room(src: str, size: int, free: int, where: Path | str, wanted: int) -> tuple[int, str]:
    """How many forks of ``size`` bytes fit in ``free`` bytes, ROOM_FACTOR each; why not ``wanted``."""
    per = ROOM_FACTOR * size
    n = wanted if per == 0 else max(0, min(wanted, free // per))
    if n >= wanted:
        return wanted, ""
    return n, (f"room for {n} of {wanted} copies of database {src} ({_mb(size)} each, planned at "
               f"{ROOM_FACTOR}x): {_mb(free)} free at {where}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def copy_working_dir(src: Path, dst: Path, sqlite_file: str | None = None) -> None:
    """Copy a database's working dir (metadata.toml; data.db for SQLite, through sqlite3's backup
    API, which copies a consistent database: a journal a crashed writer left is rolled back first,
    as any reader of the source would) beside ``dst``, then rename
    it into place: a crash leaves a hidden ``.<name>.forking`` dir, never a half fork under its
    name. ``dst`` must not exist."""
    tmp = forking_dir(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if sqlite_file and f.name.startswith(sqlite_file):
            continue  # the database, and its -journal/-wal, go through the backup API
        if f.is_dir():
            shutil.copytree(f, tmp / f.name)
        elif f.is_file():
            shutil.copy2(f, tmp / f.name)
    if sqlite_file:
        with contextlib.closing(sqlite3.connect(src / sqlite_file)) as a, \
                contextlib.closing(sqlite3.connect(tmp / sqlite_file)) as b:
            a.backup(b)
    os.rename(tmp, dst)


def forking_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}{_FORKING}")


def remove_working_dir(path: Path) -> None:
    """The dir and a half copy a crashed fork left beside it."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(forking_dir(path), ignore_errors=True)
    if path.exists():
        raise ForkError(f"cannot remove {path}")


def fork_dirs(ws: Workspace) -> set[str]:
    """Forks with a working dir in the workdir, finished or half copied."""
    root = ws.db_dir(MAIN).parent
    if not root.is_dir():
        return set()
    names = {p.name.removeprefix(".").removesuffix(_FORKING) for p in root.iterdir() if p.is_dir()}
    return {n for n in names if FORK_NAME.fullmatch(n)}


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

    # ---- forks: a copy of an ultrack database per branch of a sweep -----------------------------
    # The caller guarantees that nothing writes to (PostgreSQL: nothing is connected to) the source
    # while it is copied, and records the fork in the ledger (Ledger.fork_state) only after fork()
    # returned: a fork without a ledger row is an orphan, dropped, never trusted.

    @property
    def can_fork(self) -> bool:
        """SQLite: a database is a file in the workdir, copied like one."""
        return True

    def fork(self, src: str, dst: str) -> UltrackDB:
        """Copy database ``src`` (data.db + metadata.toml) to fork ``dst``, replacing any ``dst`` a
        crash left."""
        check_fork_name(dst)
        src_dir = self.ws.db_dir(src)
        if not (src_dir / _SQLITE_FILE).is_file():
            raise ForkError(f"cannot fork database {src}: {src_dir / _SQLITE_FILE} does not exist")
        self.drop(dst)
        try:
            copy_working_dir(src_dir, self.ws.db_dir(dst), _SQLITE_FILE)
        except (OSError, sqlite3.Error) as exc:
            raise ForkError(f"copying database {src} to {dst} in {src_dir.parent}: {exc}") from None
        return self.ultrack_db(dst)

    def drop(self, name: str) -> None:
        """Remove fork ``name`` (nothing if it does not exist); main and non-fork names are refused."""
        check_fork_name(name)
        remove_working_dir(self.ws.db_dir(name))

    def fork_room(self, src: str, wanted: int) -> tuple[int, str]:
        """Forks of ``src`` the workdir's filesystem has room for (0..wanted), and why not more."""
        size = dir_size(self.ws.db_dir(src))
        free, where = free_bytes(self.ws.db_dir(src).parent)
        return room(src, size, free, where, wanted)

    def forks(self) -> list[str]:
        """Forks that exist in the workdir (a half copy included): the scheduler drops those the
        ledger does not know."""
        return sorted(fork_dirs(self.ws), key=_fork_number)

    def database_sizes(self, names: Iterable[str], ledger: sa.Engine) -> dict[str, int]:
        """Bytes on disk of each named ultrack database that exists (`ledger`: an engine on the
        sweep's ledger, for servers): what `plan` multiplies by the databases alive at once.
        SQLite: the working dir, data.db with it, as fork_room measures a source."""
        return {n: dir_size(self.ws.db_dir(n)) for n in names if (self.ws.db_dir(n) / _SQLITE_FILE).is_file()}


def _fork_number(name: str) -> int:
    return int(name[1:])
