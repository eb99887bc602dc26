"""The workdir's lock holds across nodes and needs no flock (issue 9, point 14).

A process in its own UTS and network namespaces, with another hostname, plays a driver on another
node of the shared filesystem; an LD_PRELOAD shim makes flock() fail with ENOSYS, as on a Lustre
mount with ``noflock``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_spec

from gridsearch import results
from gridsearch.core.errors import GridsearchError
from gridsearch.core.lease import LEASE_ENV
from gridsearch.engine import existing_ledger
from gridsearch.spec import load
from gridsearch.workspace import Busy, Workspace

CLI = [sys.executable, "-m", "gridsearch.cli"]
GRID2 = "grid:\n  tracking.appear_weight: [-0.1, -0.5]\n"
LEASE = 4.0
HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gridsearch.workspace import Workspace
    with Workspace(Path(sys.argv[1])).lock():
        print("held", flush=True)
        time.sleep(600)
""")
# flock() fails with ENOSYS on files under $NOFLOCK_UNDER (a Lustre mount with `noflock`), and works
# elsewhere (a node's local /tmp).
NO_FLOCK_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int flock(int fd, int operation) {
    const char *under = getenv("NOFLOCK_UNDER");
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    path[n < 0 ? 0 : n] = 0;
    if (under && strncmp(path, under, strlen(under)) == 0) {
        errno = ENOSYS;
        return -1;
    }
    int (*real)(int, int) = (int (*)(int, int))dlsym(RTLD_NEXT, "flock");
    return real(fd, operation);
}
"""
FLOCK_PROBE = textwrap.dedent("""
    import errno, fcntl, sys, tempfile
    def errno_of(f):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno
        return 0
    with open(sys.argv[1], "w") as inside, tempfile.TemporaryFile() as outside:
        sys.exit(0 if (errno_of(inside), errno_of(outside)) == (errno.ENOSYS, 0) else 1)
""")


def _other_node(argv: list[str]) -> list[str]:
    """argv as on another node: its own hostname and network; same files, real pids."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    probe = subprocess.run(["unshare", "--uts", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make namespaces here: {probe.stderr.strip()}")
    return ["unshare", "--uts", "--net", "sh", "-c", 'hostname other-node && exec "$0" "$@"', *argv]


