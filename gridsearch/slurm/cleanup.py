"""Before a failed link batch runs again: drop the links it committed before dying. ultrack's link
appends rows without a unique key, so a re-run would duplicate them (segment and solve re-runs
overwrite their own rows)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool


def _config(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def database_url(config_path: Path) -> str:
    """The URL the workers use, from the trial's config.toml (the password comes from PGPASSWORD)."""
    data = _config(config_path)["data"]
    if data.get("database", "sqlite") == "sqlite":
        return f"sqlite:///{Path(data['working_dir']).absolute()}/{data.get('database_file_name', 'data.db')}"
    return f"postgresql://{data['address']}"


def drop_link_batch(config_path: Path, batch: int) -> int:
    """Delete the links out of the batch's source frames; returns how many there were."""
    n = int(_config(config_path)["linking"]["n_workers"])  # frames per link batch
    engine = sa.create_engine(database_url(config_path), poolclass=NullPool)
    try:
        with engine.begin() as c:
            r = c.execute(sa.text("DELETE FROM links WHERE source_id IN "
                                  "(SELECT id FROM nodes WHERE t >= :a AND t < :b)"),
                          {"a": batch * n, "b": (batch + 1) * n})
            return r.rowcount or 0
    finally:
        engine.dispose()
