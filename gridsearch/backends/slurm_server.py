"""The managed PostgreSQL server as a SLURM job, the driver's half: submit it (or re-use the one a
killed driver left), wait for its ready file, hand out a Backend over TCP, cancel it at the end.

The job's half (start, create the databases, announce host:port) is gridsearch.postgres.serve. The
password reaches the job in libpq's pgpass file (workdir/secrets, 0600 in 0700), never argv or the
job's environment (slurmctld saves that).
A driver killed with -9 leaves the job up; the next driver re-uses it when the ready file names a
job that is still running and ULTRACK_DB_PW fixes the password (queued tasks read it)."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator

from gridsearch.backends.postgres import (
    PostgresBackend,
    connected,
    db_name,
    is_this_host,
    sweep_dbs,
    tcp_view,
)
from gridsearch.core.errors import GridsearchError, ignore
from gridsearch.core.files import tail
from gridsearch.core.secrets import read_pgpass, write_pgpass
from gridsearch.core.waiting import wait_until
from gridsearch.postgres import DEFAULT_ROLE, PASSWORD_ENV, Credentials, ExternalServer, PostgresError, owner
from gridsearch.postgres.serve import read_ready
from gridsearch.slurm import job_name
from gridsearch.slurm.gateway import (
    PATIENCE_S,
    SlurmError,
    job_state,
    job_state_reason,
    patiently,
    queue_position,
    scancel_ids,
    submit_job,
    wait_gone,
)
from gridsearch.slurm.parse import LIVE_STATES
from gridsearch.slurm.paths import SERVER, JobPaths
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

READY = "postgres.ready"
READY_S = 300.0  # from RUNNING to accepting connections (initdb + start on a slow filesystem)
READY_ENV = "GRIDSEARCH_SERVER_READY_S"


def live_server(ws: Workspace, state: Callable[[str], str] | None = None) -> tuple[str, str, int] | None:
    """(job id, host, port) when the ready file names a server job SLURM still runs; `state`
    (job_state by default) raises SlurmError when squeue fails, or waits the outage out."""
    got = read_ready(ws.root / READY)
    if got is None or (state or job_state)(got[0]) != "RUNNING":
        return None
    return got


def submit_server(sweep: Sweep, ws: Workspace, password: str, notify: Callable[[str], None] = ignore) -> str:
    """The password goes to the job in libpq's pgpass file, never its saved environment."""
    ex = sweep.executor
    passfile = write_pgpass(ws.pgpass, password)
    cmd = [sys.executable, "-m", "gridsearch.postgres.serve", "--root", str(ws.root / "postgres"),
           "--ready", str(ws.root / READY), "--dbs", ",".join(sweep_dbs(sweep)),
           "--workers", str(ex.max_parallel), "--passfile", str(passfile)]
    env = {"PGPASSFILE": str(passfile)}
    return submit_job(ex, SERVER, job_name(sweep, SERVER), cmd, JobPaths.of(ws), env, notify)


class _ServerWait:
    """Waiting for the server job: as long as it is PENDING (queues wait hours; say why, and where
    it stands, when that changes or every few minutes), READY_S once it runs, and a scheduler
    outage waited out; a terminal state ends it at once."""

    def __init__(self, ws: Workspace, job_id: str, notify: Callable[[str], None], ready_s: float) -> None:
        self.ws, self.job_id, self.notify, self.ready_s = ws, job_id, notify, ready_s
        self.running_since: float | None = None
        self.said: tuple[str, str] = ("", "")
        self.said_at = 0.0

    def probe(self) -> tuple[str, int] | None:
        got = read_ready(self.ws.root / READY)
        if got and got[0] == self.job_id:
            return got[1], got[2]
        state, reason = patiently(lambda: job_state_reason(self.job_id), PATIENCE_S, self.notify,
                                  f"PostgreSQL server job {self.job_id}")
        log = JobPaths.of(self.ws).server_log(self.job_id)
        if state == "PENDING":
            self._tell(state, reason)
        elif state in LIVE_STATES:
            self.running_since = self.running_since or time.monotonic()
            if time.monotonic() - self.running_since > self.ready_s:
                raise PostgresError(f"PostgreSQL server job {self.job_id} runs but was not ready after "
                                    f"{self.ready_s:.0f} s (log: {log})")
        else:
            last = tail(log, 5).replace("\n", " | ")
            raise PostgresError(f"PostgreSQL server job {self.job_id} ended ({state}) before it was ready "
                                f"(log: {log}): {last}")
        return None

    def _tell(self, state: str, reason: str) -> None:
        if (state, reason) == self.said and time.monotonic() - self.said_at < 300:
            return
        position = queue_position(self.job_id)
        why = [] if reason in ("", "None") else [reason]  # SLURM's "None": not yet considered
        why += [f"position {position} in the queue"] if position else []
        self.notify(f"PostgreSQL server job {self.job_id} is {state}"
                    + (f" ({', '.join(why)})" if why else "") + "; waiting")
        self.said, self.said_at = (state, reason), time.monotonic()


