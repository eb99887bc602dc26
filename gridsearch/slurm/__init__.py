"""SLURM plumbing, one concern per module: gateway (the only one that runs SLURM's commands), parse
(what they print), paths (job scripts and logs), chain (a trial's arrays as a state machine, no I/O),
jobs (the ledger's record of submitted arrays), cancel (`gridsearch cancel`), describe (plan view)."""

from __future__ import annotations

import hashlib
import re

from gridsearch.spec import Sweep


def sweep_tag(sweep: Sweep) -> str:
    """Job names carry the sweep's name and a hash of its workdir: two sweeps never see each other's jobs."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", sweep.name)[:40]
    h = hashlib.sha1(str(sweep.workdir.absolute()).encode()).hexdigest()[:6]
    return f"gs-{base}-{h}"


def job_name(sweep: Sweep, what: str) -> str:
    """`what` is a stage label or 'server'."""
    return f"{sweep_tag(sweep)}-{what}"


def job_names(sweep: Sweep) -> list[str]:
    return [job_name(sweep, w) for w in ("segment", "link", "solve", "server")]
