"""What a person looks at after a sweep: the winner, its config, the plots, the exports, the
dashboard. One real sweep (the example grid with ground truth, real ultrack) feeds every test."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import toml
from helpers import write_spec

from gridsearch import dashboard, results
from gridsearch.best import best_config_toml, best_trial, why
from gridsearch.engine import existing_ledger, run_sweep
from gridsearch.importance import importances
from gridsearch.plots import plot_all
from gridsearch.spec import Sweep, load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Swept:
    sweep: Sweep
    df: pd.DataFrame
    plots: list[Path]
    plot_s: float
    importance_method: str


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, movie: dict[str, Path]) -> Swept:
    """The example 2 x 2 x 3 grid with ground truth, run once; plots made while the ledger is open."""
    d = tmp_path_factory.mktemp("views")
    base = (
        f"  ground_truth: {movie['gt']}\n"
        "config:\n  segmentation: {max_area: 1000}\n  tracking: {solver_name: CBC}\n"
    )
    sweep = load(write_spec(d, movie, name="views", base=base))
    out = run_sweep(sweep)
    assert (out.completed, out.failed) == (12, 0)
    with existing_ledger(sweep) as led:
        assert led is not None
        df = results.table(sweep, led)
        t0 = time.perf_counter()
        files = plot_all(df, led.study, sweep.grid_keys, sweep.objective, d / "plots")
        plot_s = time.perf_counter() - t0
        _, method = importances(df, led.study, sweep.grid_keys, sweep.objective)
    return Swept(sweep, df, files, plot_s, method)


# ---- best ----------------------------------------------------------------------------------------
def _rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """best.py ranks plain rows, as `results.rows` gives them (the CLI never loads pandas)."""
    return df.to_dict("records")


def test_best_trial_is_one_that_tracks_the_movie_correctly(swept: Swept) -> None:
    df = swept.df
    assert swept.sweep.objective == "TRA"
    row = best_trial(_rows(df), "TRA")
    assert row["state"] == "done" and row["TRA"] == 1.0
    assert row["segmentation.min_area"] == 60 and row["linking.max_distance"] == 15.0
    # ties go to grid order: the first perfect trial, on every run
    perfect = df[df["TRA"] == 1.0]
    assert row["number"] == perfect["number"].min()


def test_best_trial_refuses_when_nothing_completed(swept: Swept) -> None:
    pending = swept.df.assign(state="pending")
    with pytest.raises(ValueError, match="no completed trial") as e:
        best_trial(_rows(pending), "TRA")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="SEG"):
        best_trial(_rows(swept.df), "SEG")


def test_best_config_is_the_trials_config_without_data(swept: Swept, tmp_path: Path) -> None:
    from ultrack.config.config import load_config
    from ultrack.config.dataconfig import DataConfig

    row = best_trial(_rows(swept.df), "TRA")
    text = best_config_toml(row)
    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    assert "data" not in toml.loads(text)
    assert "working_dir" not in body and "database" not in body and "address" not in body
    path = tmp_path / "best.toml"
    path.write_text(text)
    cfg = load_config(path)
    for key in swept.sweep.grid_keys:
        section, name = key.split(".")
        assert getattr(getattr(cfg, f"{section}_config"), name) == row[key], key
    assert cfg.segmentation_config.max_area == 1000 and cfg.tracking_config.solver_name == "CBC"
    assert cfg.data_config == DataConfig()  # ultrack's defaults: nothing of the sweep's database
    # everything else is exactly what the trial ran with (n_workers belongs to the executor)
    ran = toml.load(row["config"])
    ran.pop("data")
    for section in ("segmentation", "linking"):
        ran[section].pop("n_workers")
    assert toml.loads(text) == ran


def test_why_names_the_winner_its_margin_and_params(swept: Swept) -> None:
    df, keys = swept.df, swept.sweep.grid_keys
    row = best_trial(_rows(df), "TRA")
    line = why(row, _rows(df), "TRA", keys)
    assert "\n" not in line
    assert line.startswith(f"trial {row['trial']} wins: TRA 1.000")
    assert "tied with 1 other" in line  # two perfect trials on this movie: said, not hidden
    for k in keys:
        assert f"{k}={row[k]}" in line
    # without the perfect trials there is a single winner and a positive margin to the runner-up
    rest = df[df["TRA"] < 1.0]
    top = best_trial(_rows(rest), "TRA")
    line = why(top, _rows(rest), "TRA", keys)
    second = rest.sort_values("TRA", ascending=False).iloc[1]
    assert f"runner-up {second['trial']}, +" in line and f"{second['TRA']:.3f}" in line
    only = rest[rest["trial"] == top["trial"]]
    assert "only completed trial" in why(top, _rows(only), "TRA", keys)


# ---- plots ---------------------------------------------------------------------------------------
def _expected_plots(keys: list[str]) -> set[str]:
    names = {f"objective_vs_{k}.png" for k in keys}
    names |= {f"heatmap_{a}__{b}.png" for i, a in enumerate(keys) for b in keys[i + 1 :]}
    return names | {"importance.png", "stage_times.png"}


def _check_pngs(files: list[Path], expected: set[str]) -> None:
    assert {f.name for f in files} == expected
    assert {f.name for f in files[0].parent.iterdir()} == expected
    for f in files:
        data = f.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, f.name


def test_every_plot_is_a_real_png(swept: Swept) -> None:
    keys = swept.sweep.grid_keys
    _check_pngs(swept.plots, _expected_plots(keys))
    assert len(swept.plots) == 3 + 3 + 2
    assert swept.importance_method.startswith("optuna fANOVA on 12 trials")
    assert swept.plot_s < 60


def test_importance_follows_the_chosen_objective_not_the_studys(swept: Swept) -> None:
    # the study holds TRA, where min_area barely matters; the node count depends on it a lot
    with existing_ledger(swept.sweep) as led:
        tra, how = importances(swept.df, led.study, swept.sweep.grid_keys, "TRA")
        nodes, _ = importances(swept.df, led.study, swept.sweep.grid_keys, "selected_nodes")
    assert how.startswith("optuna")
    assert tra["linking.max_distance"] == max(tra.values()) and tra["segmentation.min_area"] < 0.1
    assert nodes["segmentation.min_area"] > 0.2


def test_plots_fall_back_when_optuna_cannot_rank(swept: Swept, tmp_path: Path) -> None:
    keys = swept.sweep.grid_keys
    one = swept.df.copy()
    one.loc[one.index[1:], "state"] = "pending"
    imp, method = importances(one, None, keys, "TRA")
    assert method.startswith("variance") and "1 completed" in method
    assert set(imp) == set(keys)
    _check_pngs(plot_all(one, None, keys, "TRA", tmp_path / "one"), _expected_plots(keys))
    single = ["tracking.appear_weight"]
    imp, method = importances(swept.df, None, single, "TRA")
    assert method.startswith("variance") and imp == {"tracking.appear_weight": 1.0}
    _check_pngs(plot_all(swept.df, None, single, "TRA", tmp_path / "single"), _expected_plots(single))


# ---- exports -------------------------------------------------------------------------------------
def _canon(v: Any, col: str, time_unit: str = "us") -> Any:
    """One spelling per value, whatever the format did to its type: None for missing, Timestamps
    for times, floats for numbers."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT:
        return None
    if col in ("started", "finished"):
        return pd.Timestamp(v).tz_localize(None).floor(time_unit)
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) or hasattr(v, "dtype"):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    return str(v)


