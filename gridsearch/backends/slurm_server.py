"""The managed PostgreSQL server as a SLURM job, the driver's half: submit it (or re-use the one a
killed driver left), wait for its ready file, hand out a Backend over TCP, cancel it at the end.

The job's half (start, create the databases, announce host:port) is gridsearch.postgres.serve. The
password reaches the job through the environment sbatch exports (ULTRACK_DB_PW), never argv.
A driver killed with -9 leaves the job up; the next driver re-uses it when the ready file names a
job that is still running and ULTRACK_DB_PW fixes the password (queued tasks carry it)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator

from gridsearch.backends.postgres import (
    PostgresBackend,
    connected,
    db_name,
    is_this_host,
    sweep_dbs,
    tcp_view,
)
from gridsearch.core.waiting import wait_until
from gridsearch.postgres import DEFAULT_ROLE, PASSWORD_ENV, Credentials, ExternalServer, PostgresError, owner
from gridsearch.postgres.serve import read_ready
from gridsearch.slurm import job_name
from gridsearch.slurm.gateway import job_state, scancel_ids, submit_job, wait_gone
from gridsearch.slurm.parse import LIVE_STATES
from gridsearch.slurm.paths import SERVER, JobPaths
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

READY = "postgres.ready"
READY_TIMEOUT_S = 300.0


def live_server(ws: Workspace) -> tuple[str, str, int] | None:
    """(job id, host, port) when the ready file names a server job SLURM still runs."""
    got = read_ready(ws.root / READY)
    if got is None or job_state(got[0]) != "RUNNING":
        return None
    return got


def submit_server(sweep: Sweep, ws: Workspace) -> str:
    ex = sweep.executor
    cmd = [sys.executable, "-m", "gridsearch.postgres.serve", "--root", str(ws.root / "postgres"),
           "--ready", str(ws.root / READY), "--dbs", ",".join(sweep_dbs(sweep)),
           "--workers", str(ex.max_parallel)]
    return submit_job(ex, SERVER, job_name(sweep, SERVER), cmd, JobPaths.of(ws))


def wait_ready(ws: Workspace, job_id: str, timeout: float = READY_TIMEOUT_S) -> tuple[str, int]:
    def probe() -> tuple[str, int] | None:
        got = read_ready(ws.root / READY)
        if got and got[0] == job_id:
            return got[1], got[2]
        state = job_state(job_id)
        if state not in LIVE_STATES:
            log = JobPaths.of(ws).server_log(job_id)
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            raise PostgresError(f"PostgreSQL server job {job_id} ended ({state}) before it was ready "
                                f"(log: {log}): {' | '.join(tail)}")
        return None

    got = wait_until(probe, timeout, 0.5)
    if got is None:
        raise RuntimeError(f"PostgreSQL server job {job_id} not ready after {timeout:.0f} s")
    return got


def _reusable_job(ws: Workspace, user_pw: str | None) -> str | None:
    """A live server job of an earlier driver, re-used only with the user's fixed password (a
    fresh random one could not log in to it); otherwise it is cancelled."""
    got = read_ready(ws.root / READY)
    if got is None or job_state(got[0]) != "RUNNING":
        return None
    if not user_pw:
        scancel_ids([got[0]])
        wait_gone(got[0])  # its server stops and withdraws its owner record before a new one starts
        return None
    return got[0]


def forget_ended_owner(ws: Workspace) -> bool:
    """An owner record naming a SLURM job that SLURM says has ended is stale (a node that died takes
    its server with it, leaving the record and postmaster.pid): cleared so that a new job may start."""
    root = ws.root / "postgres"
    rec = owner.read(root)
    if rec is None or not rec.job or job_state(rec.job) in LIVE_STATES:
        return False
    owner.clear(root)
    return True


@contextlib.contextmanager
def open_server_job(sweep: Sweep, ws: Workspace) -> Iterator[PostgresBackend]:
    """The sweep's Backend on a server that runs as a SLURM job (started here or re-used)."""
    (ws.root / "postgres").mkdir(parents=True, exist_ok=True)
    user_pw = os.environ.get(PASSWORD_ENV)
    job_id = _reusable_job(ws, user_pw)
    reused = job_id is not None
    password = user_pw or secrets.token_urlsafe(24)
    os.environ[PASSWORD_ENV] = password  # reaches the server job through sbatch's --export
    if job_id is None:
        (ws.root / READY).unlink(missing_ok=True)
        forget_ended_owner(ws)
        job_id = submit_server(sweep, ws)
    interrupted = False
    try:
        host, port = wait_ready(ws, job_id)
        creds = Credentials(host, port, DEFAULT_ROLE, password)
        # The role owns the sweep's databases: --restart renames the ledger's over TCP as it.
        admin = ExternalServer(host, port, DEFAULT_ROLE)
        with connected(sweep, ws, creds, admin, db_name(sweep, "state")) as backend:
            backend.stable_password = reused
            yield backend
    except (KeyboardInterrupt, SystemExit):
        interrupted = True  # queued arrays stay for re-attach: so does their server
        raise
    finally:
        if user_pw is None:
            os.environ.pop(PASSWORD_ENV, None)
        if not (interrupted or sweep.database.keep):
            scancel_ids([job_id])
            (ws.root / READY).unlink(missing_ok=True)
            wait_gone(job_id)


def remote_view(sweep: Sweep, ws: Workspace) -> PostgresBackend | None:
    """A view of a SLURM sweep whose server job runs on another node: over TCP, never by starting
    a second server on the shared data directory (two postmasters would corrupt it)."""
    live = live_server(ws)
    if live is None or is_this_host(live[1]):
        return None  # not running, or on this node: the unix socket path works
    job, host, port = live
    return tcp_view(sweep, ws, host, port, f"SLURM job {job}")
