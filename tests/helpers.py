"""Helpers the tests share: sweep files on the test movie, comparable result tables. Fixtures live in
conftest.py; these are plain functions, imported as `from helpers import ...`."""

from __future__ import annotations

import textwrap
from pathlib import Path

EXAMPLE_GRID = """\
grid:
  segmentation.min_area: [30, 60]
  linking.max_distance: [6.0, 15.0]
  tracking.appear_weight: [-0.1, -0.5, -1.0]
"""


def pg_available() -> bool:
    from gridsearch.postgres import PostgresError, find_binaries

    try:
        find_binaries()
    except PostgresError:
        return False
    return True


def lab_rows(creds, query: str, params: tuple = ()) -> list:  # type: ignore[no-untyped-def,type-arg]
    """First column of ``query``'s rows in the `lab` fixture's database."""
    import psycopg

    with psycopg.connect(host=creds.host, port=creds.port, user=creds.user, password=creds.password,
                         dbname="lab") as conn:
        return [r[0] for r in conn.execute(query, params or None).fetchall()]


def lab_database(server_port: int, dbname: str = "lab") -> str:
    """The sweep file's database section for the `lab` fixture's server (an existing server)."""
    return (f"database: {{kind: postgresql, host: 127.0.0.1, port: {server_port}, user: gridsearch, "
            f"dbname: {dbname}}}\nexecutor: {{kind: local, workers: 1}}\n")


def write_spec(
    directory: Path,
    movie: dict[str, Path],
    *,
    name: str = "t",
    grid: str = EXAMPLE_GRID,
    extra: str = "",
    base: str = "config:\n  segmentation: {max_area: 1000}\n  tracking: {solver_name: CBC}\n",
    data: str | None = None,
) -> Path:
    """`data`: the data section's lines instead of the movie's foreground and contours."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (
        f"name: {name}\nworkdir: runs/{name}\n"
        + (data or f"data:\n  foreground: {movie['foreground']}\n  contours: {movie['contours']}\n")
        + base
        + grid
        + textwrap.dedent(extra)
    )
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def serial_table(directory: Path, movie: dict[str, Path], name: str, grid: str):  # type: ignore[no-untyped-def]
    """The results table of the plain serial SQLite sweep of `grid`: what every other way of
    running it must reproduce."""
    from gridsearch import results
    from gridsearch.engine import existing_ledger, run_sweep
    from gridsearch.spec import load

    spec = write_spec(directory, movie, name=name, grid=grid)
    run_sweep(load(spec))
    with existing_ledger(load(spec)) as led:
        return results.table(load(spec), led)


TIME_COLUMNS = ["segment_s", "link_s", "solve_s", "started", "finished", "optuna_trial", "config",
                "tracks_csv"]


def comparable(df):  # type: ignore[no-untyped-def]
    """A results table without what legitimately differs between two runs (times, paths)."""
    return df.drop(columns=[c for c in TIME_COLUMNS if c in df.columns]).reset_index(drop=True)


def blank_last_frames(movie: dict[str, Path], out: Path, n: int) -> dict[str, Path]:
    """A copy of ``movie`` whose last ``n`` frames have no cells: ultrack's database then ends
    earlier than the movie (its link and solve batch counts come from the database)."""
    import zarr

    out.mkdir(parents=True, exist_ok=True)
    blank = {}
    for key in ("foreground", "contours"):
        src = zarr.open_array(str(movie[key]), mode="r")
        data = src[:]
        data[-n:] = 0
        blank[key] = out / f"{key}.zarr"
        copy = zarr.create_array(store=str(blank[key]), shape=data.shape, chunks=src.chunks, dtype=data.dtype)
        copy[:] = data
    return blank
