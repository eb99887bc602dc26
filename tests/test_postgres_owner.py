"""Who runs a managed server: two "hosts" on one data directory (a process in its own PID, UTS and
IPC namespaces with another hostname plays the second node of a shared filesystem)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import pg_available, write_spec

from gridsearch.backends.postgres import managed_server
from gridsearch.postgres import ManagedServer, ServedElsewhere, owner
from gridsearch.slurm.gateway import SlurmError
from gridsearch.spec import load
from gridsearch.workspace import Workspace

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")]

CLI = [sys.executable, "-m", "gridsearch.cli"]
PASSWORD = "owner-test-pw"
GRID = "grid:\n  tracking.appear_weight: [-0.1]\n"


def _other_host(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """argv as on another node: own PIDs, hostname and SysV IPC; same files and network."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--uts", "--ipc", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make namespaces here: {probe.stderr.strip()}")
    wrapped = ["unshare", "--pid", "--fork", "--uts", "--ipc", "--mount-proc",
               "sh", "-c", 'hostname other-node && exec "$0" "$@"', *argv]
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _postmasters(data_dir: Path) -> list[int]:
    """Postmasters on data_dir. Their children rename themselves `postgres: ...`, but a backend
    just forked for a connection (a probe) still shows its parent's command line for a moment:
    a match whose parent also matches is such a child, not a second postmaster."""
    found: dict[int, int] = {}
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "postgres" and str(data_dir) in cmd:
            found[p.pid] = p.info["ppid"]
    return sorted(pid for pid, parent in found.items() if parent not in found)


def _log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text) if log.exists() else 0


