"""Our tables carry a schema version: an older workdir is upgraded by the driver (and refused by
views), a newer one refused in one line; and the worker's acknowledgement is what trusts a stage."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import write_spec

from gridsearch.acks import BatchCost, acknowledge
from gridsearch.cli import main
from gridsearch.ledger import Ledger, LedgerError
from gridsearch.schema import SCHEMA_VERSION, SchemaMismatch
from gridsearch.stages import Stage

# The tables of a workdir written before the schema was versioned (gridsearch 0.1, main of issue 5).
V0_DDL = """
CREATE TABLE gs_meta (key VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE gs_db_state (database VARCHAR(128) NOT NULL PRIMARY KEY, segment_fp VARCHAR(64),
  link_fp VARCHAR(64), solve_fp VARCHAR(64), updated_at FLOAT NOT NULL);
CREATE TABLE gs_stage_run (id INTEGER NOT NULL PRIMARY KEY, trial_key VARCHAR(32) NOT NULL,
  database VARCHAR(128) NOT NULL, stage VARCHAR(16) NOT NULL, fingerprint VARCHAR(64) NOT NULL,
  state VARCHAR(16) NOT NULL, batches_total INTEGER NOT NULL, batches_done INTEGER NOT NULL,
  started_at FLOAT NOT NULL, finished_at FLOAT, wall_s FLOAT, host VARCHAR(128), error TEXT);
CREATE TABLE gs_slurm_job (id INTEGER NOT NULL PRIMARY KEY, trial_key VARCHAR(32) NOT NULL,
  stage VARCHAR(16) NOT NULL, phase INTEGER NOT NULL, job_id VARCHAR(32) NOT NULL, indices TEXT NOT NULL,
  "offset" INTEGER NOT NULL, attempt INTEGER NOT NULL, state VARCHAR(16) NOT NULL,
  submitted_at FLOAT NOT NULL);
INSERT INTO gs_meta VALUES ('name', 'old');
INSERT INTO gs_db_state VALUES ('main', 'seg', 'lnk', NULL, 0);
INSERT INTO gs_stage_run VALUES (1, 'k', 'main', 'segment', 'seg', 'done', 1, 1, 0, 1, 1, 'h', NULL);
INSERT INTO gs_slurm_job VALUES (1, 'k', 'link', 0, '77', '0-3', 0, 0, 'active', 0);
"""


def _v0(path: Path) -> str:
    with sqlite3.connect(path) as c:
        c.executescript(V0_DDL)
    return f"sqlite:///{path}"


def _version(path: Path) -> str:
    with sqlite3.connect(path) as c:
        return c.execute("select value from gs_meta where key='schema_version'").fetchone()[0]


def test_fresh_ledger_records_the_version(tmp_path: Path) -> None:
    led = Ledger(f"sqlite:///{tmp_path / 's.db'}", "s")
    led.close()
    assert _version(tmp_path / "s.db") == str(SCHEMA_VERSION)


def test_v0_workdir_is_migrated_keeping_what_it_trusted(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    url = _v0(db)
    with pytest.raises(SchemaMismatch, match=r"older gridsearch .*run `gridsearch sweep`"):
        Ledger(url, "old", read_only=True)
    led = Ledger(url, "old")
    try:
        assert led.held("main") == {Stage.SEGMENT: "seg", Stage.LINK: "lnk", Stage.SOLVE: None}
        assert [r["state"] for r in led.stage_runs()] == ["done"]
        with led.engine.connect() as c:
            cols = {col["name"] for col in sa.inspect(c).get_columns("gs_stage_run")}
            job = c.execute(sa.text("select state, run_id from gs_slurm_job")).one()
            slurm_cols = {col["name"] for col in sa.inspect(c).get_columns("gs_slurm_job")}
        assert "batches_done" not in cols
        assert tuple(job) == ("closed", None)  # v0 arrays know no run: never re-attached
        assert {"run_id", "frames_per_batch", "per_task"} <= slurm_cols
    finally:
        led.close()
    assert _version(db) == str(SCHEMA_VERSION)


def test_newer_workdir_is_refused_in_one_line(tmp_path: Path, movie: dict[str, Path]) -> None:
    spec = write_spec(tmp_path, movie, name="newer")
    workdir = tmp_path / "runs" / "newer"
    workdir.mkdir(parents=True)
    with sqlite3.connect(workdir / "state.db") as c:
        c.executescript(V0_DDL)
        c.execute("insert into gs_meta values ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
    for cmd in (["sweep", "-q"], ["status"]):
        r = CliRunner().invoke(main, [*cmd, str(spec)])
        assert r.exit_code == 2, r.output
        assert "newer gridsearch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_stage_is_trusted_only_with_every_batch_acknowledged(tmp_path: Path) -> None:
    led = Ledger(f"sqlite:///{tmp_path / 's.db'}", "s")
    try:
        fps = {s: f"fp-{s.label}" for s in Stage}
        runs = led.open_stage_runs("main", "k", fps, [Stage.SEGMENT], {})
        run = runs[Stage.SEGMENT]
        led.start_stage(run, 2)
        acknowledge(led.engine, run, 0, BatchCost(1.0, 0.5, 100.0))
        with pytest.raises(LedgerError, match="1 of 2 batches acknowledged"):
            led.finish_stage(run, "main", Stage.SEGMENT, fps[Stage.SEGMENT])
        assert led.held("main")[Stage.SEGMENT] is None
        # a batch with no cells is complete when its worker says so: no row count is consulted
        acknowledge(f"sqlite:///{tmp_path / 's.db'}", run, 1, BatchCost(1.0, 0.5, 100.0))
        acknowledge(led.engine, run, 1, BatchCost(9.0, 9.0, 9.0))  # idempotent: first record kept
        assert led.acked([run]) == {run: {0, 1}}
        led.finish_stage(run, "main", Stage.SEGMENT, fps[Stage.SEGMENT])
        assert led.held("main")[Stage.SEGMENT] == fps[Stage.SEGMENT]
        # a stage that ran no batch at all computed nothing: never trusted
        empty = led.open_stage_runs("main", "k", fps, [Stage.LINK], {})[Stage.LINK]
        led.start_stage(empty, 0)
        with pytest.raises(LedgerError, match="0 of 0 batches"):
            led.finish_stage(empty, "main", Stage.LINK, fps[Stage.LINK])
        assert led.stage_runs()[0]["batches_done"] == 2
    finally:
        led.close()


def test_runs_opened_up_front_are_abandoned_not_interrupted_when_never_started(tmp_path: Path) -> None:
    """Every stage run of a trial exists before its first batch (workers must know the run they
    acknowledge); those that never started are no interrupted work."""
    led = Ledger(f"sqlite:///{tmp_path / 's.db'}", "s")
    try:
        fps = {s: f"fp-{s.label}" for s in Stage}
        runs = led.open_stage_runs("main", "k", fps, list(Stage), {})
        led.start_stage(runs[Stage.SEGMENT], 1)
        assert led.recover() == 1  # the driver died in segment; link and solve never started
        assert [r["state"] for r in led.stage_runs()] == ["interrupted", "abandoned", "abandoned"]
        runs = led.open_stage_runs("main", "k", fps, list(Stage), {})
        led.start_stage(runs[Stage.SEGMENT], 1)
        led.abandon_queued(runs.values())
        for run in runs.values():
            led.fail_stage(run, "segment batch 0 failed")
        states = [r["state"] for r in led.stage_runs()][3:]
        assert states == ["failed", "abandoned", "abandoned"]
    finally:
        led.close()


def test_v2_workdir_is_migrated_and_its_acks_still_count(tmp_path: Path) -> None:
    """v3 adds the cost columns to gs_batch; a v2 ack (no frames, no start-up) stays the proof its
    batch is complete, and the cost model leaves it out."""
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    led = Ledger(url, "s")
    fps = {s: f"fp-{s.label}" for s in Stage}
    run = led.open_stage_runs("main", "k", fps, [Stage.SEGMENT], {})[Stage.SEGMENT]
    led.start_stage(run, 2)
    led.close()
    with sqlite3.connect(db) as c:  # back to v2: gs_batch as gridsearch 0.2 wrote it
        for col in ("frames", "startup_s", "paid_startup"):
            c.execute(f"ALTER TABLE gs_batch DROP COLUMN {col}")
        c.execute("INSERT INTO gs_batch (run_id, batch, finished_at, wall_s, cpu_s, max_rss_mb, host) "
                  "VALUES (?, 0, 0, 1.0, 1.0, 100.0, 'h')", (run,))
        c.execute("UPDATE gs_meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match=r"older gridsearch \(schema v2\)"):
        Ledger(url, "s", read_only=True)
    led = Ledger(url, "s")
    try:
        assert _version(db) == str(SCHEMA_VERSION) == "4"
        cost = BatchCost(2.0, 3.0, 200.0, frames=4, startup_s=5.0, paid_startup=True)
        acknowledge(led.engine, run, 1, cost)
        assert led.acked([run]) == {run: {0, 1}}
        led.finish_stage(run, "main", Stage.SEGMENT, fps[Stage.SEGMENT])
        assert led.measured_batches() == [{"stage": "segment", "wall_s": 2.0, "cpu_s": 3.0,
                                           "max_rss_mb": 200.0, "frames": 4, "startup_s": 5.0,
                                           "paid_startup": True}]
    finally:
        led.close()
