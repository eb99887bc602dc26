"""The managed PostgreSQL server as a SLURM job: the job starts it (listening on every interface,
advertised under the node's hostname), creates the sweep's databases, sets the role's password from
ULTRACK_DB_PW (exported by sbatch from the driver's environment, never on a command line), and only
after pg_isready writes host:port to a ready file. The driver waits for that file, connects over
TCP, and cancels the job when the sweep ends (unless database.keep).

A driver killed with -9 leaves the job up; the next driver re-uses it when the ready file names a
job that is still running (with the same ULTRACK_DB_PW, the queued tasks can still log in)."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from gridsearch.backends import Backend
from gridsearch.postgres import PASSWORD_ENV, Credentials, ManagedServer, ultrack_address
from gridsearch.slurm import job_name
from gridsearch.slurm.cancel import scancel_ids
from gridsearch.slurm.submit import DEFAULT_RESOURCES, submit_plain
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

READY = "postgres.ready"


@dataclass(frozen=True)
class ServerJob:
    """Backend.server when PostgreSQL runs as a job; `reused`: a previous driver started it."""

    job_id: str
    reused: bool  # in the workdir: "<job id> <host>:<port>"


def _job_state(job_id: str) -> str:
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                       capture_output=True, text=True, timeout=60)
    return (r.stdout.split() or ["UNKNOWN"])[0]


def _read_ready(path: Path) -> tuple[str, str, int] | None:
    try:
        job, hostport = path.read_text().split()
    except (OSError, ValueError):
        return None
    host, port = hostport.rsplit(":", 1)
    return job, host, int(port)


def live_server(ws: Workspace) -> tuple[str, str, int] | None:
    """(job id, host, port) when the ready file names a server job SLURM still runs."""
    got = _read_ready(ws.root / READY)
    if got is None or _job_state(got[0]) != "RUNNING":
        return None
    return got


def submit_server(sweep: Sweep, ws: Workspace) -> str:
    ex = sweep.executor
    res = ex.stages.get("server") or DEFAULT_RESOURCES["server"]
    dbs = ",".join(sweep_dbs(sweep))
    cmd = [sys.executable, "-m", "gridsearch.slurm.server", "--root", str(ws.root / "postgres"),
           "--ready", str(ws.root / READY), "--dbs", dbs, "--workers", str(ex.max_parallel)]
    run = "exec " + " ".join(shlex.quote(c) for c in cmd)
    body = "\n".join(["#!/bin/bash", "set -e", *ex.setup, run, ""])
    extra = [f"--cpus-per-task={res.cpus}", f"--mem={res.mem}", f"--time={res.time}"]
    if ex.partition:
        extra.append(f"--partition={ex.partition}")
    if ex.account:
        extra.append(f"--account={ex.account}")
    extra += ex.sbatch_args
    return submit_plain(job_name(sweep, "server"), body, extra, ws.logs / "slurm" / "server-%j.log")


def sweep_dbs(sweep: Sweep) -> list[str]:
    from gridsearch.pgbackend import db_name

    return [db_name(sweep, "state"), db_name(sweep, "main")]


def wait_ready(ws: Workspace, job_id: str, timeout: float = 300) -> tuple[str, int]:
    ready = ws.root / READY
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _read_ready(ready)
        if got and got[0] == job_id:
            return got[1], got[2]
        state = _job_state(job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            log = ws.logs / "slurm" / f"server-{job_id}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            raise RuntimeError(f"PostgreSQL server job {job_id} ended ({state}) before it was ready "
                               f"(log: {log}): {' | '.join(tail)}")
        time.sleep(0.5)
    raise RuntimeError(f"PostgreSQL server job {job_id} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def open_server_job(sweep: Sweep, ws: Workspace) -> Iterator[Backend]:
    """The sweep's Backend on a server that runs as a SLURM job (started here or re-used)."""
    from gridsearch.pgbackend import db_name, libpq_environ

    ws.root.mkdir(parents=True, exist_ok=True)
    (ws.root / "postgres").mkdir(exist_ok=True)
    user_pw = os.environ.get(PASSWORD_ENV)
    got = _read_ready(ws.root / READY)
    # re-use a live server only with the user's fixed password: a fresh one could not log in
    reuse = got is not None and _job_state(got[0]) == "RUNNING"
    if reuse and not user_pw:
        assert got is not None
        scancel_ids([got[0]])
        reuse = False
    password = user_pw or secrets.token_urlsafe(24)
    os.environ[PASSWORD_ENV] = password  # reaches the server job through sbatch's --export
    if reuse:
        assert got is not None
        job_id = got[0]
    else:
        (ws.root / READY).unlink(missing_ok=True)
        job_id = submit_server(sweep, ws)
    interrupted = False
    try:
        host, port = wait_ready(ws, job_id)
        creds = Credentials(host, port, "gridsearch", password)
        with libpq_environ(creds) as env:
            state_db = db_name(sweep, "state")
            yield Backend(
                f"postgresql+psycopg2://{creds.user}@{host}:{port}/{state_db}",
                {"connect_args": {"password": creds.password}}, ws, kind="postgresql", env=env,
                address_of=lambda name: ultrack_address(creds, db_name(sweep, name)),
                server=ServerJob(job_id, reuse), state_db=state_db)
    except (KeyboardInterrupt, SystemExit):
        interrupted = True  # queued arrays stay for re-attach: so does their server
        raise
    finally:
        if user_pw is None:
            os.environ.pop(PASSWORD_ENV, None)
        if not (interrupted or sweep.database.keep):
            scancel_ids([job_id])
            (ws.root / READY).unlink(missing_ok=True)
            _wait_gone(job_id)


def _wait_gone(job_id: str, timeout: float = 60) -> None:
    """The server stops cleanly on SIGTERM (pg_ctl stop): the sweep returns after it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _job_state(job_id) in (
            "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
        time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    """The job's body: start, prepare, announce, then wait for scancel (SIGTERM) and stop."""
    ap = argparse.ArgumentParser(prog="python -m gridsearch.slurm.server")
    ap.add_argument("--root", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--dbs", default="")
    ap.add_argument("--workers", type=int, default=20)
    a = ap.parse_args(argv)
    stop = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    server = ManagedServer(a.root, listen_addresses="*", host=socket.gethostname(), workers=a.workers)
    server.start()
    try:
        server.credentials()  # ULTRACK_DB_PW from the environment sbatch exported
        for db in filter(None, a.dbs.split(",")):
            server.create_database(db)
        tmp = Path(a.ready + ".tmp")
        tmp.write_text(f"{os.environ.get('SLURM_JOB_ID', '0')} {server.host}:{server.port}\n")
        tmp.replace(a.ready)
        print(f"PostgreSQL ready on {server.host}:{server.port}", flush=True)
        while not stop and server.pid() is not None:
            time.sleep(1)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
