"""Sweep wall time against the floor: ultrack's import plus the same minimal stage runs called
directly in one bare process. Target: the serial sweep (parallel 1) <= 1.25 x floor; branches at
once (parallel K > 1, forked SQLite databases) below the floor when the cores allow.

    python tests/benchmarks/bench_sweep.py [--frames 20 --size 384 --cells 60] [--parallel 1 2]

All runs happen here, one after the other, on the same generated movie: quote the ratios."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GRID = {
    "segmentation.min_area": [30, 60],
    "linking.max_distance": [6.0, 15.0],
    "tracking.appear_weight": [-0.1, -0.5, -1.0],
}
BASE = {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC"}}

FLOOR = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    if __name__ == "__main__":
        import ultrack, zarr
        from ultrack.config.config import MainConfig
        from ultrack.core.database import clear_all_data
        from ultrack.core.linking.utils import clear_linking_data
        from ultrack.core.solve.sqltracking import SQLTracking
        t_import = time.perf_counter() - t0
        a = json.loads(sys.argv[1])
        fg, ct = zarr.open(a["fg"], mode="r"), zarr.open(a["ct"], mode="r")
        runs = 0
        for min_area in a["grid"]["segmentation.min_area"]:
            for max_distance in a["grid"]["linking.max_distance"]:
                for k, appear in enumerate(a["grid"]["tracking.appear_weight"]):
                    cfg = MainConfig.model_validate({
                        "data": {"working_dir": a["wd"]},
                        "segmentation": {**a["base"]["segmentation"], "min_area": min_area},
                        "linking": {"max_distance": max_distance},
                        "tracking": {**a["base"]["tracking"], "appear_weight": appear}})
                    url = cfg.data_config.database_path
                    if max_distance == a["grid"]["linking.max_distance"][0] and k == 0:
                        clear_all_data(url)
                        ultrack.segment(fg, ct, cfg)
                        runs += 1
                    if k == 0:
                        clear_linking_data(url)
                        ultrack.link(cfg)
                        runs += 1
                    SQLTracking.clear_solution_from_database(url)
                    ultrack.solve(cfg)
                    runs += 1
        print(json.dumps({"import_s": t_import, "runs": runs, "total_s": time.perf_counter() - t0}))
    """
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--cells", type=int, default=60)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2], help="databases at once, per sweep")
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="gs-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    from gridsearch.synth import generate_movie

    movie = generate_movie(root / "movie", n_frames=a.frames, size=a.size, n_cells=a.cells, seed=1)

    fl = root / "floor"
    fl.mkdir(exist_ok=True)
    script = root / "floor.py"
    script.write_text(FLOOR)
    args = json.dumps({"fg": str(movie["foreground"]), "ct": str(movie["contours"]), "wd": str(fl),
                       "grid": GRID, "base": BASE})
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(script), args], capture_output=True, text=True, check=True)
    floor_wall = time.perf_counter() - t0
    floor = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"movie: {a.frames} frames, {a.size}x{a.size}, ~{a.cells} cells; grid 2x2x3 = 12 trials; "
          f"{os.cpu_count()} cores")
    print(f"floor (bare process: ultrack import {floor['import_s']:.1f} s + {floor['runs']} stage runs): "
          f"{floor_wall:.1f} s", flush=True)
    walls: dict[int, float] = {}
    for k in a.parallel:
        walls[k], runs = _sweep(root, movie, k)
        k0 = a.parallel[0]
        vs = f", to parallel {k0} {walls[k] / walls[k0]:.2f}" if k != k0 else ""
        print(f"gridsearch sweep, parallel {k} (process start to exit): {walls[k]:.1f} s; stage runs "
              f"{runs} = {sum(runs.values())}; ratio to floor {walls[k] / floor_wall:.2f}{vs}", flush=True)
    print("target: parallel 1 <= 1.25 x floor")


def _sweep(root: Path, movie: dict[str, Path], k: int) -> tuple[float, dict[str, int]]:
    import yaml

    spec = root / f"bench{k}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": f"bench{k}", "workdir": str(root / f"sweep{k}"),
        "data": {"foreground": str(movie["foreground"]), "contours": str(movie["contours"])},
        "config": BASE, "grid": GRID, "parallel": k,
    }))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    st = json.loads(subprocess.run([sys.executable, "-m", "gridsearch.cli", "status", "--json", str(spec)],
                                   capture_output=True, text=True, check=True).stdout)
    return wall, {k: v.get("done", 0) for k, v in st["stage_runs"].items()}


if __name__ == "__main__":
    main()
