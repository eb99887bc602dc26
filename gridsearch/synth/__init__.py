"""Deterministic synthetic time-lapse with Cell Tracking Challenge ground truth.

Why it exists: a grid search needs a movie whose right answer is known, small enough to ship with the
repository and fast to track, yet hard enough that the swept parameters change the result:

* about a third of the cells move 5-12 px per frame, so ``linking.max_distance`` 6 loses their links
  (15 keeps them);
* tiny debris specks (about 8-13 px) sit in the foreground but not in the ground truth: ultrack drops
  connected components smaller than ``min_area / min_area_factor`` (``min_area_factor`` = 4), so
  ``min_area`` 60 removes them while 30 keeps them as false positives;
* cells drift in through the image border late in the movie, and some debris shows up for 2-3 frames:
  ``tracking.appear_weight`` decides whether such short tracks are worth selecting (-1.0 loses the
  newcomers, -0.1 keeps the short-lived debris when ``min_area`` lets it through).

Cell shapes, speeds and the division (parent ends, two daughters of half its size start next frame
with parent id P) follow the CTC conventions, so the ground truth can be scored with CTC tools.
Only numpy, scipy, tifffile and zarr are used: generating data never pays ultrack's
import time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import tifffile
import zarr

from gridsearch.synth.simulate import Cell, simulate

__all__ = ["generate_movie"]


def _box(center: np.ndarray, radius: float, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the image around ``center`` and the pixel coordinates inside them (..., ndim)."""
    lo = np.maximum(np.floor(center - radius - 1).astype(int), 0)
    hi = np.minimum(np.ceil(center + radius + 2).astype(int), shape)
    ranges = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return region, np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1)


def _render(
    cells: list[Cell],
    debris: list[tuple[np.ndarray, int, int]],
    n_frames: int,
    shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth labels, a debris intensity map and each cell's elliptic radius (all T x shape).

    The elliptic radius is 0 at a cell's centre and 1 on its border (1 outside cells too): a cone
    with a single minimum per cell, which becomes the contour map.
    """
    labels = np.zeros((n_frames, *shape), dtype=np.uint16)
    specks = np.zeros((n_frames, *shape), dtype=np.float32)
    rho = np.ones((n_frames, *shape), dtype=np.float32)
    for cell in cells:
        inv = cell.rotation / cell.axes  # x -> coordinates in units of the semi-axes
        for t, center in cell.positions.items():
            region, grid = _box(center, cell.radius, shape)
            r = np.sqrt((((grid - center) @ inv) ** 2).sum(axis=-1))
            inside = r <= 1.0
            labels[(t, *region)][inside] = cell.label
            rho[(t, *region)][inside] = r[inside]
    # debris: gaussian bumps, peak 0.9, sigma 1.7 -> about 11 px above the 0.5 threshold
    for center, first, last in debris:
        region, grid = _box(center, 5.0, shape)
        bump = 0.9 * np.exp(-((grid - center) ** 2).sum(axis=-1) / (2 * 1.7**2))
        for t in range(first, last + 1):
            specks[(t, *region)] = np.maximum(specks[(t, *region)], bump)
    return labels, specks, rho


def _quantize(a: np.ndarray) -> np.ndarray:
    """Round to 1/256 steps like an 8-bit image: exact in float32, and it compresses well."""
    return (np.round(np.clip(a, 0.0, 1.0) * 256.0) / 256.0).astype(np.float32)


def _images(
    rng: np.random.Generator, labels: np.ndarray, specks: np.ndarray, rho: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probability and contour (boundary likelihood) maps for every frame.

    Contours are the smoothed elliptic radius: high on borders and background, one basin per cell,
    so the watershed hierarchy holds whole cells (and their merges), not noise fragments that the
    solver would happily track as two half-cells.
    """
    foreground = np.empty(labels.shape, dtype=np.float32)
    contours = np.empty(labels.shape, dtype=np.float32)
    for t in range(labels.shape[0]):
        fg = ndi.gaussian_filter((labels[t] > 0).astype(np.float32), sigma=1.0)
        fg = np.maximum(fg, specks[t])
        fg += rng.normal(scale=0.04, size=fg.shape).astype(np.float32)
        foreground[t] = _quantize(fg)
        ct = ndi.gaussian_filter(rho[t], sigma=1.0)
        ct += rng.normal(scale=0.02, size=ct.shape).astype(np.float32)
        contours[t] = _quantize(ct)
    return foreground, contours


def _write_zarr(path: Path, data: np.ndarray) -> None:
    """One frame per chunk, as ultrack wants; zarr's default compressor."""
    arr = zarr.create_array(
        store=str(path),
        shape=data.shape,
        chunks=(1, *data.shape[1:]),
        dtype=data.dtype,
        overwrite=True,
    )
    arr[:] = data


def _write_gt(gt_dir: Path, labels: np.ndarray, cells: list[Cell]) -> None:
    """CTC TRA ground truth: man_trackTTT.tif per frame and the man_track.txt lineage table."""
    tra = gt_dir / "TRA"
    tra.mkdir(parents=True, exist_ok=True)
    for stale in tra.glob("man_track*.tif"):
        stale.unlink()
    for t, frame in enumerate(labels):
        tifffile.imwrite(tra / f"man_track{t:03d}.tif", frame, compression="zlib")
    lines = [f"{c.label} {c.begin} {c.end} {c.parent}" for c in sorted(cells, key=lambda c: c.label)]
    (tra / "man_track.txt").write_text("\n".join(lines) + "\n")


def generate_movie(
    out_dir: Path,
    *,
    n_frames: int = 10,
    size: int = 128,
    n_cells: int = 8,
    seed: int = 0,
    divisions: int = 1,
    ndim: int = 2,
) -> dict[str, Path]:
    """Write foreground.zarr, contours.zarr and gt/TRA under ``out_dir``; same arguments, same bytes.

    Arrays are float32 (T, Y, X) for ``ndim=2`` and (T, Z, Y, X) with Z = Y = X = ``size`` for
    ``ndim=3``. Cell sizes are in pixels and do not scale with ``size``: a bigger image holds more
    cells at the same density. ``divisions`` cells divide once, around the middle of the movie.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if n_frames < 1 or n_cells < 1:
        raise ValueError("n_frames and n_cells must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cells, debris = simulate(rng, n_frames, size, n_cells, divisions, ndim)
    labels, specks, rho = _render(cells, debris, n_frames, (size,) * ndim)
    foreground, contours = _images(rng, labels, specks, rho)

    paths = {
        "foreground": out_dir / "foreground.zarr",
        "contours": out_dir / "contours.zarr",
        "gt": out_dir / "gt",
    }
    _write_zarr(paths["foreground"], foreground)
    _write_zarr(paths["contours"], contours)
    _write_gt(paths["gt"], labels, cells)
    return paths
