"""`gridsearch cancel`: withdraw every job of a sweep (arrays, retries, the server job), from any
node and without the database password: by job name, plus a request file in the workdir that the
running driver (or, if none runs, the next one) reads and records in the ledger."""

from __future__ import annotations

import time

from gridsearch.core.errors import ignore
from gridsearch.core.files import atomic_write
from gridsearch.slurm import gateway, job_names
from gridsearch.slurm.driver_job import driver_name
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace


def cancel_sweep(sweep: Sweep, ws: Workspace) -> int:
    """The request first (a driver must not resubmit what is being cancelled), then one scancel
    by the sweep's job names. Returns how many jobs were live."""
    names = [*job_names(sweep), driver_name(sweep)]  # a driver job sees the request: it stops for good
    live = gateway.patiently(lambda: gateway.live_jobs(names), 60, ignore, "squeue")
    if ws.root.exists():
        atomic_write(ws.cancel_request, f"{time.time():.0f}\n")
    gateway.scancel_names(names)
    return len(live)
