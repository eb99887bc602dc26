"""A lock file that holds across the nodes of a shared filesystem, without flock.

flock cannot be trusted there: Lustre mounted ``noflock`` fails it with ENOSYS, ``localflock`` makes
it node-local (a driver on another node never sees it), NFS without lockd loses it. This lock is
filelock's ``SoftFileLease``: the file is created with O_EXCL (atomic on NFSv3+, Lustre, GPFS), records
the holder's host, pid and process start time, and a thread touches it every ``lease/6`` seconds.

What decides that a holder is gone:
- on the same host (and PID namespace): its pid is dead, or now names a process started later: the
  lock is taken over at once;
- on another host: the file stayed unchanged (no heartbeat) for a whole lease, as watched by the
  contender's own monotonic clock, so the nodes' clocks need not agree. A contender waits for that
  only when the heartbeat already looks stopped; a holder whose heartbeat runs refuses it at once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import LeaseCompromise, LeaseSettingsMismatch, SoftFileLease, Timeout
from filelock._identity import host_name, owner_is_stale  # the same rule the lease itself applies

from gridsearch.core.errors import Busy, GridsearchError, ignore

LEASE_ENV = "GRIDSEARCH_LOCK_LEASE_S"  # every contender must use the same value (tests shorten it)
DEFAULT_LEASE_S = 60.0
_REFUSE_S = 0.5  # a live holder: refused after one look (and a dead one on this host taken over)
_UNREADABLE_S = 3.0  # a marker still being written reads as malformed for up to 2 s
_PID_NAMESPACE = "?pidns-"  # filelock's suffix for a holder inside a PID namespace


def lease_seconds() -> float:
    try:
        value = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))
    except ValueError:
        return DEFAULT_LEASE_S
    return value if value > 0 else DEFAULT_LEASE_S


@dataclass(frozen=True)
class Holder:
    """Who holds a lock file, and how long ago its heartbeat last touched it (by this host's clock)."""

    host: str
    pid: int
    heartbeat_age: float
    here: bool  # on this host and PID namespace: its pid was checked alive

    def silent(self, lease: float) -> bool:
        """Its heartbeat looks stopped: several refreshes missed."""
        return not self.here and self.heartbeat_age > lease / 2

    def describe(self) -> str:
        late = f", no heartbeat for {self.heartbeat_age:.0f} s" if self.silent(lease_seconds()) else ""
        return f"pid {self.pid} on {self.host}{late}"


def holder(path: Path) -> Holder | None:
    """The holder of the lock at ``path``; None when free, unreadable, or held by a dead process of
    this host (the next acquire takes it over)."""
    owner = SoftFileLease(str(path), lease_duration=lease_seconds()).owner
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    if owner is None:
        return None
    here = owner.hostname == host_name()
    if here and owner_is_stale(owner.pid, owner.hostname, owner.start):
        return None
    return Holder(owner.hostname.split(_PID_NAMESPACE)[0], owner.pid, max(age, 0.0), here)


class Lease:
    """One hold of the lock file at ``path`` (see the module's docstring for its rules)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.duration = lease_seconds()
        self.lost: str | None = None  # why the hold was lost (set by the heartbeat thread)
        self._lock = self._new_lock()

    def _new_lock(self) -> SoftFileLease:
        return SoftFileLease(str(self.path), lease_duration=self.duration,
                             heartbeat_interval=self.duration / 6, on_compromise=self._on_lost)

    def _on_lost(self, compromise: LeaseCompromise) -> None:
        self.lost = compromise.reason

    def acquire(self, what: str, notify: Callable[[str], None] = ignore) -> None:
        """Take the lock, or raise Busy naming its holder."""
        h = holder(self.path)
        wait = _UNREADABLE_S if h is None else _REFUSE_S
        if h is not None and h.silent(self.duration):
            wait = self.duration + 2.0
            notify(f"{what}: the lock's holder, {h.describe()}, looks gone; it is taken over if "
                   f"its lock file stays untouched for {self.duration:.0f} s")
        try:
            self._lock.acquire(timeout=wait, poll_interval=min(0.25, wait / 4))
        except (Timeout, LeaseSettingsMismatch):
            raise Busy(f"{what}{self._who()}") from None

    def _who(self) -> str:
        now = holder(self.path)
        if now is None:
            return f" (lock file {self.path})"
        if now.here:
            return f" ({now.describe()}, lock file {self.path})"
        return (f" ({now.describe()}, lock file {self.path}; if that driver is gone, its lock is taken "
                f"over once it has been silent for {self.duration:.0f} s)")

    def check(self) -> None:
        """Between trials. The hold is lost when another driver took the lock over (this one's
        heartbeat stalled for a whole lease) or removed it: taken again if free, else raise."""
        if self.lost is None:
            return
        reason, self.lost = self.lost, None
        self._lock.release()
        self._lock = self._new_lock()
        try:
            self._lock.acquire(timeout=_REFUSE_S)
        except (Timeout, LeaseSettingsMismatch):
            now = holder(self.path)
            who = f" ({now.describe()})" if now else ""
            raise GridsearchError(f"{self.path}: this driver lost its lock ({reason}) to another "
                                  f"driver{who}; stopping") from None

    def release(self) -> None:
        self._lock.release()


@contextlib.contextmanager
def held(path: Path, what: str, notify: Callable[[str], None] = ignore) -> Iterator[Lease]:
    """Hold the lock at ``path`` for the block; ``what`` starts the Busy message."""
    lease = Lease(path)
    lease.acquire(what, notify)
    try:
        yield lease
    finally:
        lease.release()