@pytest.fixture
def short_lease(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Every contender (this process and its children) uses a lease of LEASE seconds."""
    monkeypatch.setenv(LEASE_ENV, str(LEASE))
    yield {**os.environ}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("shim")
    (d / "noflock.c").write_text(NO_FLOCK_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "noflock.so"), str(d / "noflock.c"), "-ldl"],
                   check=True, capture_output=True)
    return d / "noflock.so"


@pytest.fixture
def no_flock(shim: Path, tmp_path: Path) -> dict[str, str]:
    """An environment whose processes get ENOSYS from flock() on files under tmp_path."""
    env = {**os.environ, "LD_PRELOAD": str(shim), "NOFLOCK_UNDER": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", FLOCK_PROBE, str(tmp_path / "probe")], env=env)
    assert probe.returncode == 0, "the shim does not act as it should"
    return env


def _start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or {**os.environ})


def _holding(root: Path, env: dict[str, str] | None = None,
             other_node: bool = False) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", HOLD, str(root)]
    proc = _start(_other_node(argv) if other_node else argv, env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held", proc.stderr
    return proc


def _wait_for_holder(ws: Workspace, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while ws.holder() is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate()


def _sweep(spec: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "sweep", "-q", str(spec)], capture_output=True, text=True, timeout=600,
                          env=env or {**os.environ})


def _all_done(spec: Path) -> None:
    with existing_ledger(load(spec)) as led:
        assert led is not None
        df = results.table(load(spec), led)
    assert list(df.state) == ["done"] * len(load(spec).trials)


# ------------------------------------------------------------------ the lock itself, real processes


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "w")
    proc = _holding(ws.root)
    try:
        h = ws.holder()
        assert h is not None and (h.host, h.pid, h.here) == (socket.gethostname(), proc.pid, True)
        t0 = time.monotonic()
        with pytest.raises(Busy) as ei, ws.lock():
            pass
        msg = str(ei.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "\n" not in msg
        assert time.monotonic() - t0 < 3
    finally:
        _kill(proc)
    assert ws.holder() is None  # status: no driver running
    t0 = time.monotonic()
    with ws.lock():
        assert time.monotonic() - t0 < 2
        assert ws.holder().pid == os.getpid()  # type: ignore[union-attr]
    assert not ws.lock_path.exists()


def test_a_holder_on_another_node_is_refused_then_taken_over_after_its_lease(
    tmp_path: Path, short_lease: dict[str, str]
) -> None:
    ws = Workspace(tmp_path / "w")
    proc = _holding(ws.root, short_lease, other_node=True)
    try:
        h = ws.holder()
        assert h is not None and (h.host, h.pid, h.here) == ("other-node", proc.pid, False)
        time.sleep(LEASE)  # a live heartbeat: refused at once, however long it has held the lock
        t0 = time.monotonic()
        with pytest.raises(Busy) as ei, ws.lock():
            pass
        assert f"pid {proc.pid} on other-node" in str(ei.value) and time.monotonic() - t0 < 3
    finally:
        _kill(proc)
    # Just killed: its heartbeat is recent, so it still counts as running (another node's pid
    # cannot be checked from here)...
    with pytest.raises(Busy), ws.lock():
        pass
    # ...until it has been silent for half a lease; then the lock is taken over once the file
    # stayed untouched for a whole lease, watched by this host's clock.
    time.sleep(LEASE / 2 + 0.5)
    said: list[str] = []
    t0 = time.monotonic()
    with ws.lock(said.append):
        waited = time.monotonic() - t0
        assert ws.holder().here  # type: ignore[union-attr]
    assert LEASE - 0.5 <= waited <= LEASE + 3, waited
    assert len(said) == 1 and "other-node" in said[0] and "looks gone" in said[0]


# ------------------------------------------------------------------ real sweeps


def test_two_drivers_on_one_workdir_from_two_nodes(
    tmp_path: Path, movie: dict[str, Path], short_lease: dict[str, str]
) -> None:
    """The second driver is refused naming the first (host, pid); once the first is SIGKILLed and
    silent, the next driver takes the workdir over and finishes the sweep."""
    spec = write_spec(tmp_path, movie, name="nodes", grid=GRID2)
    ws = Workspace(load(spec).workdir)
    first = _start(_other_node([*CLI, "sweep", "-q", str(spec)]), short_lease)
    try:
        _wait_for_holder(ws, first)
        r = _sweep(spec, short_lease)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, r.stderr
        assert "another sweep is running" in line and f"pid {first.pid} on other-node" in line, line
    finally:
        _kill(first)
    time.sleep(LEASE / 2 + 0.5)
    r = _sweep(spec, short_lease)
    assert r.returncode == 0, r.stderr
    _all_done(spec)


def test_a_sweep_runs_where_flock_fails_with_enosys(
    tmp_path: Path, movie: dict[str, Path], no_flock: dict[str, str]
) -> None:
    """Lustre `noflock`: flock() fails with ENOSYS. The sweep runs, and a second driver is still
    refused, naming the first."""
    spec = write_spec(tmp_path, movie, name="noflock", grid=GRID2)
    ws = Workspace(load(spec).workdir)
    first = _start([*CLI, "sweep", "-q", str(spec)], no_flock)
    try:
        _wait_for_holder(ws, first)
        r = _sweep(spec, no_flock)
        assert r.returncode == 2 and "another sweep is running" in r.stderr, r.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in r.stderr and r.stderr.count("\n") == 1
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            _kill(first)
    _all_done(spec)


def test_a_managed_servers_users_are_counted_where_flock_fails(
    tmp_path: Path, no_flock: dict[str, str]
) -> None:
    """users.lock falls back to a node-local file instead of waiting for a lock that cannot come."""
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from gridsearch.postgres.users import user_of
        with user_of(Path(sys.argv[1]), 1.0) as last:  # flock failing: "still locked" after 1 s
            print(last())
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env=no_flock, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_a_lost_hold_is_taken_again_if_free_else_the_driver_stops(
    tmp_path: Path, short_lease: dict[str, str]
) -> None:
    """What a driver whose heartbeat stalled for a lease finds between trials: its lock removed (a
    driver that took it over, then was refused by the database's advisory lock) or held by another."""
    ws = Workspace(tmp_path / "w")
    with ws.lock() as lease:
        ws.lock_path.unlink()
        deadline = time.time() + 3 * LEASE
        while lease.lost is None:
            assert time.time() < deadline, "the heartbeat never noticed"
            time.sleep(0.1)
        lease.check()  # free: taken again
        assert lease.lost is None and ws.holder().pid == os.getpid()  # type: ignore[union-attr]
        ws.lock_path.unlink()
        other = _holding(ws.root, short_lease)
        try:
            while lease.lost is None:
                time.sleep(0.1)
            with pytest.raises(GridsearchError, match=rf"lost its lock .*pid {other.pid} on"):
                lease.check()
        finally:
            _kill(other)
