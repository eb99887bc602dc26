"""Nobody stops a managed server under someone else: views and sweeps count as its users, and only
the last one out stops a server that runs on demand (issue 9, point 7)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import pg_available, write_spec

from gridsearch.backends.postgres import managed_server
from gridsearch.spec import load
from gridsearch.workspace import Workspace

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")]

PG = """
database: {kind: postgresql, managed: true}
executor: {kind: local, workers: 2}
"""
# A view holding the ledger open (as `dashboard` does) until told to read it once more and leave.
VIEW = """
import sys
from gridsearch.engine import existing_ledger
from gridsearch.spec import load
with existing_ledger(load(sys.argv[1])) as led:
    led.study.get_trials()
    print("open", flush=True)
    sys.stdin.readline()
    print(len(led.study.get_trials()), flush=True)
"""


class View:
    """A view process; ``leave()`` makes it read the ledger once more and exit."""

    def __init__(self, spec: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", VIEW, str(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "open", self.proc.stderr.read() if self.proc.stderr else line

    def leave(self) -> int:
        out, err = self.proc.communicate("\n", timeout=120)
        assert self.proc.returncode == 0, err
        return int(out.strip())


@contextlib.contextmanager
def _cleanup(spec: Path, views: list[View]) -> Iterator[None]:
    try:
        yield
    finally:
        for v in views:
            if v.proc.poll() is None:
                v.proc.kill()
        server = managed_server(load(spec), Workspace(load(spec).workdir))
        if server.pid() is not None:
            server.stop()


def _workers_running() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if b"gridsearch.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
    return False


def test_views_and_a_sweep_never_stop_the_server_under_each_other(
    open_tmp: Path, movie: dict[str, Path]
) -> None:
    """View A starts the server, view B and a sweep join; A leaves mid-sweep, the sweep ends while B
    is open: the server stays up for whoever still uses it, and B, the last one out, stops it."""
    spec = write_spec(open_tmp, movie, name="users", extra=PG,
                      grid="grid:\n  tracking.appear_weight: [-0.1]\n")
    sw = load(spec)
    server = managed_server(sw, Workspace(sw.workdir))
    (sw.workdir / "postgres").mkdir(parents=True)  # a workdir views look at
    views: list[View] = []
    with _cleanup(spec, views):
        views.append(View(spec))
        assert server.is_running()  # view A started it, on demand
        pid = server.pid()
        views.append(View(spec))
        sweep = subprocess.Popen([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while sweep.poll() is None and not _workers_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sweep.poll() is None, "the sweep ended before its workers were seen"
        assert views[0].leave() in (0, 1)  # A, which started the server, leaves while the sweep works
        assert server.is_running() and server.pid() == pid
        _, err = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, err
        assert server.is_running() and server.pid() == pid  # B still reads it
        assert views[1].leave() == 1
        assert not server.is_running(), "the last user out left an on-demand server running"
