"""Phase trace for fault drills: with GRIDSEARCH_TRACE=FILE the driver appends one line per phase it
enters (``<unix time> <pid> <phase> [<trial> [<stage>]]``), so a test that kills it knows where it was.

Each line is one ``write`` on an O_APPEND descriptor before the phase starts: once the call returns,
the line is in the file, so a driver stopped (SIGSTOP) at any instant shows its current phase last.
Unset (the normal case), it costs one environment lookup per phase."""

from __future__ import annotations

import os
import time

TRACE_ENV = "GRIDSEARCH_TRACE"


def phase(name: str, *detail: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = " ".join((f"{time.time():.6f}", str(os.getpid()), name, *detail)) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
