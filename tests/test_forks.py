"""Database forks (a copy of an ultrack database per branch of a sweep), on a real one-trial sweep:
SQLite, and a managed PostgreSQL server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from helpers import lab_database, pg_available, write_spec

from gridsearch.backends import Backend, open_backend
from gridsearch.backends.base import ROOM_FACTOR, ForkError, dir_size
from gridsearch.backends.names import db_name
from gridsearch.core.errors import GridsearchError
from gridsearch.engine import MAIN_DB, run_sweep
from gridsearch.ledger import Ledger
from gridsearch.spec import Sweep, load
from gridsearch.stages import Stage
from gridsearch.ultrackdb import METADATA, UltrackDB
from gridsearch.workspace import Workspace

ONE_POINT = """\
grid:
  segmentation.min_area: [30]
  linking.max_distance: [15.0]
  tracking.appear_weight: [-0.5]
"""
PG = """
database: {kind: postgresql, managed: true}
executor: {kind: local, workers: 1}
"""


def _swept(directory: Path, movie: dict[str, Path], name: str, extra: str = "") -> Sweep:
    """A finished one-trial sweep: main holds segment, link and solve."""
    sweep = load(write_spec(directory, movie, name=name, grid=ONE_POINT, extra=extra))
    out = run_sweep(sweep)
    assert (out.completed, out.failed) == (1, 0)
    return sweep


def counts(db: UltrackDB) -> tuple[int, int, int]:
    """(nodes, links, selected nodes) of an ultrack database."""
    eng = sa.create_engine(db.database_url())
    try:
        with eng.connect() as c:
            return (c.execute(sa.text("SELECT count(*) FROM nodes")).scalar_one(),
                    c.execute(sa.text("SELECT count(*) FROM links")).scalar_one(),
                    c.execute(sa.text("SELECT count(*) FROM nodes WHERE selected")).scalar_one())
    finally:
        eng.dispose()


def tables(db: UltrackDB) -> set[str]:
    eng = sa.create_engine(db.database_url())
    try:
        return set(sa.inspect(eng).get_table_names())
    finally:
        eng.dispose()


@pytest.fixture
def ledger_of() -> Iterator[Any]:
    opened: list[Ledger] = []

    def open_(sweep: Sweep, be: Backend) -> Ledger:
        led = Ledger(be.ledger_url, sweep.name, be.engine_kwargs)
        opened.append(led)
        return led

    yield open_
    for led in opened:
        led.close()


def fork_and_check(be: Backend, led: Ledger) -> None:
    """What both kinds must do: a full, independent copy, recorded in the ledger, dropped cleanly."""
    assert be.can_fork
    main = be.ultrack_db(MAIN_DB)
    before = counts(main)
    assert all(before), before  # segmented, linked and solved
    assert be.forks() == []

    f1 = be.fork(MAIN_DB, "f1")
    assert f1.name == "f1" and f1.working_dir == be.ws.db_dir("f1")
    assert counts(f1) == before
    assert "gs_solve_before" not in tables(main) or "gs_solve_before" in tables(f1)
    meta = (f1.working_dir / METADATA)
    assert meta.read_text() == (main.working_dir / METADATA).read_text()
    assert not meta.samefile(main.working_dir / METADATA)
    assert be.forks() == ["f1"]

    # the fork is independent: clearing its links leaves main as it was
    f1.clear(Stage.LINK)
    assert counts(f1) == (before[0], 0, 0)
    assert counts(main) == before
    assert (main.working_dir / METADATA).exists()

    # the ledger: dst holds what src holds, in one step; a fork of a fork's state replaces it
    held = led.held(MAIN_DB)
    assert all(held.values())
    led.fork_state(MAIN_DB, "f1")
    assert led.held("f1") == held
    led.invalidate("f1", Stage.LINK)
    assert led.held("f1")[Stage.LINK] is None
    led.fork_state(MAIN_DB, "f1")
    assert led.held("f1") == held
    assert led.databases() == ["f1", MAIN_DB]
    led.drop_state("f1")
    assert led.databases() == [MAIN_DB]
    assert led.held("f1") == {s: None for s in Stage}
    assert led.held(MAIN_DB) == held

    # re-forking over an existing (here: modified) fork replaces it whole
    f1 = be.fork(MAIN_DB, "f1")
    assert counts(f1) == before

    # drop: gone, idempotent; main and other names are refused
    be.drop("f1")
    assert not be.ws.db_dir("f1").exists()
    assert be.forks() == []
    be.drop("f1")
    for name in (MAIN_DB, "state", "f1_x", ""):
        with pytest.raises(ValueError):
            be.drop(name)
        with pytest.raises(ValueError):
            be.fork(MAIN_DB, name)
    assert counts(main) == before

    # a half copy a crash left is an orphan the scheduler sees and drops
    half = be.ws.db_dir("f7").with_name(".f7.forking")
    half.mkdir()
    (half / METADATA).write_text("half")
    assert be.forks() == ["f7"]
    be.drop("f7")
    assert not half.exists() and be.forks() == []

    # room: plenty here for one, not for a million
    assert be.fork_room(MAIN_DB, 1) == (1, "")
    n, why = be.fork_room(MAIN_DB, 10**6)
    assert n < 10**6 and f"database {MAIN_DB}" in why and "\n" not in why


def test_sqlite_fork(tmp_path: Path, movie: dict[str, Path], ledger_of: Any) -> None:
    sweep = _swept(tmp_path, movie, "fk")
    ws = Workspace(sweep.workdir)
    with open_backend(sweep, ws) as be:
        fork_and_check(be, ledger_of(sweep, be))
        with pytest.raises(ForkError, match="cannot fork database f9"):
            be.fork("f9", "f2")
        assert be.forks() == []


def test_sqlite_fork_room_on_a_small_disk(tmp_path: Path, movie: dict[str, Path], small_disk: Any) -> None:
    """fork_room's answer on a real small filesystem: fewer than wanted, and that many really fit."""
    sweep = _swept(tmp_path, movie, "room")
    src = Workspace(sweep.workdir).db_dir(MAIN_DB)
    size = dir_size(src)
    mnt = small_disk(f"{(size * 8) // 1024 + 64}k")
    ws = Workspace(mnt / "work")
    shutil.copytree(src, ws.db_dir(MAIN_DB))
    be = Backend(ws, f"sqlite:///{ws.state_db}")
    n, why = be.fork_room(MAIN_DB, 20)
    free = shutil.disk_usage(mnt).free
    assert n == free // (ROOM_FACTOR * size) and 1 <= n < 20, (n, free, size)
    assert f"room for {n} of 20" in why and str(mnt) in why
    for i in range(n):
        be.fork(MAIN_DB, f"f{i + 1}")
    assert be.forks() == [f"f{i + 1}" for i in range(n)]
    assert be.fork_room(MAIN_DB, 20)[0] < n  # the forks took their room


