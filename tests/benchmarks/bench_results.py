"""`results` on a ledger of 10,000 finished trials. Target: the table in-process and the whole
`gridsearch results -o FILE` command (a fresh process) each < 3 s.

    python tests/benchmarks/bench_results.py [--trials 10000] [--workdir DIR]

The ledger is built synthetically, in seconds: one trial is recorded through the ledger as the
driver records it (engine._Driver._record: figures, CTC metrics, stage times, paths, provenance),
then copied row for row in bulk into optuna's tables with one SQL insert each (optuna's own
add_trials takes 8 ms a trial)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ATTRS = {
    "figures": {"selected_nodes": 812, "tracks": 97, "divisions": 3, "appearances": 11,
                "disappearances": 9, "mean_track_length": 8.371134},
    "metrics": {"TRA": 0.958123, "DET": 0.962411, "LNK": 0.926087, "CHOTA": 0.871234, "Valid": 1.0,
                "AOGM": 41.5, "AOGM-D": 12.0, "AOGM-A": 29.5},
    "segment_s": 12.412, "link_s": 31.007, "solve_s": 4.981, "host": "node042", "solver": "CBC",
    "ultrack": "0.8.0", "gridsearch": "0.1.0",
}


def grid_for(n: int) -> dict[str, list[float]]:
    """Four tracking weights, ~n combinations (10,000 = 10^4)."""
    side = round(n ** 0.25)
    return {f"tracking.{k}": [round(-0.05 * (i + 1), 3) for i in range(side)]
            for k in ("appear_weight", "disappear_weight", "division_weight", "power")}


def build(root: Path, n: int) -> Path:
    """The sweep file and a ledger in which every trial of its grid is COMPLETE."""
    from gridsearch.backends import open_backend
    from gridsearch.engine import check_compatible
    from gridsearch.inputs import IDENTITY_MARKER
    from gridsearch.ledger import Ledger
    from gridsearch.spec import load
    from gridsearch.synth import generate_movie
    from gridsearch.workspace import Workspace

    movie = generate_movie(root / "movie")
    grid = grid_for(n)
    grid["tracking.power"] = [float(i + 1) for i in range(len(grid["tracking.power"]))]
    spec = root / "results.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "bench_results", "workdir": str(root / "sweep"), "max_trials": 10 ** 6,
        "data": {"foreground": str(movie["foreground"]), "contours": str(movie["contours"]),
                 "ground_truth": str(movie["gt"])},
        "config": {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC"}}, "grid": grid}))
    ws = Workspace(root / "sweep")
    ws.root.mkdir(parents=True)
    (ws.root / IDENTITY_MARKER).write_text("sampled\n")  # as a sweep does first: the trial keys
    sw = load(spec)
    with open_backend(sw, ws) as backend:
        led = Ledger(backend.ledger_url, sw.name, backend.engine_kwargs)
        try:
            check_compatible(led, sw)
            t0 = sw.trials[0]
            number = led.start_trial(t0, None, sw.file.grid)
            led.finish_trial(number, ATTRS["metrics"]["TRA"], {
                **ATTRS, "config": str(ws.root / "trials" / t0.key / "config.toml"),
                "tracks_csv": str(ws.root / "trials" / t0.key / "tracks.csv")})
            _copy_trial(led, sw)
        finally:
            led.close()
    return spec


def _copy_trial(led, sw) -> None:  # type: ignore[no-untyped-def]
    """Trial 0's rows, once per other trial of the grid, with its own key, params and paths."""
    import sqlalchemy as sa

    with led.engine.begin() as c:
        tid, sid, start, end = c.execute(sa.text(
            "SELECT trial_id, study_id, datetime_start, datetime_complete FROM trials")).one()
        attrs = dict(c.execute(sa.text(
            "SELECT key, value_json FROM trial_user_attributes WHERE trial_id = :t"), {"t": tid}).all())
        dists = dict(c.execute(sa.text(
            "SELECT param_name, distribution_json FROM trial_params WHERE trial_id = :t"), {"t": tid}).all())
        value = c.execute(sa.text("SELECT value FROM trial_values WHERE trial_id = :t"), {"t": tid}).scalar()
        rest = sw.trials[1:]
        c.execute(sa.text(
            "INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
            "VALUES (:i, :n, :s, 'COMPLETE', :a, :b)"),
            [{"i": tid + k, "n": k, "s": sid, "a": start, "b": end} for k in range(1, len(rest) + 1)])
        c.execute(sa.text(
            "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (:i, 0, :v, 'FINITE')"),
            [{"i": tid + k, "v": value - k * 1e-6} for k in range(1, len(rest) + 1)])
        rows, prows = [], []
        for k, t in enumerate(rest, start=1):
            own = {**attrs, "key": json.dumps(t.key), "grid_number": json.dumps(t.number),
                   "params_json": json.dumps(json.dumps(t.params)), "first_stage": json.dumps("solve"),
                   "config": json.dumps(str(sw.workdir / "trials" / t.key / "config.toml")),
                   "tracks_csv": json.dumps(str(sw.workdir / "trials" / t.key / "tracks.csv"))}
            rows += [{"i": tid + k, "k": a, "v": v} for a, v in own.items()]
            prows += [{"i": tid + k, "p": p, "v": float(t.params[p]), "d": dists[p]} for p in dists]
        c.execute(sa.text("INSERT INTO trial_user_attributes (trial_id, key, value_json) "
                          "VALUES (:i, :k, :v)"), rows)
        c.execute(sa.text("INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
                          "VALUES (:i, :p, :v, :d)"), prows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gs-bench-results-"))
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "results.yaml"
    t0 = time.perf_counter()
    if not (root / "sweep").exists():
        spec = build(root, a.trials)
    print(f"ledger: {time.perf_counter() - t0:.1f} s to build (reused when it exists) in {root}")

    from gridsearch import results
    from gridsearch.engine import existing_ledger
    from gridsearch.spec import load
    from gridsearch.validated import write as write_record

    sw = load(spec)
    write_record(sw.workdir, sw.validated, sw.headers.seen)  # as a sweep does: views need no ultrack
    t0 = time.perf_counter()
    with existing_ledger(sw) as led:
        assert led is not None
        t1, c1 = time.perf_counter(), time.process_time()
        df = results.table(sw, led)
    t2, cpu = time.perf_counter(), time.process_time() - c1
    done = int((df["state"] == "done").sum())
    print(f"results.table: {len(df):,} rows ({done:,} done), {len(df.columns)} columns: "
          f"{t2 - t1:.2f} s ({cpu:.2f} s CPU; + {t1 - t0:.2f} s opening the ledger) (target < 3 s)")
    for out in ("out.csv", "out.parquet"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "gridsearch.cli", "results", str(spec), "-o",
                            str(root / out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        note = r.stdout.strip() if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()}"
        print(f"gridsearch results -o {out} (process start to exit): {wall:.2f} s (target < 3 s); {note}")


if __name__ == "__main__":
    main()
