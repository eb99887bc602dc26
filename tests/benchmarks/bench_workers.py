"""Parallel batch speed-up on managed PostgreSQL: workers=2 against workers=1, same movie, same grid.

    python tests/benchmarks/bench_workers.py [--frames 20 --size 384 --cells 60]

Prints wall time of each sweep and the summed wall seconds per stage, then the ratios."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GRID = {
    "segmentation.min_area": [30, 60],
    "linking.max_distance": [6.0, 15.0],
    "tracking.appear_weight": [-0.1, -0.5, -1.0],
}


def stage_sums(spec: Path) -> dict[str, float]:
    from gridsearch.engine import existing_ledger
    from gridsearch.spec import load

    sums: dict[str, float] = {}
    with existing_ledger(load(spec)) as led:
        for r in led.stage_runs():
            if r["state"] == "done":
                sums[r["stage"]] = sums.get(r["stage"], 0.0) + r["wall_s"]
    return sums


def worker_startup(n: int = 3) -> list[float]:
    """Seconds from spawning a batch worker to its ready line: what each worker (and each SLURM
    array task) pays before its first batch."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "gridsearch.worker", "--serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None and "ready" in p.stdout.readline()
        out.append(time.perf_counter() - t0)
        p.communicate("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--cells", type=int, default=60)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gs-bench-workers-", dir="/tmp"))
    root.chmod(0o711)  # the managed server's OS user must traverse it
    from gridsearch.synth import generate_movie

    movie = generate_movie(root / "movie", n_frames=a.frames, size=a.size, n_cells=a.cells, seed=1)
    out: dict[int, tuple[float, dict[str, float]]] = {}
    for workers in (1, 2):
        spec = root / f"w{workers}.yaml"
        spec.write_text(yaml.safe_dump({
            "name": f"w{workers}", "workdir": str(root / f"w{workers}"),
            "data": {"foreground": str(movie["foreground"]), "contours": str(movie["contours"])},
            "config": {"segmentation": {"max_area": 1000}, "tracking": {"solver_name": "CBC"}},
            "grid": GRID,
            "database": {"kind": "postgresql", "managed": True},
            "executor": {"kind": "local", "workers": workers},
        }))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gridsearch.cli", "sweep", "-q", str(spec)], check=True,
                       stdout=subprocess.DEVNULL)
        out[workers] = (time.perf_counter() - t0, stage_sums(spec))
    print(f"movie: {a.frames} frames {a.size}x{a.size} ~{a.cells} cells; 2x2x3 grid; managed PostgreSQL")
    for w, (wall, sums) in out.items():
        rounded = {k: round(v, 1) for k, v in sums.items()}
        print(f"workers={w}: sweep {wall:.1f} s; stage sums {json.dumps(rounded)}")
    starts = worker_startup()
    print("worker start-up (spawn -> ready, paid once per worker per sweep): "
          + ", ".join(f"{s:.1f} s" for s in starts))
    w1, w2 = out[1], out[2]
    print(f"speed-up workers=2 vs 1: sweep {w1[0] / w2[0]:.2f}x; "
          + ", ".join(f"{k} {w1[1][k] / w2[1][k]:.2f}x" for k in w1[1]))


if __name__ == "__main__":
    main()