@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_postgres_fork(open_tmp: Path, movie: dict[str, Path], ledger_of: Any) -> None:
    sweep = _swept(open_tmp, movie, "fkpg", PG)
    ws = Workspace(sweep.workdir)
    with open_backend(sweep, ws) as be:
        assert be.can_fork
        fork_and_check(be, ledger_of(sweep, be))
        server = be.server  # type: ignore[attr-defined]
        assert not server.database_exists(db_name(sweep, "f1"))

        # a session left on the source: refused in one line naming it, the session kept
        creds = be.creds  # type: ignore[attr-defined]
        main_db = db_name(sweep, MAIN_DB)
        with psycopg.connect(host=creds.host, port=creds.port, user=creds.user, password=creds.password,
                             dbname=main_db, autocommit=True) as conn:
            with pytest.raises(GridsearchError) as err:
                be.fork(MAIN_DB, "f2")
            assert main_db in str(err.value) and "\n" not in str(err.value)
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not server.database_exists(db_name(sweep, "f2"))
        assert not ws.db_dir("f2").exists()
        assert be.forks() == []

        # a fork database a crash left without its working dir: found, and dropped
        server.create_database(db_name(sweep, "f9"))
        assert be.forks() == ["f9"]
        be.drop("f9")
        assert not server.database_exists(db_name(sweep, "f9")) and be.forks() == []
        # the server's data directory is measured
        _, why = be.fork_room(MAIN_DB, 10**6)
        assert str(server.data_dir) in why or str(server.data_dir.parent) in why


@pytest.mark.postgres
@pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")
def test_existing_server_cannot_fork(open_tmp: Path, movie: dict[str, Path], lab: Any) -> None:
    """One schema of the user's database: no fork, the scheduler falls back to one database."""
    server, _ = lab
    sweep = load(write_spec(open_tmp, movie, name="ext", grid=ONE_POINT, extra=lab_database(server.port)))
    with open_backend(sweep, Workspace(sweep.workdir)) as be:
        assert not be.can_fork
        with pytest.raises(ForkError, match="cannot be forked"):
            be.fork(MAIN_DB, "f1")
