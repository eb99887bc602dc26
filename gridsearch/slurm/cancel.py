"""scancel by the sweep's job names: one call cancels every array, retry and the server job."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace


def scancel_names(names: Sequence[str]) -> None:
    subprocess.run(["scancel", "-n", ",".join(names)], capture_output=True, text=True, timeout=60)


def scancel_ids(ids: Sequence[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)


def live_jobs(names: Sequence[str]) -> list[str]:
    """Job ids (array ids once) of the named jobs still pending or running."""
    r = subprocess.run(["squeue", "-h", "-n", ",".join(names), "-o", "%F"], capture_output=True,
                       text=True, timeout=60)
    return sorted({ln.strip() for ln in r.stdout.splitlines() if ln.strip()})


def cancel_sweep(sweep: Sweep, ws: Workspace) -> int:
    """`gridsearch cancel SPEC`: scancel every job of the sweep (arrays, retries, server) and mark
    them cancelled in the ledger: a running driver stops at its next poll, and the next `sweep`
    clears and recomputes those stages instead of re-attaching. Returns how many jobs were live."""
    from gridsearch.engine import existing_ledger
    from gridsearch.slurm import job_names
    from gridsearch.slurm.jobs import JobStore

    names = job_names(sweep)
    live = live_jobs(names)
    if ws.exists():
        with existing_ledger(sweep) as ledger:
            if ledger is not None:
                JobStore(ledger.engine).mark_all_cancelled()
    scancel_names(names)
    return len(live)
