"""What one batch job runs: one stage, one batch index, through ultrack's Python API (no Qt).

Used in-process by the local executor, as a long-lived process by the parallel local executor (one
ultrack import per worker, not per batch), and as the body of a SLURM array task."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from gridsearch.stages import Stage


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


def run_batch(stage: Stage, config_path: str | Path, batch: int, foreground: str, contours: str) -> None:
    """Out-of-range indices are a no-op: a planner that sized an array from the movie's shape may
    ask for one more link batch than a movie whose last frames are empty needs."""
    import ultrack

    cfg = load_config(config_path)
    if stage == Stage.SEGMENT:
        ultrack.segment(_array(foreground), _array(contours), cfg, batch_index=batch)
    elif stage == Stage.LINK:
        from ultrack.core.database import maximum_time_from_database

        max_t = maximum_time_from_database(cfg.data_config)
        if batch * cfg.linking_config.n_workers >= max_t:
            return
        ultrack.link(cfg, batch_index=batch)
    else:
        ultrack.solve(cfg, batch_index=batch)


def serve() -> int:
    """JSON-lines loop on stdin/stdout: one task in, one result out. Logs go to stderr."""
    out = sys.stdout
    sys.stdout = sys.stderr  # ultrack and its solvers print; keep the protocol channel clean
    import ultrack  # noqa: F401  (pay the import once, before the first task)

    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        task = json.loads(line)
        t0 = time.perf_counter()
        try:
            run_batch(Stage.parse(task["stage"]), task["config"], task["batch"], task["fg"], task["ct"])
            res = {"id": task["id"], "ok": True, "s": time.perf_counter() - t0}
        except BaseException as e:  # report every failure; the driver decides
            res = {
                "id": task["id"],
                "ok": False,
                "error": f"{type(e).__name__}: {e}".splitlines()[0],
                "trace": traceback.format_exc(),
            }
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridsearch.worker")
    ap.add_argument("--serve", action="store_true", help="long-lived JSON-lines worker")
    ap.add_argument("--stage")
    ap.add_argument("--config")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--fg")
    ap.add_argument("--ct")
    a = ap.parse_args(argv)
    if a.serve:
        return serve()
    batch = a.batch if a.batch is not None else int(os.environ["SLURM_ARRAY_TASK_ID"])
    run_batch(Stage.parse(a.stage), a.config, batch, a.fg, a.ct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