def _same_rows(got: pd.DataFrame, want: pd.DataFrame, time_unit: str = "us") -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for col in want.columns:
        a = [_canon(v, col, time_unit) for v in got[col].tolist()]
        b = [_canon(v, col, time_unit) for v in want[col].tolist()]
        for x, y in zip(a, b, strict=True):
            if isinstance(x, float) and isinstance(y, float):
                assert x == pytest.approx(y, rel=1e-9, abs=1e-12), col
            else:
                assert x == y, (col, x, y)


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".json", ".md"])
def test_every_export_format_reads_back_the_same_rows(swept: Swept, tmp_path: Path, ext: str) -> None:
    df = swept.df
    path = tmp_path / f"results{ext}"
    results.write(df, path)
    assert not path.with_name(path.name + ".tmp").exists()
    if ext == ".md":
        lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
        assert len(lines) == 2 + len(df)  # header, separator, one per trial
        body = "\n".join(lines[2:])
        assert all(key in body for key in df["trial"])
        return
    # trial keys are hex: one made only of digits (or digits and an 'e') would read as a number
    if ext == ".csv":
        got = pd.read_csv(path, dtype={"trial": str})
    elif ext == ".parquet":
        got = pd.read_parquet(path)
    else:
        got = pd.DataFrame(json.loads(path.read_text()))
    # pandas' to_json writes ISO times to the millisecond (results.write does not ask for "us")
    _same_rows(got, df, time_unit="ms" if ext == ".json" else "us")


