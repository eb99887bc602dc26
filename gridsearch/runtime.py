"""The ultrack runtime: one stage batch through ultrack's Python API (no Qt), its inputs cached, its
output kept out of our terminal, its database connections released.

Everything that calls ultrack goes through here: the worker (in the driver, in a pool process, in a
SLURM task), the database clears and the exports."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from gridsearch.rerun import Batch, clear_batch
from gridsearch.stages import Stage, batch_count


@contextlib.contextmanager
def fd_redirect(log: Path) -> Iterator[None]:
    """ultrack, tqdm and the CBC solver write to fds 1 and 2 directly: send both to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@lru_cache(maxsize=4)
def _array(path: str) -> Any:
    import zarr

    return zarr.open(path, mode="r")


@lru_cache(maxsize=64)
def _config(path: str, mtime_ns: int) -> Any:
    from ultrack.config.config import load_config

    return load_config(path)


def load_config(path: str | Path) -> Any:
    p = str(path)
    return _config(p, os.stat(p).st_mtime_ns)


_PATCHED = False
_ENGINES: list[Any] = []


def prepare_ultrack() -> None:
    """ultrack creates a pooled engine per call and never disposes it: against PostgreSQL every call
    would leave connections open until garbage collection, and a few workers exhaust the server's
    slots. Engines made during a batch are remembered and disposed when the batch ends, so a batch
    reuses its connections (SCRAM authentication per connect is not free) and leaves none behind."""
    global _PATCHED
    if _PATCHED:
        return
    import sqlalchemy

    original = sqlalchemy.create_engine

    def create_engine(url: Any, *args: Any, **kwargs: Any) -> Any:
        engine = original(url, *args, **kwargs)
        if not str(url).startswith("sqlite"):
            _ENGINES.append(engine)
        return engine

    sqlalchemy.create_engine = create_engine  # ultrack calls it as `sqla.create_engine`
    _PATCHED = True


def release_connections() -> None:
    while _ENGINES:
        _ENGINES.pop().dispose()


def run_batch(stage: Stage, config_path: str | Path, batch: int | None, run_id: int, foreground: str,
              contours: str) -> None:
    """batch None: the whole stage. The batch's own rows are cleared first (a re-run ends as a clean
    run: gridsearch.rerun); `run_id`, the stage run, keys what a solve window saves for its re-runs."""
    prepare_ultrack()
    try:
        _run(stage, config_path, batch, run_id, foreground, contours)
    finally:
        release_connections()


def _run(stage: Stage, config_path: str | Path, batch: int | None, run_id: int, foreground: str,
         contours: str) -> None:
    import ultrack

    cfg = load_config(config_path)
    if batch is not None and _past_database(stage, cfg, batch):
        return
    clear_batch(cfg.data_config.database_path, Batch.of(stage, batch, run_id, cfg))
    if stage == Stage.SEGMENT:
        ultrack.segment(_array(foreground), _array(contours), cfg, batch_index=batch)
    elif stage == Stage.LINK:
        ultrack.link(cfg, batch_index=batch)
    else:
        ultrack.solve(cfg, batch_index=batch)


def _past_database(stage: Stage, cfg: Any, batch: int) -> bool:
    """Link and solve batches are planned from the movie's length, ultrack counts them from the
    database's last frame with nodes: when the movie's last frames have no cells, the batches past
    ultrack's count have nothing to do (ultrack would fail on their index)."""
    if stage == Stage.SEGMENT:
        return False
    from ultrack.core.database import maximum_time_from_database

    last = maximum_time_from_database(cfg.data_config)
    return batch >= batch_count(stage, last, cfg.linking_config.n_workers, cfg.tracking_config.window_size)


@lru_cache(maxsize=4)
def resolved_solver(name: str) -> str:
    """The solver ultrack's solve uses for `tracking.solver_name`, decided as ultrack decides it
    (MIPSolver.reset): python-mip's Model(solver_name=name), CBC when that raises InterfacingError.
    "" and "GUROBI" both end on CBC without a Gurobi library and licence. Creating the model costs
    about a second (Gurobi's licence check), once per process; its banner goes wherever fd 1 goes."""
    if name.upper() == "CBC":
        return "CBC"
    import mip

    try:
        model = mip.Model(sense=mip.MAXIMIZE, solver_name=name)
    except mip.exceptions.InterfacingError:
        return "CBC"
    except Exception:  # ultrack does not catch these: its solve failed the same way
        return name
    return "GUROBI" if model.solver_name.upper() in ("GRB", "GUROBI") else model.solver_name.upper()
