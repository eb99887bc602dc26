"""`gridsearch sweep --submit`: the driver itself as a small SLURM job, for clusters that kill long
processes on login nodes. A sweep outlives any one job's time limit: SLURM warns the job
`GRACE_S` before its limit (`--signal=B:TERM@120`), the driver stops as on Ctrl-C (its arrays and
its server job stay queued for the next driver to re-attach), submits its successor with
`--dependency=afterany` on itself, and exits; the successor resumes the sweep.

A TERM that is not the time limit's (`gridsearch cancel`, an admin's scancel) ends the chain: the
driver carries on only when the job's own clock says its limit is near and no cancel was asked for."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gridsearch.core.errors import GridsearchError, ignore
from gridsearch.core.secrets import PASSWORD_ENV, read_pgpass, write_pgpass
from gridsearch.core.waiting import wait_until
from gridsearch.slurm import gateway, job_name
from gridsearch.slurm.paths import JobPaths
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

DRIVER = "driver"  # the job's name suffix and its resources' key in executor.stages
GRACE_S = 120  # SLURM's warning before the time limit: time to stop, resubmit and exit
_NEAR_S = GRACE_S + 90  # a TERM with this little time left is the limit's (SLURM checks every ~30 s)
IN_JOB_FLAG = "--in-job"  # what the job script passes to `gridsearch sweep`


def driver_name(sweep: Sweep) -> str:
    """Not among slurm.job_names: the executor's poller and its stray-array check must never see
    the job it runs in."""
    return job_name(sweep, DRIVER)


def driver_log(ws: Workspace, job_id: str) -> Path:
    return JobPaths.of(ws).job_log(DRIVER, job_id)


def live_driver(sweep: Sweep) -> tuple[str, str] | None:
    """(job id, state) of the sweep's queued or running driver job, if any."""
    ids = gateway.patiently(lambda: gateway.live_jobs([driver_name(sweep)]), 60, ignore, "squeue")
    if not ids:
        return None
    return ids[0], gateway.job_state_reason(ids[0])[0]


def submit(sweep: Sweep, spec_path: Path, ws: Workspace, after: str | None = None,
           restart: bool = False, notify: Callable[[str], None] = ignore) -> str:
    """Queue a driver job for the sweep file at `spec_path`; `after`: the job it follows
    (`restart`: the first job only, its successors resume)."""
    password = os.environ.get(PASSWORD_ENV)
    if password:  # a fixed password reaches the job as libpq's file, never its environment
        write_pgpass(ws.driver_pgpass, password)
    command = [sys.executable, "-m", "gridsearch.cli", "sweep", str(spec_path.resolve()), IN_JOB_FLAG,
               *(["--restart"] if restart else [])]
    extra = [f"--signal=B:TERM@{GRACE_S}", "--open-mode=append"]
    if after:
        extra.append(f"--dependency=afterany:{after}")
    return gateway.submit_job(sweep.executor, DRIVER, driver_name(sweep), command, JobPaths.of(ws),
                              notify=notify, extra=extra)


def take_password(ws: Workspace) -> None:
    """In the job: the password the user submitted with, from its file."""
    if not os.environ.get(PASSWORD_ENV) and ws.driver_pgpass.exists():
        os.environ[PASSWORD_ENV] = read_pgpass(ws.driver_pgpass)


def await_predecessor(ws: Workspace, timeout: float | None = None) -> None:
    """A predecessor killed after its grace may leave its lock behind on another node: it has ended
    (the dependency says so), so wait for its lease to lapse instead of being refused."""
    from gridsearch.core.lease import lease_seconds

    h = ws.holder()
    if h is None:
        return
    print(f"waiting for the previous driver's lock ({h.describe()}) to lapse", flush=True)
    wait_until(lambda: (now := ws.holder()) is None or now.silent(lease_seconds()),
               timeout if timeout is not None else 2 * lease_seconds() + 30, 2.0)


@dataclass
class JobClock:
    """When this job's time limit falls, read once at its start (squeue may be down at the end)."""

    job_id: str | None
    deadline: float | None  # time.monotonic() of the limit; None: unknown

    @classmethod
    def start(cls) -> JobClock:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return cls(None, None)
        try:
            left = gateway.time_left(job)
        except gateway.SlurmError:
            left = None
        return cls(job, None if left is None else time.monotonic() + left)

    def near_limit(self) -> bool:
        """Unknown counts as near: carrying on wrongly costs a job, stopping wrongly the sweep."""
        return self.deadline is None or self.deadline - time.monotonic() <= _NEAR_S


def carry_on(sweep: Sweep, spec_path: Path, ws: Workspace, clock: JobClock,
             notify: Callable[[str], None]) -> str | None:
    """After a TERM: the successor's job id, or None when the chain ends here (why is said)."""
    if ws.cancel_request.exists():
        notify("the sweep was cancelled: no driver job follows")
        return None
    if not clock.near_limit():
        notify("stopped by a signal well before the time limit: no driver job follows; "
               "`gridsearch sweep --submit` carries on")
        return None
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut this short
    try:
        successor = submit(sweep, spec_path, ws, after=clock.job_id, notify=notify)
        if ws.cancel_request.exists():  # `cancel` ran while we submitted: its scancel may have missed it
            gateway.scancel_ids([successor])
            notify("the sweep was cancelled: no driver job follows")
            return None
    except GridsearchError as e:
        notify(f"could not queue the next driver job ({e}); `gridsearch sweep --submit` carries on")
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
    notify(f"time limit near: the sweep carries on in SLURM job {successor} "
           f"(log {driver_log(ws, successor)})")
    return successor