# ---- dashboard -----------------------------------------------------------------------------------
def test_dashboard_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import raises ImportError
    monkeypatch.setattr(dashboard, "_executable", lambda: None)
    with pytest.raises(dashboard.DashboardMissing) as e:
        dashboard.launch("sqlite:///nowhere.db", 8080)
    assert str(e.value) == "optuna-dashboard is not installed: pip install 'gridsearch[dashboard]'"


def test_dashboard_command_never_carries_a_password() -> None:
    url = "sqlite:////tmp/state.db"
    assert dashboard.dashboard_command(url, 8081) == ["optuna-dashboard", url, "--port", "8081"]
    with pytest.raises(ValueError, match="password") as e:
        dashboard.dashboard_command("postgresql+psycopg2://gs:s3cret@127.0.0.1:5432/x", 8081)
    assert "s3cret" not in str(e.value)


def test_launch_serves_the_ledgers_storage_in_process(swept: Swept, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, str, int]] = []
    fake = types.ModuleType("optuna_dashboard")
    fake.run_server = lambda storage, host, port: calls.append((storage, host, port))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optuna_dashboard", fake)
    with existing_ledger(swept.sweep) as led:
        assert led is not None
        dashboard.launch(led.storage, 8124)
        assert calls == [(led.storage, "127.0.0.1", 8124)]
        storage = dashboard.storage_for(led.url, {"connect_args": {"timeout": 5}})
        assert not isinstance(storage, str)
        assert dashboard.storage_for(led.url, {}) == led.url
        storage.engine.dispose()  # type: ignore[attr-defined]