@pytest.fixture
def db_started(open_tmp: Path, movie: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[Path]:
    """`gridsearch db start SPEC` (listen from the test's parameter), stopped afterwards."""
    listen = getattr(request, "param", "127.0.0.1")
    spec = write_spec(open_tmp, movie, name="own", grid=GRID,
                      extra=f"database: {{kind: postgresql, managed: true, listen: '{listen}'}}\n")
    r = subprocess.run([*CLI, "db", "start", str(spec)], capture_output=True, text=True,
                       env={**os.environ, "ULTRACK_DB_PW": PASSWORD})
    assert r.returncode == 0, r.stderr
    yield spec
    subprocess.run([*CLI, "db", "stop", str(spec)], capture_output=True, text=True)
    server = managed_server(load(spec), Workspace(load(spec).workdir))
    if server.pid() is not None:  # a failed assertion must not leave a server behind
        server.stop()


def _assert_untouched(spec: Path, run: subprocess.CompletedProcess[str], pid: int, ready: int) -> None:
    server = managed_server(load(spec), Workspace(load(spec).workdir))
    assert _postmasters(server.data_dir) == [pid], run.stderr
    log = server.log_file
    assert _log_count(log, "automatic recovery") == 0, log.read_text()
    assert _log_count(log, "ready to accept connections") == ready, log.read_text()
    assert (server.data_dir / "postmaster.pid").read_text().split()[0] == str(pid)
    assert server.is_running()


@pytest.mark.parametrize("db_started", ["*"], indirect=True)
def test_a_view_on_another_host_reads_over_tcp_and_starts_nothing(db_started: Path) -> None:
    spec = db_started
    server = managed_server(load(spec), Workspace(load(spec).workdir))
    pid = server.pid()
    assert pid is not None and _postmasters(server.data_dir) == [pid]
    ready = _log_count(server.log_file, "ready to accept connections")
    r = _other_host([*CLI, "status", "--json", str(spec)], {"ULTRACK_DB_PW": PASSWORD})
    _assert_untouched(spec, r, pid, ready)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trials"]["pending"] == 1
    # without the password it cannot read it, and says who runs it where
    r = _other_host([*CLI, "status", str(spec)], {"ULTRACK_DB_PW": ""})
    _assert_untouched(spec, r, pid, ready)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ULTRACK_DB_PW" in r.stderr and os.uname().nodename in r.stderr, r.stderr


def test_a_view_on_another_host_of_a_loopback_server_fails_in_one_line(db_started: Path) -> None:
    spec = db_started
    server = managed_server(load(spec), Workspace(load(spec).workdir))
    pid = server.pid()
    assert pid is not None
    ready = _log_count(server.log_file, "ready to accept connections")
    host = os.uname().nodename
    for view in (["status", str(spec)], ["results", str(spec)], ["db", "start", str(spec)]):
        r = _other_host([*CLI, *view])
        _assert_untouched(spec, r, pid, ready)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (view, r.stderr)
        assert host in r.stderr and str(pid) in r.stderr, r.stderr
    # db stop says who runs it, not "not running"; the server runs on
    r = _other_host([*CLI, "db", "stop", str(spec)])
    _assert_untouched(spec, r, pid, ready)
    assert r.returncode == 1 and "not running" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert host in r.stderr and str(pid) in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the owner record, in process


def _fake_pidfile(server: ManagedServer) -> None:
    """What a postmaster on another node leaves in the shared data directory."""
    (server.data_dir / "postmaster.pid").write_text(f"4242\n{server.data_dir}\n1700000000\n5432\n")


def test_the_record_names_the_running_server_and_goes_with_it(open_tmp: Path) -> None:
    server = ManagedServer(open_tmp / "rec" / "postgres")
    assert server.start() is True
    try:
        rec = owner.read(server.root)
        assert rec is not None and rec.pid == server.pid() and rec.here()
        assert (rec.address, rec.port, rec.on_demand) == ("127.0.0.1", server.port, False)
    finally:
        assert server.stop() is True
    assert owner.read(server.root) is None
    # a record of this host whose postmaster is gone is stale: cleared, and the start goes on
    owner.write(server.root, dataclasses.replace(rec, pid=_dead_pid()))
    try:
        assert server.start() is True and owner.read(server.root).pid == server.pid()  # type: ignore[union-attr]
    finally:
        server.stop()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_another_hosts_record_refuses_a_start_unless_it_is_stale(open_tmp: Path) -> None:
    server = ManagedServer(open_tmp / "ghost" / "postgres")
    server.init()
    ghost = owner.Owner("ghost-node", "127.0.0.1", 5432, 4242, "2026-01-01 00:00:00", "77", False)
    owner.write(server.root, ghost)
    _fake_pidfile(server)
    for act in (server.start, server.stop):
        with pytest.raises(ServedElsewhere) as ei:
            act()
        msg = str(ei.value)
        assert "\n" not in msg and "ghost-node" in msg and "4242" in msg and not ei.value.reachable
        assert str(owner.path(server.root)) in msg or "scancel 77" in msg
    st = server.status()  # db status: whose it is, not "stopped"
    assert st["running"] is False and "ghost-node" in st["owner"] and st["pid"] == 4242
    assert _postmasters(server.data_dir) == []
    # the record outlived its postmaster (no postmaster.pid, written long ago): stale, start goes on
    (server.data_dir / "postmaster.pid").unlink()
    old = time.time() - 3600
    os.utime(owner.path(server.root), (old, old))
    try:
        assert server.start() is True
        assert owner.read(server.root).host == owner.this_host()  # type: ignore[union-attr]
    finally:
        server.stop()


def test_another_host_that_answers_is_used_over_tcp_not_started(open_tmp: Path) -> None:
    server = ManagedServer(open_tmp / "tcp" / "postgres", listen_addresses="*")
    server.start()
    try:
        mine = owner.read(server.root)
        assert mine is not None and mine.address == owner.this_host()
        owner.write(server.root, dataclasses.replace(mine, host="ghost-node", pid=4242))
        with pytest.raises(ServedElsewhere) as ei:
            ManagedServer(server.root, listen_addresses="*").start()
        assert ei.value.reachable and ei.value.owner.port == server.port
        assert "ghost-node" in str(ei.value) and "\n" not in str(ei.value)
        assert _postmasters(server.data_dir) == [mine.pid]
        owner.write(server.root, mine)
    finally:
        server.stop()


def test_a_record_of_an_ended_slurm_job_is_forgotten(
    open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that died took its server job with it: SLURM's word that the job ended clears the
    record; a job SLURM still runs keeps it."""
    from gridsearch.backends import slurm_server

    ws = Workspace(open_tmp / "slurm")
    ghost = owner.Owner("node7", "node7", 5432, 4242, owner.now(), "123", False)
    owner.write(ws.root / "postgres", ghost)
    monkeypatch.setattr(slurm_server, "job_state", lambda job: "RUNNING")
    assert slurm_server.forget_ended_owner(ws) is False and owner.read(ws.root / "postgres") == ghost
    monkeypatch.setattr(slurm_server, "job_state", lambda job: "NODE_FAIL")
    assert slurm_server.forget_ended_owner(ws) is True and owner.read(ws.root / "postgres") is None


def test_a_scheduler_outage_is_never_read_as_the_server_job_ended(
    open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """squeue failing ("Socket timed out") while the server job runs: read as UNKNOWN it said the
    job had ended, and the record was cleared for a second server on the same files. The outage
    is waited out (said on screen) and the answer after it decides."""
    from gridsearch.backends import slurm_server

    ws = Workspace(open_tmp / "slurm-outage")
    ghost = owner.Owner("node7", "node7", 5432, 4242, owner.now(), "123", False)
    owner.write(ws.root / "postgres", ghost)
    bin_dir, count = open_tmp / "outage-bin", open_tmp / "outage-calls"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        f"#!/bin/sh\necho x >> {count}\n"
        f"if [ $(wc -l < {count}) -le 2 ]; then\n"
        "  echo 'squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1\n"
        "fi\necho 'RUNNING|None'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    said: list[str] = []
    assert slurm_server.forget_ended_owner(ws, said.append) is False
    assert owner.read(ws.root / "postgres") == ghost
    assert len(count.read_text().splitlines()) == 3
    assert said and "Socket timed out" in said[0] and "waiting for the scheduler" in said[0]
    # a view is not a driver: it does not wait, it stops in one line (tests/test_slurm_status.py)
    count.write_text("")
    (ws.root / slurm_server.READY).write_text("123 node7:5432\n")
    with pytest.raises(SlurmError, match="Socket timed out"):
        slurm_server.live_server(ws)
    assert slurm_server.reusable_server_job(ws) is None  # plan: counts a server job, the safe side


def test_a_starter_killed_before_its_record_leaves_the_server_on_demand(open_tmp: Path) -> None:
    """A sweep SIGKILLed once its server answered but before it wrote the owner record: the next
    sweep used to take the server for one someone keeps up, and it outlived the sweep (found by
    tests/test_kill_anywhere.py). The starter's intent, written before pg_ctl start, says it was
    on demand: the last user out stops it. Without an intent (started by hand) it is kept up."""
    from gridsearch.postgres import running

    root = open_tmp / "intent" / "postgres"
    die_before_recording = ("import os\nfrom gridsearch.postgres import ManagedServer, owner\n"
                            "owner.record = lambda *a, **k: os.kill(os.getpid(), 9)\n"
                            f"ManagedServer({str(root)!r}).start(on_demand=True)\n")
    r = subprocess.run([sys.executable, "-c", die_before_recording], capture_output=True, text=True)
    server = ManagedServer(root)
    try:
        assert r.returncode == -9 and server.is_running() and owner.read(root) is None, r.stderr
        with running(ManagedServer(root)):
            assert owner.read(root).on_demand  # type: ignore[union-attr]
        assert not server.is_running(), "the killed sweep's server outlived its last user"
        assert server.start() is True  # on_demand=False: `db start`
        owner.clear(root)  # a server found without a record, nobody's intent
        with running(ManagedServer(root)):
            pass
        assert server.is_running()
    finally:
        server.stop()
