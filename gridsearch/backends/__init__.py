"""Where a sweep's state lives, behind one type (``Backend``, in base.py):

- base.py          the Backend type: ledger URL, worker environment, ultrack databases, archive
- postgres.py      a managed PostgreSQL server or an existing one (and views of a remote one)
- slurm_server.py  the managed server as a SLURM job: the driver's half (submit, wait, re-use, cancel)

``open_backend`` picks one; nothing above this package asks which."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from gridsearch.backends.base import Backend
from gridsearch.core.errors import ignore
from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

__all__ = ["Backend", "open_backend"]


@contextlib.contextmanager
def open_backend(sweep: Sweep, ws: Workspace, read_only: bool = False,
                 notify: Callable[[str], None] = ignore) -> Iterator[Backend]:
    """read_only: for views (status, results) that must not start a sweep's resources for long."""
    if sweep.database.kind == "sqlite":
        yield Backend(ws, f"sqlite:///{ws.state_db}")
        return
    # psycopg and SLURM: imported only when needed
    if sweep.database.managed and sweep.executor.kind == "slurm":
        from gridsearch.backends.slurm_server import open_server_job, remote_view

        if not read_only:
            with open_server_job(sweep, ws, notify) as be:
                yield be
            return
        remote = remote_view(sweep, ws)
        if remote is not None:
            yield remote
            return
    from gridsearch.backends.postgres import open_postgres

    with open_postgres(sweep, ws, read_only=read_only) as be:
        yield be
