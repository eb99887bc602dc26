"""The winner of a sweep: which trial, why, and its ultrack config ready for the full dataset."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import toml

# gridsearch sets these per executor (frames per batch, not results): the user's machine decides.
_EXECUTION_FIELDS = {"segmentation": ("n_workers",), "linking": ("n_workers",)}
_TIE_ATOL = 1e-12


def _ranked(df: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Completed trials with a finite objective, best first; equal values keep grid order so the
    choice is the same on every run and on every machine."""
    if objective not in df.columns:
        raise ValueError(f"no column {objective!r} in the results table: nothing to rank by")
    done = df[df["state"] == "done"] if "state" in df.columns else df
    values = pd.to_numeric(done[objective], errors="coerce").astype(float)
    keep = np.isfinite(values.to_numpy(dtype=float))
    ranked = done.loc[keep].assign(_value=values.loc[keep])
    return ranked.sort_values(["_value", "number"], ascending=[False, True], kind="mergesort")


def best_trial(df: pd.DataFrame, objective: str) -> pd.Series:
    """The completed row with the highest objective (every objective is maximised); ties go to the
    lowest grid `number`. Raises ValueError (one line) when nothing completed with a value."""
    ranked = _ranked(df, objective)
    if ranked.empty:
        states = df["state"].value_counts().to_dict() if "state" in df.columns and len(df) else {}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
        raise ValueError(f"no completed trial with a {objective} value yet ({counts})")
    return df.loc[ranked.index[0]]


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _margin(m: float) -> str:
    return f"{m:+.3f}" if m == 0 or abs(m) >= 0.0005 else f"{m:+.2e}"


def _params(row: pd.Series, grid_keys: Sequence[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in grid_keys if k in row.index)


def why(row: pd.Series, df: pd.DataFrame, objective: str, grid_keys: Sequence[str]) -> str:
    """One line a person can paste into a lab notebook: the value, how close the next trial came,
    and the parameters. Ties are said as ties (a margin of +0.000 would hide that the choice was
    made by grid order), with the best strictly lower trial as the real margin."""
    ranked = _ranked(df, objective)
    value = float(row[objective])
    head = f"trial {row['trial']} wins: {objective} {_num(value)}"
    params = _params(row, grid_keys)
    others = ranked[ranked["trial"] != row["trial"]]
    if others.empty:
        return f"{head}, the only completed trial; {params}"
    tied = others[(others["_value"] - value).abs() <= _TIE_ATOL]
    below = others[others["_value"] < value - _TIE_ATOL]
    if tied.empty:
        r = others.iloc[0]
        return (
            f"{head} vs {_num(r['_value'])} (runner-up {r['trial']}, "
            f"{_margin(value - r['_value'])}); {params}"
        )
    names = ", ".join(tied["trial"].head(3)) + (", …" if len(tied) > 3 else "")
    nxt = (
        f"next best {_num(below.iloc[0]['_value'])} ({below.iloc[0]['trial']}, "
        f"{_margin(value - below.iloc[0]['_value'])})"
        if not below.empty
        else "no trial scored lower"
    )
    return (
        f"{head}, tied with {len(tied)} other trial(s) ({names}), first in grid order; "
        f"{nxt}; {params}"
    )


def best_config_toml(row: pd.Series) -> str:
    """The trial's complete ultrack config (every default spelled out, as it ran), minus what
    belonged to the sweep rather than to the method: the [data] section (the sweep's working dir
    and database) and the executor's n_workers. ultrack's defaults fill both in when it loads."""
    path = row.get("config")
    key = row.get("trial", "?")
    if not isinstance(path, str | Path) or not Path(path).is_file():
        raise ValueError(f"trial {key}: its config.toml ({path}) is missing; was the sweep's workdir moved?")
    with open(path, "rb") as f:
        cfg: dict[str, Any] = tomllib.load(f)
    cfg.pop("data", None)
    for section, fields in _EXECUTION_FIELDS.items():
        for f in fields:
            cfg.get(section, {}).pop(f, None)
    value = row.get("objective")
    score = f" (objective {_num(float(value))})" if value is not None and pd.notna(value) else ""
    header = (
        f"# Ultrack config of gridsearch trial {key}{score}, from {path}\n"
        "# No [data] section: add one (working_dir, database) for your run, or use ultrack's defaults.\n"
        "# n_workers is left at ultrack's default: set it for your machine (it does not change results).\n\n"
    )
    return header + toml.dumps(cfg)
