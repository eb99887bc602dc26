"""Per-trial export and summary figures, and the results table (one row per trial)."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gridsearch.core.files import atomic_write
from gridsearch.core.trace import phase
from gridsearch.ledger import Ledger, TrialRecord
from gridsearch.spec import Sweep
from gridsearch.stages import Stage

if TYPE_CHECKING:  # pandas is imported where a table is made: `status` and `plan` need none (0.6 s)
    import pandas as pd

FIGURES = [
    "selected_nodes",
    "tracks",
    "divisions",
    "appearances",
    "disappearances",
    "mean_track_length",
]
TIMES = [f"{s.label}_s" for s in Stage]


def warm_up_in_background() -> threading.Thread:
    """ultrack's track-id code is numba-jitted without a disk cache: the first export in a process
    pays ~3 s of compilation. Compiling on a tiny lineage in a thread overlaps that with the first
    stage run, which spends its time in C code (measured in tests/benchmarks/bench_sweep.py)."""
    import numpy as np
    import pandas as pd

    def compile_() -> None:
        with contextlib.suppress(Exception):  # only an optimisation: the export compiles anyway
            from ultrack.tracks.graph import add_track_ids_to_tracks_df

            df = pd.DataFrame({"parent_id": np.array([-1, 1, 2, 2], dtype=np.int64)},
                              index=np.array([1, 2, 3, 4], dtype=np.int64))
            add_track_ids_to_tracks_df(df)

    t = threading.Thread(target=compile_, name="numba-warm-up", daemon=True)
    t.start()
    return t


def export_trial(
    config_path: Path,
    out_dir: Path,
    n_frames: int,
    ground_truth: Path | None = None,
    keep_label_images: bool = True,
) -> tuple[dict[str, float], dict[str, float]]:
    """Export the database's current solution (tracks.csv, and CTC format with ground truth);
    return (summary figures, metrics). Runs right after the trial's solve, before the database
    moves on to the next trial."""
    from ultrack.core.export.tracks_layer import to_tracks_layer

    from gridsearch.runtime import load_config, prepare_ultrack, release_connections

    prepare_ultrack()
    cfg = load_config(config_path)
    try:
        tracks, _graph = to_tracks_layer(cfg)
    finally:
        release_connections()
    atomic_write(out_dir / "tracks.csv", lambda tmp: tracks.to_csv(tmp, index=False))
    figures = summarize(tracks, n_frames)
    metrics: dict[str, float] = {}
    if ground_truth is not None:
        phase("metrics", out_dir.name)
        metrics = score_ctc(cfg, out_dir / "ctc", ground_truth, keep_label_images, empty=tracks.empty)
    return figures, metrics


def score_ctc(cfg: Any, ctc_dir: Path, gt: Path, keep_label_images: bool, empty: bool) -> dict[str, float]:
    """ultrack's to_ctc raises on an empty solution: that trial scores as the CTC scores nothing."""
    from ultrack.core.export.ctc import to_ctc

    from gridsearch import metrics as m

    if ctc_dir.exists():
        shutil.rmtree(ctc_dir)
    if empty:
        ctc_dir.mkdir(parents=True)
        (ctc_dir / "res_track.txt").write_text("")
    else:
        from gridsearch.runtime import release_connections

        try:
            to_ctc(ctc_dir, cfg, overwrite=True)
        finally:
            release_connections()
    scores = m.score(ctc_dir, gt)
    if not keep_label_images:
        for f in ctc_dir.glob("mask*.tif"):
            f.unlink()
    return scores


def summarize(tracks: pd.DataFrame, n_frames: int) -> dict[str, float]:
    """Lineage figures from a napari-style tracks table (track_id, t, …, parent_track_id).

    An appearance is a track with no parent that starts after the first frame; a disappearance a
    track with no children that ends before the last one."""
    if tracks.empty:
        return {k: 0 for k in FIGURES} | {"mean_track_length": 0.0}
    g = tracks.groupby("track_id")["t"].agg(["min", "max", "count"])
    parent = tracks.groupby("track_id")["parent_track_id"].first()
    children = parent[parent >= 0].value_counts()
    has_parent = parent >= 0
    has_children = g.index.isin(children.index)
    return {
        "selected_nodes": len(tracks),
        "tracks": len(g),
        "divisions": int((children >= 2).sum()),
        "appearances": int(((~has_parent) & (g["min"] > 0)).sum()),
        "disappearances": int(((~has_children) & (g["max"] < n_frames - 1)).sum()),
        "mean_track_length": round(float(g["count"].mean()), 6),
    }


_STATES = {"COMPLETE": "done", "FAIL": "failed", "RUNNING": "running"}


def state(rec: TrialRecord | None) -> str:
    """A trial's state as the table says it: done, failed, running or pending (no record yet)."""
    return _STATES.get(rec.state, "pending") if rec else "pending"


def table(sweep: Sweep, ledger: Ledger) -> pd.DataFrame:
    """One row per trial of the current grid, in grid order; figures empty where not computed."""
    return frame(rows(sweep, ledger))


def rows(sweep: Sweep, ledger: Ledger) -> list[dict[str, Any]]:
    """The table's rows as plain dicts (a column a trial has no value for is absent from its row):
    what `results` shows and `best` ranks, without pandas."""
    recs = ledger.records()
    out: list[dict[str, Any]] = []
    for t in sweep.trials:
        rec = recs.get(t.key)
        attrs: Mapping[str, Any] = rec.attrs if rec else {}
        row: dict[str, Any] = {"trial": t.key, "number": t.number}
        row.update(t.params)
        row["state"] = state(rec)
        row["first_stage"] = attrs.get("first_stage")
        for col in TIMES:
            row[col] = attrs.get(col)
        figures = attrs.get("figures") or {}
        for k in FIGURES:
            row[k] = figures.get(k)
        for k, v in (attrs.get("metrics") or {}).items():
            row[k] = v
        row["objective"] = rec.value if rec else None
        row["error"] = attrs.get("error")
        row["optuna_trial"] = rec.number if rec else None
        row["config"] = attrs.get("config")
        row["tracks_csv"] = attrs.get("tracks_csv")
        row["started"] = rec.started if rec else None
        row["finished"] = rec.finished if rec else None
        row["solver"] = attrs.get("solver")
        row["ultrack"] = attrs.get("ultrack")
        row["gridsearch"] = attrs.get("gridsearch")
        out.append(row)
    return out


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column of the rows, in the order they first appear (as pandas makes them)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns(rows))
    for col in [*TIMES, "objective"]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def write(df: pd.DataFrame, path: Path) -> None:
    """Format by extension; written to a temp file first so a reader never sees half a table."""
    ext = path.suffix.lower()
    if ext == ".csv":
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    elif ext == ".parquet":
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    elif ext == ".json":
        text = df.to_json(orient="records", date_format="iso", date_unit="us")
        atomic_write(path, json.dumps(json.loads(text), indent=1))
    elif ext in (".md", ".markdown"):
        atomic_write(path, df.to_markdown(index=False))
    else:
        raise ValueError(f"{path}: unknown format {ext!r}; use .csv, .parquet, .json or .md")
