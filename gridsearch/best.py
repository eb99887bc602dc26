"""The winner of a sweep: which trial, why, and its ultrack config ready for the full dataset."""

from __future__ import annotations

import math
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import toml

# gridsearch sets these per executor (frames per batch, not results): the user's machine decides.
_EXECUTION_FIELDS = {"segmentation": ("n_workers",), "linking": ("n_workers",)}
_TIE_ATOL = 1e-12

Row = Mapping[str, Any]  # a results row (results.rows; a DataFrame's to_dict("records"))


def _number(v: Any) -> float | None:
    """A finite number, or None (missing, NaN, text): what can be ranked."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ranked(rows: Sequence[Row], objective: str) -> list[tuple[float, Row]]:
    """Completed trials with a finite objective, best first; equal values keep grid order so the
    choice is the same on every run and on every machine."""
    if not any(objective in r for r in rows):
        raise ValueError(f"no column {objective!r} in the results table: nothing to rank by")
    ranked = [(x, r) for r in rows if r.get("state", "done") == "done"
              and (x := _number(r.get(objective))) is not None]
    return sorted(ranked, key=lambda xr: (-xr[0], xr[1].get("number", 0)))


def best_trial(rows: Sequence[Row], objective: str) -> Row:
    """The completed row with the highest objective (every objective is maximised); ties go to the
    lowest grid `number`. Raises ValueError (one line) when nothing completed with a value."""
    ranked = _ranked(rows, objective)
    if not ranked:
        states = Counter(r["state"] for r in rows if "state" in r)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
        raise ValueError(f"no completed trial with a {objective} value yet ({counts})")
    return ranked[0][1]


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _margin(m: float) -> str:
    return f"{m:+.3f}" if m == 0 or abs(m) >= 0.0005 else f"{m:+.2e}"


def _params(row: Row, grid_keys: Sequence[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in grid_keys if k in row)


def why(row: Row, rows: Sequence[Row], objective: str, grid_keys: Sequence[str]) -> str:
    """One line a person can paste into a lab notebook: the value, how close the next trial came,
    and the parameters. Ties are said as ties (a margin of +0.000 would hide that the choice was
    made by grid order), with the best strictly lower trial as the real margin."""
    ranked = _ranked(rows, objective)
    value = float(row[objective])
    head = f"trial {row['trial']} wins: {objective} {_num(value)}"
    params = _params(row, grid_keys)
    others = [(x, r) for x, r in ranked if r["trial"] != row["trial"]]
    if not others:
        return f"{head}, the only completed trial; {params}"
    tied = [r["trial"] for x, r in others if abs(x - value) <= _TIE_ATOL]
    below = [(x, r) for x, r in others if x < value - _TIE_ATOL]
    if not tied:
        x, r = others[0]
        return f"{head} vs {_num(x)} (runner-up {r['trial']}, {_margin(value - x)}); {params}"
    names = ", ".join(tied[:3]) + (", …" if len(tied) > 3 else "")
    nxt = (
        f"next best {_num(below[0][0])} ({below[0][1]['trial']}, {_margin(value - below[0][0])})"
        if below
        else "no trial scored lower"
    )
    return (
        f"{head}, tied with {len(tied)} other trial(s) ({names}), first in grid order; "
        f"{nxt}; {params}"
    )


def best_config_toml(row: Row) -> str:
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
    score = f" (objective {_num(x)})" if (x := _number(value)) is not None else ""
    header = (
        f"# Ultrack config of gridsearch trial {key}{score}, from {path}\n"
        "# No [data] section: add one (working_dir, database) for your run, or use ultrack's defaults.\n"
        "# n_workers is left at ultrack's default: set it for your machine (it does not change results).\n\n"
    )
    return header + toml.dumps(cfg)
