"""One ultrack database: where it lives, its config.toml, and how to clear it for a stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from gridsearch.core.files import atomic_write
from gridsearch.rerun import forget_saved_windows
from gridsearch.stages import Stage

# ultrack writes this next to the database (not in it); solve and export need it.
METADATA = "metadata.toml"


@dataclass
class UltrackDB:
    """`name` is the ledger's key for this database; `working_dir` holds metadata.toml (and data.db)."""

    name: str
    working_dir: Path
    kind: str = "sqlite"  # sqlite | postgresql
    address: str | None = None  # user@host:port/dbname: never the password (libpq reads PGPASSWORD)

    def data_section(self) -> dict[str, Any]:
        sec: dict[str, Any] = {"working_dir": str(self.working_dir), "database": self.kind}
        if self.kind == "sqlite":
            sec["database_file_name"] = "data.db"
        else:
            sec["address"] = self.address
        return sec

    def config_dict(self, sections: dict[str, dict[str, Any]], frames_per_batch: int) -> dict[str, Any]:
        """A complete ultrack config.toml for this database; n_workers = frames per batch."""
        cfg = {k: dict(v) for k, v in sections.items()}
        cfg["segmentation"]["n_workers"] = frames_per_batch
        cfg["linking"]["n_workers"] = frames_per_batch
        cfg["data"] = self.data_section()
        return cfg

    def write_config(self, sections: dict[str, dict[str, Any]], frames_per_batch: int, path: Path) -> Path:
        return atomic_write(path, toml.dumps(_drop_none(self.config_dict(sections, frames_per_batch))))

    def clear(self, stage: Stage) -> None:
        """What `ultrack clear_database` does for the stage, with ultrack's own functions."""
        from gridsearch.runtime import release_connections

        try:
            self._clear(stage)
        finally:
            release_connections()

    def _clear(self, stage: Stage) -> None:
        from ultrack.core.database import Base, clear_all_data
        from ultrack.core.linking.utils import clear_linking_data
        from ultrack.core.solve.sqltracking import SQLTracking

        from gridsearch.runtime import prepare_ultrack

        prepare_ultrack()
        url = self.database_url()
        self.working_dir.mkdir(parents=True, exist_ok=True)
        forget_saved_windows(url)
        if stage == Stage.SEGMENT:
            clear_all_data(url)
            (self.working_dir / METADATA).unlink(missing_ok=True)
            return
        if not self._has_tables(Base):
            raise RuntimeError(f"database {self.name} has no nodes table: cannot run {stage.label}")
        if stage == Stage.LINK:
            clear_linking_data(url)
        else:
            SQLTracking.clear_solution_from_database(url)

    def database_url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.working_dir.absolute()}/data.db"
        return f"postgresql://{self.address}"

    def _has_tables(self, base: Any) -> bool:
        import sqlalchemy as sa

        eng = sa.create_engine(self.database_url())
        try:
            return sa.inspect(eng).has_table("nodes")
        finally:
            eng.dispose()


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: ultrack's defaults for optional fields are None, so leaving them out is exact."""
    return {
        k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None
    }
