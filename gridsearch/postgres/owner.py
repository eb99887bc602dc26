"""Who runs a managed server, recorded under its root so that no host starts a second postmaster on a
data directory another host serves.

PostgreSQL decides whether ``postmaster.pid`` is stale with a local ``kill(pid, 0)``: on a shared
filesystem, a lock file written on another node looks stale, and a second postmaster would start on
live files (and, stopping, take ``postmaster.pid`` with it). So a ready server writes ``owner.json``
(host, address, port, pid, SLURM job, start time), removed when it stops; before any start the
record is probed: on this host by pid, on another host by a TCP connect to the address it serves."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gridsearch.core.files import atomic_write
from gridsearch.postgres.client import PostgresError, hostport

OWNER_FILE = "owner.json"
STARTING_FILE = "starting.json"
# A live postmaster re-reads postmaster.pid every minute and shuts down once it is gone or not its
# own: a record whose postmaster.pid vanished longer ago than this names no running server.
FRESH_S = 120.0
PROBE_TIMEOUT_S = 3.0
_LOOPBACK = ("127.", "::1", "localhost")
_POSTMASTER_NAMES = frozenset({"postgres", "postmaster"})


@dataclass(frozen=True)
class Owner:
    """A running managed server: who (host, pid, SLURM job), where (address, port), since when."""

    host: str  # the machine the postmaster runs on
    address: str  # where clients connect (loopback: from that machine only)
    port: int
    pid: int
    started: str
    job: str | None = None
    on_demand: bool = False  # started for a sweep or a view: its last user stops it

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        where = hostport(self.address, self.port)
        return f"pid {self.pid} on {self.host}{job}, {where}, since {self.started}"

    def here(self) -> bool:
        return self.host == this_host()

    def loopback(self) -> bool:
        return self.address.startswith(_LOOPBACK)


class ServedElsewhere(PostgresError):
    """Another host runs the server on these files: use it over TCP if it answers, never start one."""

    def __init__(self, message: str, owner: Owner, reachable: bool) -> None:
        super().__init__(message)
        self.owner = owner
        self.reachable = reachable


def this_host() -> str:
    return socket.gethostname()


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def path(root: Path) -> Path:
    return root / OWNER_FILE


def read(root: Path) -> Owner | None:
    """The record, or None when absent or unreadable (a half-written one cannot exist: atomic)."""
    try:
        return Owner(**json.loads(path(root).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write(root: Path, owner: Owner) -> None:
    atomic_write(path(root), json.dumps(asdict(owner)) + "\n", mode=0o644)


def clear(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path(root).unlink()


def is_postmaster(pid: int, data_dir: Path) -> bool:
    """``pid`` is a live postgres serving ``data_dir`` (a recycled pid is not); unreadable: assume so."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except psutil.AccessDenied:
        return True  # alive, owned by someone we may not inspect: never take it for dead
    except psutil.Error:
        return False
    if not cmdline or Path(cmdline[0]).name not in _POSTMASTER_NAMES:
        return False
    if str(data_dir) in cmdline:
        return True
    try:
        return Path(proc.cwd()).resolve() == data_dir.resolve()  # postmasters chdir to PGDATA
    except psutil.AccessDenied:
        return True
    except (psutil.Error, OSError):
        return False


def answers(address: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Something accepts TCP connections at address:port."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _fresh(root: Path, data_dir: Path) -> bool:
    """The files still say a server runs: postmaster.pid is there, or the record is recent."""
    if (data_dir / "postmaster.pid").exists():
        return True
    try:
        return time.time() - path(root).stat().st_mtime < FRESH_S
    except OSError:
        return False


def check(root: Path, data_dir: Path) -> Owner | None:
    """The live owner on this host (None: no record, or a stale one, now removed); raise
    ServedElsewhere when another host runs the server, or may and cannot be asked."""
    rec = read(root)
    if rec is None:
        return None
    if rec.here():
        if is_postmaster(rec.pid, data_dir):
            return rec
    elif not rec.loopback() and answers(rec.address, rec.port):
        raise ServedElsewhere(f"PostgreSQL on {data_dir} is run by {rec.describe()}, not by this host "
                              f"({this_host()})", rec, reachable=True)
    elif _fresh(root, data_dir):
        why = (f"it listens on {rec.address} only, so run this on {rec.host}" if rec.loopback() else
               f"{hostport(rec.address, rec.port)} does not answer from {this_host()}")
        raise ServedElsewhere(
            f"PostgreSQL on {data_dir} is run by {rec.describe()}: {why}; not starting a second server "
            f"on its files (if {rec.host} is really down, check and remove {path(root)})",
            rec, reachable=False)
    clear(root)
    return None


def elsewhere(root: Path, data_dir: Path) -> ServedElsewhere | None:
    """What :func:`check` would raise, for those that only report it (status)."""
    try:
        check(root, data_dir)
    except ServedElsewhere as exc:
        return exc
    return None


def record(root: Path, address: str, port: int, pid: int, on_demand: bool) -> Owner:
    """Written once the server is ready; the SLURM job id names who to scancel."""
    owner = Owner(this_host(), address, port, pid, now(), os.environ.get("SLURM_JOB_ID"), on_demand)
    write(root, owner)
    return owner


def intend(root: Path, on_demand: bool, timeout: float) -> None:
    """Before ``pg_ctl start``: whether the server about to start is on demand. A starter killed
    after the postmaster came up but before its record was written leaves this behind, so the
    next user knows a sweep's server from one someone keeps up, and the last user still stops it."""
    text = json.dumps({"host": this_host(), "on_demand": on_demand, "at": time.time(), "within": timeout})
    atomic_write(root / STARTING_FILE, text + "\n", mode=0o644)


def forget_intent(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / STARTING_FILE).unlink()


def intended_on_demand(root: Path, postmaster_start: float | None) -> bool:
    """A server found running without a record: on demand only if an intent of this host says so
    and that start launched this very postmaster (it started within the start's time limit)."""
    try:
        intent = json.loads((root / STARTING_FILE).read_text())
        at, within = float(intent["at"]), float(intent["within"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    launched = postmaster_start is not None and at - 1.0 <= postmaster_start <= at + within
    return intent.get("host") == this_host() and launched and intent.get("on_demand") is True
