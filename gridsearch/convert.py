"""The arrays gridsearch makes once in the workdir from the user's files (inputs.Made): a TIFF
stack copied into zarr, and label movies turned into ultrack's foreground and contours.

Why a zarr copy of a TIFF, not tifffile's zarr view of it (`imread(path, aszarr=True)`): every
worker, in a pool process or in a SLURM task on another node, opens its arrays by path with
`zarr.open`. A TIFF view is an object of one process: each worker would re-make it, parsing the
file's chain of page headers (slow for a long stack on a shared filesystem), and gridsearch would
need a second way to open arrays in every place that reads them. The copy, one frame per chunk as
ultrack reads it, costs one pass over the movie and its size on disk, once per change of the file.

Made arrays are trusted only when they record the identity of the files they were made from (a
zarr attribute, written last) and are built beside their place, then renamed into it: a crash
half-way leaves nothing at the place a worker reads, and the next sweep makes them again."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gridsearch.inputs import LABELS_SIGMA, Made, is_tiff

SOURCE_ATTR = "gridsearch_source"  # the identity of the files a made array was made from
CHUNK_BYTES = 64 * 2**20  # at most per chunk: a frame, or a slab of a big 3D frame


def stale(made: Sequence[Made]) -> list[Made]:
    """The made arrays missing or made from files that have changed since."""
    return [m for m in made if not all(_records(t, m.identity) for t in m.targets)]


def describe(made: Made) -> str:
    what = "foreground and contours from the label movies" if made.labels else "a zarr copy of the TIFF stack"
    sources = ", ".join(str(p) for p in made.sources)
    return f"making {what} {sources} in {made.targets[0].parent} (once; again only if they change)"


def make(made: Made) -> None:
    """Build the arrays beside their place, mark them complete, rename them into it. Callers hold
    the workdir's lock: no one else makes or removes them meanwhile."""
    home = made.targets[0].parent
    home.mkdir(parents=True, exist_ok=True)
    for leftover in home.glob(".making.*"):  # a maker that crashed: never trusted, never renamed
        shutil.rmtree(leftover, ignore_errors=True)
    build = home / f".making.{os.getpid()}"
    build.mkdir()
    try:
        staged = [build / t.name for t in made.targets]
        if made.labels:
            _labels_to_inputs(made.sources, staged[0], staged[1])
        else:
            _copy_tiff(made.sources[0], staged[0])
        import zarr

        for path in staged:  # last: what records the identity is complete
            zarr.open_array(str(path), mode="r+").attrs[SOURCE_ATTR] = made.identity
        for path, target in zip(staged, made.targets, strict=True):
            _replace(path, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _records(target: Path, identity: str) -> bool:
    import zarr

    try:
        return zarr.open_array(str(target), mode="r").attrs.get(SOURCE_ATTR) == identity
    except Exception:  # missing or half-removed: not trusted
        return False


def _replace(path: Path, target: Path) -> None:
    """A directory cannot be renamed over another: the old one goes aside first. A crash between
    the two renames leaves no array at `target`, which is then made again."""
    old = target.parent / f".making.{os.getpid()}.old.{target.name}"
    if target.exists():
        os.rename(target, old)
    os.rename(path, target)
    shutil.rmtree(old, ignore_errors=True)


def frame_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One frame per chunk, as ultrack reads it; a frame above CHUNK_BYTES split along its first
    spatial axis."""
    chunks = [1, *shape[1:]]
    while chunks[1] > 1 and itemsize * math.prod(chunks) > CHUNK_BYTES:
        chunks[1] = (chunks[1] + 1) // 2
    return tuple(chunks)


@contextlib.contextmanager
def _tiff_frames(path: Path) -> Iterator[Any]:
    """The TIFF's first series as a read-only zarr array (tifffile's view), within this process."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif, tif.series[0].aszarr() as store:
        yield zarr.open_array(store, mode="r")


def _copy_tiff(source: Path, dest: Path) -> None:
    """Frame by frame: one frame in memory at a time, whatever the movie's size."""
    import numpy as np
    import zarr

    with _tiff_frames(source) as frames:
        shape, dtype = tuple(frames.shape), np.dtype(frames.dtype)
        out = zarr.create_array(store=str(dest), shape=shape, dtype=dtype,
                                chunks=frame_chunks(shape, dtype.itemsize))
        for t in range(shape[0]):
            out[t] = frames[t]


def _labels_to_inputs(sources: Sequence[Path], foreground: Path, contours: Path) -> None:
    """ultrack's own conversion (ultrack.utils.labels_to_contours), written straight to disk."""
    import zarr
    from ultrack.utils import labels_to_contours

    with contextlib.ExitStack() as stack:
        movies = [stack.enter_context(_tiff_frames(p)) if is_tiff(p) else zarr.open_array(str(p), mode="r")
                  for p in sources]
        labels_to_contours(movies, sigma=LABELS_SIGMA, foreground_store_or_path=str(foreground),
                           contours_store_or_path=str(contours))
