"""Our own tables in the ledger database, in one place, with a schema version.

optuna versions its own tables; these are ours: what each ultrack database holds, stage runs, the
batches workers acknowledged, and SLURM's submitted arrays. A workdir lives for months across
upgrades, so the version is stored (``gs_meta.schema_version``) and checked when a ledger opens:
an older workdir is migrated in place by the driver, a newer one is refused in one line.

Version history: 0 = before versioning (no gs_batch; gs_stage_run.batches_done counted batches),
1 = batches acknowledged by their workers (gs_batch), SLURM arrays know their stage run,
2 = SLURM arrays record the frames per batch their task indices mean,
3 = an acknowledgement records its batch's frames and its worker's start-up (the cost model)."""

from __future__ import annotations

import sqlalchemy as sa

from gridsearch.core.errors import BadInput

SCHEMA_VERSION = 4
VERSION_KEY = "schema_version"

metadata = sa.MetaData()

meta_t = sa.Table(
    "gs_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

db_state_t = sa.Table(
    "gs_db_state",
    metadata,
    sa.Column("database", sa.String(128), primary_key=True),
    sa.Column("segment_fp", sa.String(64)),
    sa.Column("link_fp", sa.String(64)),
    sa.Column("solve_fp", sa.String(64)),
    sa.Column("updated_at", sa.Float, nullable=False),
)

stage_run_t = sa.Table(
    "gs_stage_run",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("trial_key", sa.String(32), nullable=False, index=True),
    sa.Column("database", sa.String(128), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    # queued -> running -> done | failed | interrupted
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("batches_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("wall_s", sa.Float),
    sa.Column("host", sa.String(128)),
    sa.Column("error", sa.Text),
)

# One row per batch a worker finished: written by the worker itself, as its last act, in a commit
# of its own. The only evidence that a batch is complete (SLURM forgets finished jobs; a frame
# with no cells legitimately leaves no rows in ultrack's tables).
batch_t = sa.Table(
    "gs_batch",
    metadata,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("batch", sa.Integer, primary_key=True),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("wall_s", sa.Float),
    sa.Column("cpu_s", sa.Float),
    sa.Column("max_rss_mb", sa.Float),
    sa.Column("host", sa.String(128)),
    # v3, NULL in older acks: what the cost model divides by, and what the worker paid to get ready
    sa.Column("frames", sa.Integer),
    sa.Column("startup_s", sa.Float),  # its process's start to ultrack imported
    sa.Column("paid_startup", sa.Boolean),  # this batch was the first its process ran
)

slurm_job_t = sa.Table(
    "gs_slurm_job",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("trial_key", sa.String(32), nullable=False, index=True),
    sa.Column("stage", sa.String(16), nullable=False),  # segment | link | solve
    sa.Column("phase", sa.Integer, nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("indices", sa.Text, nullable=False),  # array indices, compact ranges
    sa.Column("offset", sa.Integer, nullable=False, server_default="0"),  # batch = index + offset
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    # active (its run still owns it) | closed (never re-attach) | cancelled (`gridsearch cancel`)
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("run_id", sa.Integer),  # the stage run whose batches it acknowledges
    # what a task index means (batch b covers frames [b*n, (b+1)*n)): re-attach needs the same n
    sa.Column("frames_per_batch", sa.Integer),
    sa.Column("per_task", sa.Integer),  # batches one task runs in turn (None: 1, before v4)
)


class SchemaMismatch(BadInput):
    """The workdir was written by a gridsearch this one cannot read (or must not upgrade now)."""


def stored_version(conn: sa.Connection) -> int | None:
    """None: no gridsearch tables yet; 0: tables from before the schema was versioned."""
    insp = sa.inspect(conn)
    if not insp.has_table(meta_t.name):
        return None
    value = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == VERSION_KEY)).scalar()
    return 0 if value is None else int(value)


def ensure(engine: sa.Engine, *, migrate: bool = True, where: str = "") -> int:
    """Create or upgrade our tables; refuse a newer workdir. ``migrate=False``: views must not
    write, so an older workdir is refused with the command that upgrades it."""
    where = where or engine.url.render_as_string()
    with engine.begin() as conn:
        version = stored_version(conn)
        if version == SCHEMA_VERSION:
            return version
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"{where}: written by a newer gridsearch (schema v{version}; "
                f"this one reads v{SCHEMA_VERSION}); upgrade gridsearch to open it"
            )
        if version is not None and not migrate:
            raise SchemaMismatch(
                f"{where}: written by an older gridsearch (schema v{version}); "
                "run `gridsearch sweep` on it once to upgrade it"
            )
        for migrate in _MIGRATIONS[version:] if version is not None else ():
            migrate(conn)
        metadata.create_all(conn)
        conn.execute(meta_t.delete().where(meta_t.c.key == VERSION_KEY))
        conn.execute(meta_t.insert().values(key=VERSION_KEY, value=str(SCHEMA_VERSION)))
    return SCHEMA_VERSION


def _migrate_0_to_1(conn: sa.Connection) -> None:
    """v0 counted batches in gs_stage_run.batches_done; v1 keeps one gs_batch row per batch.

    Finished stages stay trusted (their fingerprints in gs_db_state are untouched); unfinished
    runs are recomputed anyway. v0 SLURM rows have no run: they can never be re-attached."""
    insp = sa.inspect(conn)
    if "batches_done" in {c["name"] for c in insp.get_columns(stage_run_t.name)}:
        conn.execute(sa.text("ALTER TABLE gs_stage_run DROP COLUMN batches_done"))
    if insp.has_table(slurm_job_t.name):
        conn.execute(sa.text("ALTER TABLE gs_slurm_job ADD COLUMN run_id INTEGER"))
        conn.execute(sa.text("UPDATE gs_slurm_job SET state = 'closed' WHERE state = 'active'"))


def _migrate_1_to_2(conn: sa.Connection) -> None:
    """Arrays submitted before v2 do not say how many frames a task covers: never re-attached."""
    if sa.inspect(conn).has_table(slurm_job_t.name):
        conn.execute(sa.text("ALTER TABLE gs_slurm_job ADD COLUMN frames_per_batch INTEGER"))
        conn.execute(sa.text("UPDATE gs_slurm_job SET state = 'closed' WHERE state = 'active'"))


def _migrate_2_to_3(conn: sa.Connection) -> None:
    """Acks before v3 have no frames or start-up: the cost model skips them, nothing else reads them."""
    if sa.inspect(conn).has_table(batch_t.name):
        conn.execute(sa.text("ALTER TABLE gs_batch ADD COLUMN frames INTEGER"))
        conn.execute(sa.text("ALTER TABLE gs_batch ADD COLUMN startup_s FLOAT"))
        conn.execute(sa.text("ALTER TABLE gs_batch ADD COLUMN paid_startup BOOLEAN"))


def _migrate_3_to_4(conn: sa.Connection) -> None:
    """Arrays before v4 run one batch per task: NULL reads as 1, so they still re-attach."""
    insp = sa.inspect(conn)
    if insp.has_table(slurm_job_t.name) and "per_task" not in {
            c["name"] for c in insp.get_columns(slurm_job_t.name)}:
        conn.execute(sa.text("ALTER TABLE gs_slurm_job ADD COLUMN per_task INTEGER"))


# _MIGRATIONS[v] upgrades version v to v + 1, in one transaction with the version row
_MIGRATIONS = [_migrate_0_to_1, _migrate_1_to_2, _migrate_2_to_3, _migrate_3_to_4]
