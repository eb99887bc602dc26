"""A batch's own rows in the ultrack database, cleared right before the batch runs: a re-run (a
resubmitted or requeued SLURM task, a worker that died after ultrack's commit but before its
acknowledgement) then starts from what its first run found, and ends as a clean run would.

What one batch of each stage writes (ultrack 0.8.0), and what is cleared:

- segment, frames [b*n, (b+1)*n): nodes and their overlaps. Node ids are a function of the frame,
  so a re-run over left-over nodes hits duplicate keys: on PostgreSQL, in a frame of more than 50
  hierarchies, ultrack logs "SEGMENTS MIGHT BE MISSING", skips the rest of the frame and succeeds;
  otherwise the batch fails. Deleted.
- link, source frames [b*n, (b+1)*n): links out of them, appended without a key. Deleted.
- solve, window b of size W: `selected` and `parent_id` of some nodes in slices [b*W-1, (b+1)*W].
  A re-run over its own commit takes it for its neighbours' (ultrack anchors a window to the picks
  committed next to it): it solves a narrower window with its first picks forced, the same answer
  only when the optimum is unique. The end slices are shared with the neighbouring windows of the
  other phase, whose committed picks the window legitimately anchors to: resetting them gives
  another solution (measured). So the window's first run saves the slices as it found them, and
  every re-run restores them.

A batch of None is the whole stage (the in-process executor): all of the stage's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from gridsearch.stages import Stage

# ultrack's tables, only the columns cleared here (importing ultrack's models costs seconds)
_nodes = sa.table("nodes", sa.column("id"), sa.column("t"), sa.column("selected"), sa.column("parent_id"))
_overlaps = sa.table("overlaps", sa.column("node_id"), sa.column("ancestor_id"))
_links = sa.table("links", sa.column("source_id"), sa.column("target_id"))
NO_PARENT = -1  # ultrack.utils.constants.NO_PARENT

_ours = sa.MetaData()
before_t = sa.Table(
    "gs_solve_before",  # a solve window's slices as its first run found them
    _ours,
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("batch", sa.Integer, nullable=False),
    sa.Column("node_id", sa.BigInteger, nullable=False),
    sa.Column("selected", sa.Boolean),
    sa.Column("parent_id", sa.BigInteger),
    sa.Index("gs_solve_before_batch", "run_id", "batch"),
)


@dataclass(frozen=True)
class Batch:
    """One batch as its worker runs it: `frames_per_batch` is ultrack's n_workers."""

    stage: Stage
    index: int | None
    run_id: int
    frames_per_batch: int
    window_size: int | None

    @classmethod
    def of(cls, stage: Stage, index: int | None, run_id: int, cfg: Any) -> Batch:
        """From ultrack's MainConfig as the worker loaded it."""
        n = (cfg.segmentation_config if stage == Stage.SEGMENT else cfg.linking_config).n_workers
        return cls(stage, index, run_id, n, cfg.tracking_config.window_size)

    def frames(self) -> tuple[int, int] | None:
        """[first, last] frames whose rows the batch writes; None: all of them."""
        if self.index is None:
            return None
        if self.stage != Stage.SOLVE:
            n = self.frames_per_batch
            return self.index * n, (self.index + 1) * n - 1
        if self.window_size is None:  # one window: the whole movie
            return None
        w = self.window_size
        return self.index * w - 1, (self.index + 1) * w


def clear_batch(url: str, batch: Batch) -> None:
    """Put the batch's rows back as they were before its first run, in one transaction."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        if not sa.inspect(engine).has_table("nodes"):
            return  # segment batch 0 before it created the tables: nothing written yet
        if batch.stage == Stage.SOLVE and batch.frames() is not None:
            _ensure_before_table(engine)
        with engine.begin() as conn:
            _CLEARS[batch.stage](conn, batch)
    finally:
        engine.dispose()


def forget_saved_windows(url: str) -> None:
    """Saved slices belong to one solve run: every stage clear drops them with the solutions."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        before_t.drop(engine, checkfirst=True)
    finally:
        engine.dispose()


def _in(frames: tuple[int, int] | None) -> sa.ColumnElement[bool]:
    return sa.true() if frames is None else _nodes.c.t.between(*frames)


def _clear_segment(conn: sa.Connection, batch: Batch) -> None:
    ids = sa.select(_nodes.c.id).where(_in(batch.frames())).scalar_subquery()
    conn.execute(sa.delete(_overlaps).where(_overlaps.c.node_id.in_(ids) | _overlaps.c.ancestor_id.in_(ids)))
    if sa.inspect(conn).has_table("links"):
        conn.execute(sa.delete(_links).where(_links.c.source_id.in_(ids) | _links.c.target_id.in_(ids)))
    conn.execute(sa.delete(_nodes).where(_in(batch.frames())))


def _clear_link(conn: sa.Connection, batch: Batch) -> None:
    ids = sa.select(_nodes.c.id).where(_in(batch.frames())).scalar_subquery()
    conn.execute(sa.delete(_links).where(_links.c.source_id.in_(ids)))


def _clear_solve(conn: sa.Connection, batch: Batch) -> None:
    frames = batch.frames()
    if frames is None:  # nothing solved before the only window: reset
        conn.execute(sa.update(_nodes).values(selected=False, parent_id=NO_PARENT))
        return
    mine = (before_t.c.run_id == batch.run_id) & (before_t.c.batch == batch.index)
    if conn.execute(sa.select(before_t.c.node_id).where(mine).limit(1)).first() is None:
        # first run (or slices without nodes: nothing to save, nothing to restore)
        conn.execute(before_t.insert().from_select(
            ["run_id", "batch", "node_id", "selected", "parent_id"],
            sa.select(sa.literal(batch.run_id), sa.literal(batch.index), _nodes.c.id,
                      _nodes.c.selected, _nodes.c.parent_id).where(_in(frames))))
        return
    conn.execute(sa.update(_nodes)
                 .values(selected=before_t.c.selected, parent_id=before_t.c.parent_id)
                 .where(before_t.c.node_id == _nodes.c.id, mine))


_CLEARS = {Stage.SEGMENT: _clear_segment, Stage.LINK: _clear_link, Stage.SOLVE: _clear_solve}


def _ensure_before_table(engine: sa.Engine) -> None:
    """Windows of one phase start together: on PostgreSQL a concurrent CREATE may fail."""
    try:
        before_t.create(engine, checkfirst=True)
    except sa.exc.DBAPIError:
        if not sa.inspect(engine).has_table(before_t.name):
            raise
