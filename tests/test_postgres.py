"""A real PostgreSQL server started through gridsearch.postgres (no mocks of the server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy

from gridsearch.postgres import (
    PASSWORD_ENV,
    Credentials,
    ExternalServer,
    ManagedServer,
    PostgresError,
    engine,
    find_binaries,
    libpq_env,
    running,
    ultrack_address,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.postgres


def _binaries_or_skip() -> Path:
    try:
        return find_binaries()
    except PostgresError as exc:
        pytest.skip(f"no PostgreSQL server binaries: {exc}")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A tmp dir the unprivileged server user can enter (pytest's tmp is 0700 root)."""
    _binaries_or_skip()
    d = Path(tempfile.mkdtemp(prefix="gs-pg-test-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[ManagedServer]:
    srv = ManagedServer(base / "main" / "postgres", workers=3)
    assert srv.start() is True
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def creds(server: ManagedServer) -> Credentials:
    env = os.environ.pop(PASSWORD_ENV, None)  # exercise the generated-password path
    try:
        return server.credentials()
    finally:
        if env is not None:
            os.environ[PASSWORD_ENV] = env


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ no server needed


def test_missing_binaries_message(tmp_path: Path) -> None:
    with pytest.raises(PostgresError) as ei:
        find_binaries(tmp_path)
    assert "apt-get install postgresql" in _one_line(ei.value)


def test_client_side_helpers_keep_password_out_of_addresses() -> None:
    c = Credentials("node7", 5433, "gridsearch", "s3cret")
    assert ultrack_address(c, "trial_1") == "gridsearch@node7:5433/trial_1"
    assert libpq_env(c) == {"PGPASSWORD": "s3cret"}
    assert libpq_env(Credentials("h", 1, "u")) == {}
    assert "s3cret" not in repr(c)
    eng = engine("trial_1", c)
    assert "s3cret" not in str(eng.url) and eng.url.password is None
    assert eng.url.drivername == "postgresql+psycopg2"


def test_initdb_failure_is_one_line(base: Path) -> None:
    root = base / "garbage" / "postgres"
    (root / "data").mkdir(parents=True)
    (root / "data" / "junk").write_text("not a cluster")
    with pytest.raises(PostgresError) as ei:
        ManagedServer(root).start()
    assert str(root / "data") in _one_line(ei.value)


def _fake_initdb(directory: Path, script: str) -> Path:
    """A bin dir with the real server binaries but this shell script as initdb."""
    real = find_binaries()
    directory.mkdir(mode=0o755)
    for name in ("pg_ctl", "pg_isready", "postgres"):
        (directory / name).symlink_to(real / name)
    (directory / "initdb").write_text("#!/bin/sh\n" + script)
    (directory / "initdb").chmod(0o755)
    return directory


def test_initdb_error_is_reported_in_one_line(base: Path) -> None:
    """Disk full and friends: initdb's own error line reaches the user, nothing more."""
    fake = _fake_initdb(base / "fakebin", (
        "echo 'creating directory ... ok'\n"
        "echo 'initdb: error: could not write to file: No space left on device' >&2\nexit 1\n"))
    with pytest.raises(PostgresError) as ei:
        ManagedServer(base / "full" / "postgres", bindir=fake).start()
    msg = _one_line(ei.value)
    assert msg.startswith("initdb failed in ") and msg.endswith("No space left on device")


def test_initdb_killed_halfway_leaves_nothing_that_looks_initialised(base: Path) -> None:
    """initdb writes PG_VERSION before the catalogs: a driver SIGKILLed in between used to leave a
    data dir that looked initialised and never started (found by tests/test_kill_anywhere.py). The
    cluster is made beside it and renamed into place complete; a killed attempt's is thrown away."""
    fake = _fake_initdb(base / "dyingbin", (  # what a kill halfway leaves: the version, no catalogs
        'while [ $# -gt 0 ]; do [ "$1" = -D ] && d="$2"; shift; done\n'
        'mkdir -p "$d/global" && echo 15 > "$d/PG_VERSION"\nkill -9 $$\n'))
    root = base / "killed-initdb" / "postgres"
    with pytest.raises(PostgresError, match="initdb failed"):
        ManagedServer(root, bindir=fake).start()
    assert not (root / "data").exists()
    server = ManagedServer(root)
    try:
        assert server.start() is True and server.is_running()
        assert not (root / "data.initdb").exists()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another OS user")
def test_root_unreachable_by_server_user_is_explained(tmp_path: Path) -> None:
    _binaries_or_skip()
    hidden = tmp_path / "private"  # pytest's tmp dirs are 0700 root
    hidden.mkdir(mode=0o700)
    with pytest.raises(PostgresError) as ei:
        ManagedServer(hidden / "postgres").start()
    assert "cannot enter" in _one_line(ei.value)


# ------------------------------------------------------------------ the shared server


def test_start_and_status(server: ManagedServer) -> None:
    st = server.status()
    assert st["running"] and st["managed"]
    assert st["host"] == "127.0.0.1" and st["port"] == server.port
    assert isinstance(st["pid"], int) and st["data_dir"] == str(server.data_dir)
    names = {d["name"]: d["size_bytes"] for d in st["databases"]}
    assert names["postgres"] > 0
    assert isinstance(st["connections"], int)
    run_dir = server.root / "run"
    assert run_dir.stat().st_mode & 0o777 == 0o700
    with server._admin() as conn:
        assert conn.execute("SHOW max_connections").fetchone()[0] == str(max(50, 8 * 3 + 30))
        assert conn.execute("SHOW log_statement").fetchone()[0] == "none"


def test_password_works_over_tcp(server: ManagedServer, creds: Credentials) -> None:
    conn = psycopg2.connect(
        host=creds.host,
        port=creds.port,
        user=creds.user,
        password=creds.password,
        dbname="postgres",
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == ("gridsearch", False)
        assert server.connections() >= 1
    finally:
        conn.close()
    with engine("postgres", creds).connect() as c:
        assert c.execute(sqlalchemy.text("SELECT 1")).scalar() == 1


def test_wrong_password_is_one_line_error(
    server: ManagedServer, creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "definitely-wrong")
    ext = ExternalServer(creds.host, creds.port, creds.user, "postgres")
    with pytest.raises(PostgresError) as ei:
        ext.list_databases()
    msg = _one_line(ei.value)
    assert f"127.0.0.1:{creds.port}" in msg and "password authentication failed" in msg
    assert "definitely-wrong" not in msg
    status = ext.status()
    assert status["running"] is False and "127.0.0.1" in status["error"]


def test_external_server_with_right_password(creds: Credentials, monkeypatch: pytest.MonkeyPatch) -> None:
    assert creds.password is not None
    monkeypatch.setenv(PASSWORD_ENV, creds.password)
    ext = ExternalServer(creds.host, creds.port, creds.user, "postgres")
    assert ext.status()["running"] is True
    assert "postgres" in {d["name"] for d in ext.list_databases()}


@pytest.mark.parametrize("user", ["gridsearch", "postgres"])
def test_tcp_without_password_is_refused(
    creds: Credentials, user: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(host=creds.host, port=creds.port, user=user, dbname="postgres")


def test_pg_hba_has_no_trust_over_tcp(server: ManagedServer) -> None:
    lines = [
        ln.split()
        for ln in (server.data_dir / "pg_hba.conf").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    host_lines = [f for f in lines if f[0].startswith("host")]
    assert host_lines and all(f[4] == "scram-sha-256" for f in host_lines)
    assert not any("trust" in f for f in lines)


def test_password_is_not_stored_or_visible(server: ManagedServer, creds: Credentials) -> None:
    assert creds.password
    secret = creds.password.encode()
    # Some traffic first so that everything that could be logged has been.
    server.create_database("leakcheck")
    with engine("leakcheck", creds).begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS t (a int)"))
    with server._admin() as conn:
        conn.execute("CHECKPOINT")
    files = [p for p in server.root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert server.log_file in files and len(files) > 100
    leaks = [p for p in files if secret in p.read_bytes()]
    assert leaks == []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        assert secret not in cmdline, f"password on the command line of pid {proc.name}"
    pid = server.pid()
    assert pid is not None
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes()


def test_env_password_is_used(
    server: ManagedServer, creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "from-the-environment")
    try:
        c2 = ManagedServer(server.root).credentials()
        assert c2.password == "from-the-environment" and c2.port == creds.port
        psycopg2.connect(
            host=c2.host, port=c2.port, user=c2.user, password=c2.password, dbname="postgres"
        ).close()
    finally:  # put the module's password back for the other tests
        assert creds.password is not None
        monkeypatch.setenv(PASSWORD_ENV, creds.password)
        ManagedServer(server.root).credentials()


def test_start_twice_reuses(server: ManagedServer) -> None:
    pid = server.pid()
    again = ManagedServer(server.root, workers=3)
    assert again.start() is False
    assert again.port == server.port and again.pid() == pid
    assert server.start() is False


def test_template_copy_copies_rows(server: ManagedServer, creds: Credentials) -> None:
    assert server.create_database("seg") is True
    assert server.create_database("seg") is False
    eng = engine("seg", creds)
    with eng.begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE nodes (id int PRIMARY KEY, area float)"))
        c.execute(sqlalchemy.text("INSERT INTO nodes SELECT g, g * 1.5 FROM generate_series(1, 500) g"))
    held = eng.connect()  # an open session on the template must not block the copy
    held.execute(sqlalchemy.text("SELECT 1"))
    try:
        assert server.create_database("seg_copy", template="seg") is True
    finally:
        held.invalidate()
        held.close()
    eng.dispose()
    with engine("seg_copy", creds).connect() as c:
        assert c.execute(sqlalchemy.text("SELECT count(*), sum(area) FROM nodes")).one() == (500, 187875.0)
        c.execute(sqlalchemy.text("INSERT INTO nodes VALUES (501, 1.0)"))  # the role owns the copy
        c.commit()
    sizes = {d["name"]: d["size_bytes"] for d in server.list_databases()}
    assert sizes["seg_copy"] > 0 and sizes["seg"] > 0
    assert server.drop_database("seg_copy") is True
    assert server.drop_database("seg_copy") is False
    assert "seg_copy" not in {d["name"] for d in server.list_databases()}


def test_port_taken_is_a_clear_error(base: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PostgresError) as ei:
            ManagedServer(base / "taken" / "postgres", port=port).start()
    msg = _one_line(ei.value)
    assert f"127.0.0.1:{port}" in msg and "in use" in msg


# ------------------------------------------------------------------ lifecycle (own server)


def _process_gone(pid: int, within: float = 10.0) -> bool:
    """pg_ctl stop -w returns once postmaster.pid is removed, a moment before the exit."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _assert_down(srv: ManagedServer, pid: int) -> None:
    ready = subprocess.run(
        [str(srv.bindir / "pg_isready"), "-h", str(srv.socket_dir), "-p", str(srv.port)],
        capture_output=True,
        check=False,
    )
    assert ready.returncode != 0
    assert not (srv.data_dir / "postmaster.pid").exists()
    assert _process_gone(pid)
    assert srv.is_running() is False and srv.status()["running"] is False


def test_running_stops_on_exception_and_keeps_on_request(base: Path) -> None:
    srv = ManagedServer(base / "life" / "postgres")
    with pytest.raises(RuntimeError, match="boom"), running(srv, keep=False):
        assert srv.is_running()
        pid = srv.pid()
        assert pid is not None
        raise RuntimeError("boom")
    _assert_down(srv, pid)
    with running(srv, keep=True):
        pid = srv.pid()
    assert srv.is_running()
    with running(srv, keep=False):  # already running before: not ours to stop
        pass
    assert srv.is_running()
    assert pid is not None and srv.stop() is True and srv.stop() is False
    _assert_down(srv, pid)


def test_running_stops_after_sigterm(base: Path) -> None:
    root = base / "life" / "postgres"  # initialised by the previous test, or now
    script = textwrap.dedent(
        f"""
        import sys, time
        from gridsearch.postgres import ManagedServer, running
        srv = ManagedServer({str(root)!r})
        with running(srv, keep=False):
            print("ready", srv.pid(), flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", proc.stderr.read() if proc.stderr else ""
        pid = int(line[1])
        assert Path(f"/proc/{pid}").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_down(ManagedServer(root), pid)
