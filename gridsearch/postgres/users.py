"""Who uses a managed server, so that nobody stops it under someone else (a dashboard closed while a
sweep runs on the server it started, or a sweep ending under an open dashboard).

Every sweep and view holds a shared ``flock`` on ``root/users.lock`` while it uses the server; the
kernel drops it when the process dies, so a killed user never counts. Leaving, a user tries to take
the lock exclusively: only the last one gets it, and only it stops a server that was started on
demand (never one that ``db start``, ``keep: true`` or a SLURM server job keeps up). Newcomers wait
for the shared lock while it stops, then start the server again.

A filesystem without flock (Lustre mounted ``noflock``: ENOSYS) gets a node-local lock file in its
stead, as ``localflock`` would give: the server runs on one node, and it counts that node's users."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gridsearch.core.signals import terminate_as_exit
from gridsearch.core.waiting import wait_until
from gridsearch.postgres.client import PostgresError
from gridsearch.postgres.managed import ManagedServer

USERS_FILE = "users.lock"
_POLL = 0.1


_NO_FLOCK = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK})


def _open_users_file(root: Path) -> int:
    """``root/users.lock``, or a node-local stand-in when its filesystem refuses flock."""
    fd = os.open(root / USERS_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            return fd  # held (a server stopping): flock works here
        os.close(fd)
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return os.open(Path(tempfile.gettempdir()) / f"gridsearch-users-{digest}.lock",
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    return fd


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def user_of(root: Path, timeout: float) -> Iterator[Callable[[], bool]]:
    """Count as a user of the server under ``root`` for the block; yields ``last()``, which is
    True for the last user out (who then holds the lock exclusively until the block ends)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = _open_users_file(root)
    try:
        if not wait_until(lambda: _try_lock(fd, fcntl.LOCK_SH), timeout, _POLL):
            raise PostgresError(f"{root / USERS_FILE}: still locked by a stopping server after "
                                f"{timeout:.0f} s; run the command again")
        yield lambda: _try_lock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


@contextlib.contextmanager
def running(server: ManagedServer, keep: bool = False) -> Iterator[ManagedServer]:
    """Start ``server`` if needed; on any exit, stop it if this was its last user and it runs on
    demand (started by a sweep or view that did not ask to ``keep`` it).

    SIGTERM/SIGHUP become SystemExit (SIGINT already raises KeyboardInterrupt) so that the stop
    runs when a scheduler or a user kills the driver; the old handlers are back afterwards."""
    with terminate_as_exit(), user_of(server.root, server.timeout + 30.0) as last:
        # Decided before start(): a signal during start() must still lead to a stop.
        was_running = server.is_running()
        try:
            server.start(on_demand=not keep)
            yield server
        finally:
            # Asked once this is the last user, holding the lock: no one can promote it meanwhile.
            if not keep and last() and server.on_demand(default=not was_running):
                server.stop()
