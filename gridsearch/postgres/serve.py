"""A managed server as a long-running job (the body of the SLURM server job): start it listening on
every interface under this node's hostname, create the sweep's databases, set the role's password
from the pgpass file the driver wrote (never the job's environment, which slurmctld saves), and
only after pg_isready write ``<job id> <host>:<port>`` to the ready file. Stop on SIGTERM (scancel).
The server's owner record (see owner.py) names this node and job, so no other node starts a second
server on the shared data directory, and views elsewhere read it over TCP.

The driver's half of this (submit, wait for the ready file, cancel) is gridsearch.backends.slurm_server."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from gridsearch.core.files import atomic_write
from gridsearch.core.secrets import PASSWORD_ENV, read_pgpass
from gridsearch.core.signals import stop_flag
from gridsearch.postgres.managed import ManagedServer


def read_ready(path: Path) -> tuple[str, str, int] | None:
    """(job id, host, port) from a ready file; None when absent or unreadable."""
    try:
        job, hostport = path.read_text().split()
        host, port = hostport.rsplit(":", 1)
        return job, host, int(port)
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridsearch.postgres.serve")
    ap.add_argument("--root", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--dbs", default="")
    ap.add_argument("--workers", type=int, default=20)
    ap.add_argument("--passfile", help="libpq pgpass file holding the role's password")
    a = ap.parse_args(argv)
    if a.passfile:  # credentials() reads it from this process's environment, nobody else's
        os.environ[PASSWORD_ENV] = read_pgpass(Path(a.passfile))
    with stop_flag() as stop:
        server = ManagedServer(a.root, listen_addresses="*", host=socket.gethostname(), workers=a.workers)
        server.start()
        try:
            server.credentials()
            for db in filter(None, a.dbs.split(",")):
                server.create_database(db)
            job = os.environ.get("SLURM_JOB_ID", "0")
            atomic_write(Path(a.ready), f"{job} {server.host}:{server.port}\n")
            print(f"PostgreSQL ready on {server.host}:{server.port}", flush=True)
            while not stop.wait(1.0) and server.pid() is not None:
                pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
