"""What the database says about one batch: the confirmation for tasks SLURM no longer remembers,
and the clean-up a failed link batch needs before it runs again (link appends rows: no unique key).

Tolerant: a frame with no foreground legitimately has no nodes, so "no rows" only ever confirms what
SLURM's own task state says; "rows present" only rescues a task SLURM forgot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
import toml

from gridsearch.stages import Stage


def database_url(config_path: Path) -> str:
    """The URL the workers use, from the trial's config.toml (the password comes from PGPASSWORD)."""
    data = toml.load(config_path)["data"]
    if data.get("database", "sqlite") == "sqlite":
        return f"sqlite:///{Path(data['working_dir']).absolute()}/{data.get('database_file_name', 'data.db')}"
    return f"postgresql://{data['address']}"


def frames(stage: Stage, batch: int, cfg: dict[str, Any]) -> tuple[int, int]:
    """[start, stop) of the frames a batch covers (source frames for link)."""
    if stage == Stage.SEGMENT:
        n = int(cfg["segmentation"]["n_workers"])
    elif stage == Stage.LINK:
        n = int(cfg["linking"]["n_workers"])
    else:
        n = int(cfg.get("tracking", {}).get("window_size") or 10**9)
    return batch * n, (batch + 1) * n


def _engine(url: str) -> sa.Engine:
    from sqlalchemy.pool import NullPool

    return sa.create_engine(url, poolclass=NullPool)


def batch_has_rows(config_path: Path, stage: Stage, batch: int) -> bool:
    """segment: nodes in its frames; link: links from its source frames; solve: selected nodes."""
    cfg = toml.load(config_path)
    a, b = frames(stage, batch, cfg)
    if stage == Stage.SEGMENT:
        q = "SELECT count(*) FROM nodes WHERE t >= :a AND t < :b"
    elif stage == Stage.LINK:
        q = ("SELECT count(*) FROM links WHERE source_id IN "
             "(SELECT id FROM nodes WHERE t >= :a AND t < :b)")
    else:
        q = "SELECT count(*) FROM nodes WHERE selected AND t >= :a AND t < :b"
    eng = _engine(database_url(config_path))
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text(q), {"a": a, "b": b}).scalar_one()) > 0
    except sa.exc.SQLAlchemyError:
        return False
    finally:
        eng.dispose()


def drop_link_batch(config_path: Path, batch: int) -> int:
    """Links a failed link batch committed before dying: re-running would duplicate them."""
    cfg = toml.load(config_path)
    a, b = frames(Stage.LINK, batch, cfg)
    eng = _engine(database_url(config_path))
    try:
        with eng.begin() as c:
            r = c.execute(sa.text("DELETE FROM links WHERE source_id IN "
                                  "(SELECT id FROM nodes WHERE t >= :a AND t < :b)"), {"a": a, "b": b})
            return r.rowcount or 0
    except sa.exc.SQLAlchemyError:
        return 0
    finally:
        eng.dispose()