def test_launch_falls_back_to_the_executable_for_a_plain_url(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    monkeypatch.setattr(dashboard, "_executable", lambda: "/opt/bin/optuna-dashboard")
    monkeypatch.setattr(dashboard.subprocess, "run", lambda cmd, check: ran.append(cmd))
    dashboard.launch("sqlite:////tmp/state.db", 8090)
    assert ran == [["/opt/bin/optuna-dashboard", "sqlite:////tmp/state.db", "--port", "8090",
                    "--host", "127.0.0.1"]]


# ---- the CLI over the same sweep -----------------------------------------------------------------
def test_cli_best_plot_results(swept: Swept, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from ultrack.config.config import load_config

    from gridsearch.cli import main

    spec = str(swept.sweep.path)
    r = CliRunner().invoke(main, ["best", spec, "-o", str(tmp_path / "best.toml")])
    assert r.exit_code == 0, r.output
    assert "wins: TRA 1.000" in r.output
    cfg = load_config(tmp_path / "best.toml")
    assert (cfg.segmentation_config.min_area, cfg.linking_config.max_distance) == (60, 15.0)

    r = CliRunner().invoke(main, ["plot", spec, "-o", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    _check_pngs([Path(p) for p in r.output.split()], _expected_plots(swept.sweep.grid_keys))

    out = tmp_path / "top.csv"
    r = CliRunner().invoke(main, ["results", spec, "--sort", "TRA", "--top", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    top = pd.read_csv(out, dtype={"trial": str})
    assert len(top) == 3 and list(top["TRA"]) == sorted(swept.df["TRA"], reverse=True)[:3]

    r = CliRunner().invoke(main, ["results", spec, "--top", "3", "-o", str(out)])  # --top alone: the best
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(out, dtype={"trial": str})["TRA"]) == list(top["TRA"])

    r = CliRunner().invoke(main, ["results", spec, "--sort", "nope"])
    assert r.exit_code == 2 and "no such column" in r.stderr
    r = CliRunner().invoke(main, ["results", spec, "-o", str(tmp_path / "x.xlsx")])
    assert r.exit_code == 2 and "unknown format" in r.stderr


@pytest.mark.parametrize("every", [False, True])
def test_results_on_screen_fit_80_columns_in_whole_words(swept: Swept, every: bool) -> None:
    """No terminal (CliRunner), COLUMNS=80: whole columns only, one line per trial, and a note of
    what was left out and how to see it; never a header or value broken into letters."""
    from click.testing import CliRunner

    from gridsearch.cli import main

    args = ["results", str(swept.sweep.path), *(["--all"] if every else [])]
    r = CliRunner().invoke(main, args, env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    header = lines[0].split()
    assert header[:6] == ["trial", "min_area", "max_distance", "appear_weight", "state", "TRA"]
    assert set(header) <= set(swept.df.columns) | {"min_area", "max_distance", "appear_weight"}
    keys = set(swept.df["trial"])
    assert [ln.split()[0] for ln in lines[2:14]] == list(swept.df["trial"]) and len(keys) == 12
    notes = lines[14:]
    assert notes[0] == "objective: TRA (higher is better)"
    assert notes[1].startswith("no room at 80 characters for ")
    assert ("more columns with --all" in notes[-1]) is not every
    assert notes[-1].endswith("every column in a file: -o FILE")


def test_plan_on_screen_fits_80_columns(swept: Swept) -> None:
    from click.testing import CliRunner

    from gridsearch.cli import main

    r = CliRunner().invoke(main, ["plan", str(swept.sweep.path)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert lines[1].split() == ["#", "trial", "min_area", "max_distance", "appear_weight", "first_stage"]


def test_status_keeps_a_long_workdir_on_one_line(movie: dict[str, Path], tmp_path: Path) -> None:
    """A cluster's scratch path is long: status names the workdir whole, on one line, at 80 columns
    (not cut into pieces of 80 characters, mid-word, where nobody can copy it from)."""
    from click.testing import CliRunner

    from gridsearch.cli import main

    spec = write_spec(tmp_path / ("a-scratch-folder-with-a-long-name-" * 2), movie, name="deep")
    r = CliRunner().invoke(main, ["status", str(spec)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"deep in {load(spec).workdir}: no driver running"


def test_short_names_stay_unique() -> None:
    from gridsearch.screen import short_names

    keys = ["segmentation.min_area", "linking.min_area", "tracking.appear_weight", "tracking.tracks"]
    assert short_names(keys, taken=["trial", "tracks"]) == {
        "segmentation.min_area": "segmentation.min_area", "linking.min_area": "linking.min_area",
        "tracking.appear_weight": "appear_weight", "tracking.tracks": "tracking.tracks"}


def test_a_narrow_table_drops_columns_whole() -> None:
    import io

    from rich.console import Console

    from gridsearch.screen import fit

    rows = [{"trial": "6d4c955345a0", "state": "done", "config": "/a/very/long/path/" * 5, "TRA": "0.977"}]
    fitted = fit(["trial", "config", "state", "TRA"], rows, 40)
    assert fitted.shown == ["trial", "state", "TRA"] and fitted.left_out == ["config"]
    out = io.StringIO()
    Console(file=out, width=40).print(fitted.table)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and max(len(ln) for ln in lines) <= 40  # header, rule, one row
    assert fitted.left_out_line() == "no room at 40 characters for 1: config"


@pytest.mark.parametrize("command", ["plot", "best"])
def test_cli_unknown_objective_is_one_line_exit_2(swept: Swept, tmp_path: Path, command: str) -> None:
    from click.testing import CliRunner

    from gridsearch.cli import main

    out = ["-o", str(tmp_path / "out")]
    for objective in ("NOPE", "SEG"):  # SEG: a metric this ground truth (no SEG/) cannot give
        r = CliRunner().invoke(main, [command, str(swept.sweep.path), "--objective", objective, *out])
        assert r.exit_code == 2, (r.output, r.exception)
        lines = r.stderr.strip().splitlines()
        assert lines == [f"error: --objective {objective}: no such column; columns are: "
                         + ", ".join(swept.df.columns)], lines
    assert not (tmp_path / "out").exists()


# ---- provenance ----------------------------------------------------------------------------------
def test_provenance_names_ultrack_and_the_solver_that_ran(swept: Swept) -> None:
    from importlib.metadata import version

    done = swept.df[swept.df["state"] == "done"]
    assert len(done) == 12
    assert (done["ultrack"] == version("ultrack")).all()
    assert (done["solver"] == "CBC").all()  # the sweep's tracking.solver_name


@pytest.mark.parametrize("name", ["", "GUROBI", "CBC"])
def test_resolved_solver_is_the_one_ultrack_picks(name: str) -> None:
    """"" (and GUROBI) fall back to CBC without a Gurobi licence: asked of ultrack itself."""
    from ultrack.config.config import TrackingConfig
    from ultrack.core.solve.solver.mip_solver import MIPSolver

    from gridsearch.runtime import resolved_solver

    try:
        used = MIPSolver(TrackingConfig(solver_name=name))._model.solver_name.upper()
    except Exception:  # no Gurobi library at all: ultrack's solve fails, the configured name stays
        used = name
    assert resolved_solver(name) == {"GRB": "GUROBI"}.get(used, used)
