"""A batch re-run after it wrote its rows but before its acknowledgement (a SLURM resubmission or
requeue) ends with the database of a clean run: the worker clears what the batch wrote before it
runs again (gridsearch.rerun). Real ultrack on a 6-frame movie, the worker called batch by batch
as the pool and SLURM executors call it; no cluster."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import pg_available, write_spec

from gridsearch.runtime import fd_redirect
from gridsearch.schema import batch_t
from gridsearch.spec import load
from gridsearch.stages import Stage, stage_phases
from gridsearch.ultrackdb import UltrackDB
from gridsearch.worker import FAIL_ENV, BatchTask, run_and_acknowledge

FRAMES = 1  # frames per batch (ultrack's n_workers: more would spawn a pool per batch, 5 s each)
WINDOW = 2  # solve windows 0 2 | 1, each sharing its end slices with the other phase
BASE = ("config:\n  segmentation: {max_area: 1000}\n"
        f"  tracking: {{solver_name: CBC, window_size: {WINDOW}, overlap_size: 1}}\n")
RUN_IDS = {Stage.SEGMENT: 1, Stage.LINK: 2, Stage.SOLVE: 3}
MISSING = "SEGMENTS MIGHT BE MISSING"
Tables = dict[str, list[tuple[Any, ...]]]


@pytest.fixture(scope="module")
def six_frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gridsearch.synth import generate_movie

    return generate_movie(tmp_path_factory.mktemp("six"), n_frames=6)


POSTGRES = pytest.param("postgresql", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not pg_available(), reason="PostgreSQL binaries not installed")])


@pytest.fixture(scope="module", params=["sqlite", POSTGRES])
def database(request: pytest.FixtureRequest) -> Iterator[Any]:
    """new(name) -> a fresh empty ultrack database on this backend."""
    base = Path(tempfile.mkdtemp(prefix="gs-rerun-", dir="/tmp"))
    base.chmod(0o711)
    server = None
    env = os.environ.copy()
    if request.param == "postgresql":
        from gridsearch.postgres import ManagedServer, libpq_env, ultrack_address

        server = ManagedServer(base / "postgres", workers=2)
        server.start()
        creds = server.credentials()
        os.environ.update(libpq_env(creds))

    def new(name: str) -> UltrackDB:
        if server is None:
            return UltrackDB(name, base / name)
        server.create_database(name)
        return UltrackDB(name, base / name, "postgresql", ultrack_address(creds, name))

    try:
        yield new
    finally:
        if server is not None:
            server.stop()
        os.environ.clear()
        os.environ.update(env)
        shutil.rmtree(base, ignore_errors=True)


def _tables(db: UltrackDB) -> Tables:
    engine = sa.create_engine(db.database_url(), poolclass=sa.pool.NullPool)
    queries = {
        "nodes": "SELECT id, t, area, hier_parent_id, selected, parent_id FROM nodes ORDER BY id",
        # OVERLAPS is a keyword of SQL: quoted
        "overlaps": 'SELECT node_id, ancestor_id FROM "overlaps" ORDER BY node_id, ancestor_id',
        "links": "SELECT source_id, target_id, weight FROM links ORDER BY source_id, target_id, weight",
    }
    try:
        with engine.connect() as c:
            return {k: [tuple(r) for r in c.execute(sa.text(q))] for k, q in queries.items()}
    finally:
        engine.dispose()


def _run(db: UltrackDB, movie: dict[str, Path], workdir: Path,
         faults: dict[Stage, list[int]]) -> tuple[dict[Stage, Tables], str]:
    """Every batch, phase by phase, through the worker; each faulty batch fails after it wrote its
    rows and runs again. Returns the tables after each stage and the log."""
    workdir.mkdir(parents=True, exist_ok=True)
    sections = load(write_spec(workdir, movie, name="rerun", base=BASE,
                               grid="grid:\n  tracking.appear_weight: [-0.5]\n")).trials[0].sections
    config = db.write_config(sections, FRAMES, workdir / "config.toml")
    ledger = sa.create_engine(f"sqlite:///{workdir / 'ledger.db'}")
    batch_t.create(ledger)
    db.clear(Stage.SEGMENT)
    log, after = workdir / "ultrack.log", {}
    for stage in Stage:
        for phase in stage_phases(stage, 6, FRAMES, WINDOW):
            for b in phase:
                task = BatchTask(stage.label, str(config), str(movie["foreground"]), str(movie["contours"]),
                                 "", RUN_IDS[stage], b)
                if b in faults.get(stage, []):
                    os.environ[FAIL_ENV] = f"{stage.label}:{b}::after"
                    with pytest.raises(RuntimeError, match="after it ran"), fd_redirect(log):
                        run_and_acknowledge(task, ledger)
                    del os.environ[FAIL_ENV]
                with fd_redirect(log):
                    run_and_acknowledge(task, ledger)
        after[stage] = _tables(db)
    with ledger.connect() as c:
        acked = sorted((r.run_id, r.batch) for r in c.execute(sa.select(batch_t)))
    ledger.dispose()
    assert acked == sorted((RUN_IDS[s], b) for s in Stage for p in stage_phases(s, 6, FRAMES, WINDOW)
                           for b in p)
    return after, log.read_text()


@pytest.fixture(scope="module")
def clean(database: Any, six_frames: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[Stage, Tables]:
    tables, _ = _run(database("clean"), six_frames, tmp_path_factory.mktemp("clean"), {})
    assert all(tables[Stage.SOLVE][k] for k in ("nodes", "overlaps", "links"))
    assert any(row[4] for row in tables[Stage.SOLVE]["nodes"]), "nothing selected: a vacuous comparison"
    return tables


@pytest.mark.parametrize(("stage", "batches"), [
    (Stage.SEGMENT, [2]),  # in the phase after batch 0
    (Stage.LINK, [2]),
    (Stage.SOLVE, [0, 1]),  # an even window, then an odd one that anchors to its neighbours
], ids=["segment", "link", "solve"])
def test_batch_rerun_after_its_rows_were_written_equals_a_clean_run(
    database: Any, six_frames: dict[str, Path], clean: dict[Stage, Tables], tmp_path: Path,
    stage: Stage, batches: list[int]
) -> None:
    got, log = _run(database(f"fault_{stage.label}"), six_frames, tmp_path, {stage: batches})
    assert log.count("injected failure") == 0  # raised to the caller, not logged by ultrack
    assert MISSING not in log
    for s in Stage:
        assert got[s] == clean[s], f"after {s.label}"


def test_fault_injection_format(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gridsearch.worker import inject_failure

    once = tmp_path / "once"
    monkeypatch.setenv(FAIL_ENV, f"segment:2::after,solve:*:{once}:after,link:1")
    inject_failure("segment", 2, "before")  # its fault is after the batch ran
    inject_failure("segment", 1, "after")
    with pytest.raises(RuntimeError, match="injected failure in segment batch 2 after it ran"):
        inject_failure("segment", 2, "after")
    with pytest.raises(RuntimeError, match="solve batch 3 after"):
        inject_failure("solve", 3, "after")
    inject_failure("solve", 3, "after")  # once: the file exists now
    with pytest.raises(RuntimeError, match=r"injected failure in link batch 1$"):
        inject_failure("link", 1, "before")
