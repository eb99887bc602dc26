"""`gridsearch cancel`: withdraw every job of a sweep (arrays, retries, the server job)."""

from __future__ import annotations

from gridsearch.slurm import gateway, job_names
from gridsearch.slurm.jobs import JobStore
from gridsearch.spec import Sweep


def cancel_sweep(sweep: Sweep, store: JobStore | None) -> int:
    """scancel by the sweep's job names (one call for all) and mark its arrays cancelled in the
    ledger (`store`; None when the sweep has no ledger yet): a running driver stops at its next
    poll, and the next `sweep` recomputes those stages instead of re-attaching. Returns how many
    jobs were live."""
    names = job_names(sweep)
    live = gateway.live_jobs(names)
    if store is not None:
        store.mark_all_cancelled()
    gateway.scancel_names(names)
    return len(live)
