"""Pictures of a sweep: what each parameter does to the objective, which pairs interact, which
parameters matter, and where the time went. PNG files, made headless (Agg), one figure at a time."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gridsearch.importance import completed as _completed
from gridsearch.importance import importances
from gridsearch.importance import label as _label
from gridsearch.results import TIMES

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

DPI = 110
BARS_UP_TO = 300  # trials; beyond, stage times are drawn as cumulative stacked areas
_STAGE_COLORS = {"segment_s": "#4c72b0", "link_s": "#dd8452", "solve_s": "#55a868"}


@dataclass(frozen=True)
class _Axis:
    """How one swept parameter is drawn: its levels in order, and whether the axis is numeric."""

    key: str
    levels: list[Any]
    numeric: bool
    log: bool

    @property
    def labels(self) -> list[str]:
        return [_label(v) for v in self.levels]

    def codes(self, values: pd.Series) -> np.ndarray:
        index = {_label(v): i for i, v in enumerate(self.levels)}
        return np.array([index.get(_label(v), -1) for v in values], dtype=int)


def _axis(df: pd.DataFrame, key: str) -> _Axis:
    """Numbers keep a numeric axis (log when they span decades); anything else is categorical, in
    the order the grid lists it."""
    raw = list(dict.fromkeys(_hashable(v) for v in df[key]))
    numeric = bool(raw) and all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
        and math.isfinite(float(v))
        for v in raw
    )
    if numeric:
        levels = sorted(raw, key=float)
        lo, hi = float(levels[0]), float(levels[-1])
        log = lo > 0 and len(levels) >= 3 and hi / lo >= 50
        return _Axis(key, levels, True, log)
    return _Axis(key, raw, False, False)


def _hashable(v: Any) -> Any:
    if isinstance(v, list | dict):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _counts_note(df: pd.DataFrame, done: pd.DataFrame) -> str:
    states = df["state"].value_counts().to_dict() if "state" in df.columns else {}
    parts = [f"{len(done)} of {len(df)} trials"]
    for s in ("failed", "running", "pending"):
        if states.get(s):
            parts.append(f"{states[s]} {s}")
    no_value = int(states.get("done", 0)) - len(done)
    if no_value > 0:
        parts.append(f"{no_value} without a value")
    return ", ".join(parts)


def _x_positions(ax_spec: _Axis, values: pd.Series) -> np.ndarray:
    if ax_spec.numeric:
        return values.astype(float).to_numpy()
    return ax_spec.codes(values).astype(float)


def _jitter(ax_spec: _Axis, x: np.ndarray) -> np.ndarray:
    """Deterministic spread, centred on each value, so trials sharing a value stay visible."""
    if len(x) == 0:
        return x
    size = pd.Series(x).groupby(x).transform("size").to_numpy()
    # seeded, not by row order: grid order would draw each column as a slanted line
    offs = np.where(size > 1, np.random.default_rng(0).uniform(-1, 1, len(x)), 0.0)
    if not ax_spec.numeric:
        return x + offs * 0.15
    if ax_spec.log:
        span = math.log10(float(ax_spec.levels[-1]) / float(ax_spec.levels[0]))
        return x * 10 ** (offs * 0.02 * span)
    lv = np.array(ax_spec.levels, dtype=float)
    step = float(np.min(np.diff(lv))) if len(lv) > 1 else max(abs(float(lv[0])), 1.0)
    return x + offs * 0.04 * step


def plot_objective_vs(
    df: pd.DataFrame, key: str, objective: str, out: Path, best_key: str | None = None
) -> Path:
    """Every trial as a point, the mean (and best) per value as lines: the slope says whether the
    grid should extend further in that direction."""
    import matplotlib.pyplot as plt

    done = _completed(df, objective)
    spec = _axis(df, key)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(spec.levels) + 3), 4))
    if done.empty:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes)
    else:
        x = _x_positions(spec, done[key])
        y = done["_y"].to_numpy()
        ax.scatter(_jitter(spec, x), y, s=22, alpha=0.55, color="#4c72b0", label="trial",
                   zorder=2)
        g = pd.DataFrame({"x": x, "y": y}).groupby("x")["y"].agg(["mean", "max"]).sort_index()
        ax.plot(g.index, g["mean"], "-o", color="#c44e52", lw=2, ms=5, label="mean", zorder=3)
        ax.plot(g.index, g["max"], "--", color="#8c8c8c", lw=1, label="best", zorder=1)
        if best_key is not None and best_key in set(done["trial"]):
            b = done[done["trial"] == best_key].iloc[0]
            bx = _x_positions(spec, pd.Series([b[key]]))[0]
            ax.scatter([bx], [b["_y"]], marker="*", s=180, color="#dd8452", edgecolor="k",
                       zorder=4, label=f"best trial {best_key}")
        ax.legend(fontsize=8, loc="best")
    if spec.numeric:
        if spec.log:
            ax.set_xscale("log")
        if len(spec.levels) <= 12:
            ax.set_xticks([float(v) for v in spec.levels], spec.labels)
            ax.minorticks_off()
    else:
        ax.set_xticks(range(len(spec.levels)), spec.labels, rotation=30 if len(spec.levels) > 6 else 0)
        ax.set_xlim(-0.5, len(spec.levels) - 0.5)
    ax.set_xlabel(key)
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.set_title(f"{objective} vs {key}\n({_counts_note(df, done)})", fontsize=10)
    return _save(fig, out)


def plot_heatmap(df: pd.DataFrame, a: str, b: str, objective: str, out: Path) -> Path:
    """Mean and max over every other parameter, side by side: the mean shows how forgiving a
    region is, the max whether some setting of the others rescues it."""
    import matplotlib.pyplot as plt

    done = _completed(df, objective)
    sa, sb = _axis(df, a), _axis(df, b)
    ca, cb = sa.codes(done[a]), sb.codes(done[b])
    grids = {}
    for agg in ("mean", "max"):
        m = np.full((len(sb.levels), len(sa.levels)), np.nan)
        if not done.empty:
            g = pd.DataFrame({"a": ca, "b": cb, "y": done["_y"].to_numpy()}).groupby(["b", "a"])["y"]
            for (ib, ia), v in getattr(g, agg)().items():
                if ib >= 0 and ia >= 0:
                    m[ib, ia] = v
        grids[agg] = m
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cw = max(0.55, min(1.0, 8 / max(len(sa.levels), 1)))
    w = max(3.5, cw * len(sa.levels) + 1.5)
    h = max(3.0, cw * len(sb.levels) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * w + 1, h), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: no trial in that cell
    annotate = len(sa.levels) * len(sb.levels) <= 400
    im = None
    for ax, (agg, m) in zip(axes, grids.items(), strict=True):
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower",
                       aspect="auto")
        ax.set_xticks(range(len(sa.levels)), sa.labels, rotation=45 if len(sa.levels) > 5 else 0,
                      fontsize=8)
        ax.set_yticks(range(len(sb.levels)), sb.labels, fontsize=8)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.set_title(f"{agg} {objective}", fontsize=10)
        if annotate:
            mid = (vmin + vmax) / 2
            for (ib, ia), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(ia, ib, f"{v:.3g}" if abs(v) >= 1000 else f"{v:.3f}", ha="center",
                            va="center", fontsize=7 if len(sa.levels) > 6 else 9,
                            color="white" if v < mid else "black")
    assert im is not None
    fig.colorbar(im, ax=list(axes), shrink=0.85, label=objective)
    fig.suptitle(f"{objective} over {a} × {b} (other parameters aggregated; {len(done)} trials)",
                 fontsize=10)
    return _save(fig, out)


def plot_importance(
    df: pd.DataFrame, study: optuna.Study | None, grid_keys: Sequence[str], objective: str, out: Path
) -> Path:
    import matplotlib.pyplot as plt

    imp, how = importances(df, study, grid_keys, objective)
    order = sorted(imp, key=lambda k: imp[k])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.45 * len(order) + 1.5)))
    bars = ax.barh(order, [imp[k] for k in order], color="#4c72b0")
    for bar, k in zip(bars, order, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {imp[k]:.2f}", va="center",
                fontsize=8)
    ax.set_xlim(0, max(1.0, max(imp.values(), default=0) * 1.15))
    ax.set_xlabel(f"importance for {objective} (sums to 1)")
    ax.set_title(f"Parameter importance\n{how}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def plot_stage_times(df: pd.DataFrame, out: Path) -> Path:
    """Per trial in run order: what each stage cost, a missing segment meaning its result was
    reused from the trial before. The right panel sums it up: this is where reuse pays."""
    import matplotlib.pyplot as plt

    cols = [c for c in TIMES if c in df.columns]
    has_time = df[cols].notna().any(axis=1) if cols else pd.Series(False, index=df.index)
    runs = df[has_time].copy()
    by_run = "optuna_trial" in runs.columns and runs["optuna_trial"].notna().all()
    order = "optuna_trial" if by_run else "number"
    runs = runs.sort_values(order, kind="mergesort")
    n = len(runs)
    fig, (ax, axt) = plt.subplots(
        1, 2, figsize=(min(18.0, max(7.0, 0.28 * n + 4)), 4.5), width_ratios=[4, 1],
        constrained_layout=True,
    )
    x = np.arange(n)
    bottom = np.zeros(n)
    many = n > BARS_UP_TO  # bars would be sub-pixel (and 30,000 patches took 45 s): cumulative areas
    for c in cols:
        v = pd.to_numeric(runs[c], errors="coerce").fillna(0.0).to_numpy(dtype=float)
        color, label = _STAGE_COLORS.get(c), c.removesuffix("_s")
        if many:
            v = np.cumsum(v)
            ax.fill_between(x, bottom, bottom + v, linewidth=0, color=color, label=label)
        else:
            ax.bar(x, v, bottom=bottom, width=0.85, linewidth=0, color=color, label=label)
        bottom += v
    if n == 0:
        ax.text(0.5, 0.5, "no stage has run yet", ha="center", va="center", transform=ax.transAxes)
    elif n <= 60:
        ax.set_xticks(x, runs["trial"].astype(str), rotation=90, fontsize=7, family="monospace")
    ax.set_xlabel("trials in run order" + ("" if n <= 60 else f" ({n})"))
    ax.set_ylabel("cumulative wall seconds" if many else "wall seconds")
    ax.set_title("Stage time, cumulative over trials (flat = stage result reused)" if many
                 else "Stage time per trial (no bar = stage result reused)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    _stage_totals(axt, runs, cols)
    return _save(fig, out)


def _stage_totals(axt: Any, runs: pd.DataFrame, cols: list[str]) -> None:
    """The right panel: each stage's total over the sweep, figures in a text block below."""
    totals = [float(pd.to_numeric(runs[c], errors="coerce").sum()) if len(runs) else 0.0 for c in cols]
    counts = [int(runs[c].notna().sum()) if len(runs) else 0 for c in cols]
    base = 0.0
    for c, t in zip(cols, totals, strict=True):
        axt.bar([0], [t], bottom=base, color=_STAGE_COLORS.get(c), width=0.6)
        base += t
    # the figures go in a text block below, so they never overlap a thin segment
    lines = [f"{c.removesuffix('_s')}: {t:.1f} s, {k} run(s)" for c, t, k in zip(cols, totals, counts,
                                                                               strict=True)]
    axt.set_xticks([])
    axt.set_xlim(-0.6, 0.6)
    axt.set_title(f"total {sum(totals):.1f} s", fontsize=10)
    axt.set_xlabel("\n".join(lines), fontsize=8)
    axt.grid(axis="y", alpha=0.3)


def plot_all(
    df: pd.DataFrame,
    study: optuna.Study | None,
    grid_keys: Sequence[str],
    objective: str,
    out_dir: Path | str,
) -> list[Path]:
    """Every picture for a results table, written into out_dir; returns the files in a fixed order
    (objective per parameter, heat maps per pair, importance, stage times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gridsearch.best import best_trial

    if objective not in df.columns:
        raise ValueError(f"no column {objective!r} in the results table: nothing to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in grid_keys if k in df.columns]
    try:
        best_key: str | None = str(best_trial(df.to_dict("records"), objective)["trial"])
    except ValueError:
        best_key = None
    files: list[Path] = []
    with plt.rc_context({"figure.max_open_warning": 0}):
        for k in keys:
            files.append(plot_objective_vs(df, k, objective, out_dir / _safe(f"objective_vs_{k}.png"),
                                           best_key))
        for a, b in itertools.combinations(keys, 2):
            files.append(plot_heatmap(df, a, b, objective, out_dir / _safe(f"heatmap_{a}__{b}.png")))
        files.append(plot_importance(df, study, keys, objective, out_dir / "importance.png"))
        files.append(plot_stage_times(df, out_dir / "stage_times.png"))
    return files