def wait_ready(ws: Workspace, job_id: str, notify: Callable[[str], None] = ignore) -> tuple[str, int]:
    ready_s = float(os.environ.get(READY_ENV, READY_S))
    got = wait_until(_ServerWait(ws, job_id, notify, ready_s).probe, math.inf, 1.0)
    assert got is not None  # the wait only ends with an answer or an exception
    return got


def reusable_server_job(ws: Workspace) -> str | None:
    """The job id of a running server job the next driver would re-use (it has a password that
    opens it); `plan` asks, so that it does not count a server job it would not submit (a
    scheduler that does not answer: counted, the safe side of a forecast)."""
    try:
        got = live_server(ws)
    except SlurmError:
        return None
    return got[0] if got and (os.environ.get(PASSWORD_ENV) or ws.pgpass.exists()) else None


def _state(job_id: str, notify: Callable[[str], None]) -> str:
    """A job's state for a decision that starts or forgets a server: an outage is waited out,
    never read as "ended" (that would start a second server on the same files)."""
    return patiently(lambda: job_state(job_id), PATIENCE_S, notify, f"squeue for job {job_id}")


def _reusable_job(ws: Workspace, user_pw: str | None,
                  notify: Callable[[str], None] = ignore) -> tuple[str, str] | None:
    """(job id, password) of a live server job of an earlier driver (one killed, or reaped on a
    login node): re-used with the user's fixed password, else with the one the earlier driver
    left in libpq's password file for its jobs, so that its queued arrays are re-attached, not
    redone. A job neither opens is cancelled."""
    got = live_server(ws, lambda job: _state(job, notify))
    if got is None:
        return None
    password = user_pw or (read_pgpass(ws.pgpass) if ws.pgpass.exists() else None)
    if not password:
        scancel_ids([got[0]])
        wait_gone(got[0])  # its server stops and withdraws its owner record before a new one starts
        return None
    return got[0], password


def forget_ended_owner(ws: Workspace, notify: Callable[[str], None] = ignore) -> bool:
    """An owner record naming a SLURM job that SLURM says has ended is stale (a node that died takes
    its server with it, leaving the record and postmaster.pid): cleared so that a new job may start."""
    root = ws.root / "postgres"
    rec = owner.read(root)
    if rec is None or not rec.job or _state(rec.job, notify) in LIVE_STATES:
        return False
    owner.clear(root)
    return True


@contextlib.contextmanager
def open_server_job(sweep: Sweep, ws: Workspace,
                    notify: Callable[[str], None] = ignore) -> Iterator[PostgresBackend]:
    """The sweep's Backend on a server that runs as a SLURM job (started here or re-used)."""
    (ws.root / "postgres").mkdir(parents=True, exist_ok=True)
    user_pw = os.environ.get(PASSWORD_ENV)
    reusable = _reusable_job(ws, user_pw, notify)
    reused = reusable is not None
    job_id, password = reusable or (None, user_pw or secrets.token_urlsafe(24))
    if job_id is None:
        (ws.root / READY).unlink(missing_ok=True)
        forget_ended_owner(ws, notify)
        job_id = submit_server(sweep, ws, password, notify)
    interrupted = False
    try:
        host, port = wait_ready(ws, job_id, notify)
        creds = Credentials(host, port, DEFAULT_ROLE, password)
        # The role owns the sweep's databases: --restart renames the ledger's over TCP as it.
        admin = ExternalServer(host, port, DEFAULT_ROLE, password=password)
        with connected(sweep, ws, creds, admin, db_name(sweep, "state")) as backend:
            backend.stable_password = reused
            yield backend
    except (KeyboardInterrupt, SystemExit):
        interrupted = True  # queued arrays stay for re-attach: so does their server
        raise
    finally:
        if not (interrupted or sweep.database.keep):
            scancel_ids([job_id])
            (ws.root / READY).unlink(missing_ok=True)
            wait_gone(job_id)
            ws.pgpass.unlink(missing_ok=True)


def remote_view(sweep: Sweep, ws: Workspace) -> PostgresBackend | None:
    """A view of a SLURM sweep whose server job runs on another node: over TCP, never by starting
    a second server on the shared data directory (two postmasters would corrupt it)."""
    try:
        live = live_server(ws)
    except SlurmError as e:  # guessing "not running" could start a second server on its files
        raise GridsearchError(f"{ws.root}: cannot tell whether the sweep's server job runs ({e}); "
                              "try again once the scheduler answers") from None
    if live is None or is_this_host(live[1]):
        return None  # not running, or on this node: the unix socket path works
    job, host, port = live
    return tcp_view(sweep, ws, host, port, f"SLURM job {job}")
