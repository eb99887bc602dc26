"""What one batch job runs: one stage, one batch index, through ultrack's Python API (no Qt).

Used in-process by the local executor, as a long-lived process by the parallel local executor (one
ultrack import per worker, not per batch), and as the body of a SLURM array task."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from gridsearch.stages import Stage


@contextlib.contextmanager
def fd_redirect(log: Path) -> Iterator[None]:
    """ultrack, tqdm and the CBC solver write to fds 1 and 2 directly: send both to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


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


_PATCHED = False
_ENGINES: list[Any] = []


def prepare_ultrack() -> None:
    """ultrack creates a pooled engine per call and never disposes it: against PostgreSQL every call
    would leave connections open until garbage collection, and a few workers exhaust the server's
    slots. Engines made during a batch are remembered and disposed when the batch ends, so a batch
    reuses its connections (SCRAM authentication per connect is not free) and leaves none behind."""
    global _PATCHED
    if _PATCHED:
        return
    import sqlalchemy

    original = sqlalchemy.create_engine

    def create_engine(url: Any, *args: Any, **kwargs: Any) -> Any:
        engine = original(url, *args, **kwargs)
        if not str(url).startswith("sqlite"):
            _ENGINES.append(engine)
        return engine

    sqlalchemy.create_engine = create_engine  # ultrack calls it as `sqla.create_engine`
    _PATCHED = True


def release_connections() -> None:
    while _ENGINES:
        _ENGINES.pop().dispose()


def _maybe_inject_failure(stage: Stage, batch: int | None) -> None:
    """Fault injection for tests and drills: GRIDSEARCH_FAIL=stage[:batch][:once-file].

    With a once-file, only the first task to create that file fails (a transient fault)."""
    spec = os.environ.get("GRIDSEARCH_FAIL")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != stage.label:
        return
    if len(parts) > 1 and parts[1] not in ("", "*") and batch is not None and int(parts[1]) != batch:
        return
    if len(parts) > 2:
        try:
            fd = os.open(parts[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    raise RuntimeError(f"injected failure in {stage.label} batch {batch}")


def run_batch(
    stage: Stage, config_path: str | Path, batch: int | None, foreground: str, contours: str
) -> None:
    """batch None: the whole stage. Out-of-range link indices are a no-op: an array sized from the
    movie's shape may hold one more batch than a movie whose last frames are empty needs."""
    _maybe_inject_failure(stage, batch)
    prepare_ultrack()
    try:
        _run(stage, config_path, batch, foreground, contours)
    finally:
        release_connections()


def _run(stage: Stage, config_path: str | Path, batch: int | None, foreground: str, contours: str) -> None:
    import ultrack

    cfg = load_config(config_path)
    if stage == Stage.SEGMENT:
        ultrack.segment(_array(foreground), _array(contours), cfg, batch_index=batch)
    elif stage == Stage.LINK:
        from ultrack.core.database import maximum_time_from_database

        max_t = maximum_time_from_database(cfg.data_config)
        if batch is not None and batch * cfg.linking_config.n_workers >= max_t:
            return
        ultrack.link(cfg, batch_index=batch)
    else:
        ultrack.solve(cfg, batch_index=batch)


def serve() -> int:
    """JSON-lines loop on stdin/stdout: one task in, one result out. Logs go to stderr."""
    # ultrack, tqdm and the CBC solver (C code) print to fd 1: the protocol gets its own fd and
    # fd 1 becomes a copy of stderr (the worker's log).
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
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
