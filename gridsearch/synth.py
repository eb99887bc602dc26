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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import tifffile
import zarr

GAP = 3.0
"""Minimum free space (px) between the bounding spheres of two objects: keeps foreground blobs apart."""

DEBRIS_RADIUS = 2.5
"""Bounding radius of a debris speck, used to keep cells away from it."""


@dataclass
class _Cell:
    """One ground-truth track: an ellipse/ellipsoid moving without rotation."""

    label: int
    center: np.ndarray
    axes: np.ndarray  # semi-axes, px
    rotation: np.ndarray  # ndim x ndim orthogonal matrix, columns are the axes
    velocity: np.ndarray
    begin: int
    parent: int = 0
    end: int = -1  # last frame, -1 while alive
    divides_at: int = -1  # first frame of the daughters, -1 if it never divides
    entering: bool = False  # still crossing the image border
    positions: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def radius(self) -> float:
        """Bounding radius, for collision checks."""
        return float(self.axes.max())


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A random orientation, drawn the same way for every ndim so the RNG stream stays simple."""
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def _unit(rng: np.random.Generator, ndim: int) -> np.ndarray:
    v = rng.normal(size=ndim)
    return v / np.linalg.norm(v)


def _shape_axes(rng: np.random.Generator, r_eq: float, ndim: int) -> np.ndarray:
    """Semi-axes of an ellipse/ellipsoid with the volume of a sphere of radius ``r_eq``."""
    axes = np.full(ndim, r_eq)
    axes[0] *= rng.uniform(1.0, 1.35)
    # renormalise so the volume equals the sphere's
    axes *= (r_eq**ndim / np.prod(axes)) ** (1.0 / ndim)
    return axes


def _fits(
    center: np.ndarray,
    radius: float,
    size: int,
    obstacles: list[tuple[np.ndarray, float]],
) -> bool:
    """True if a sphere lies fully inside the image and keeps GAP px from every obstacle."""
    margin = radius + 2.0
    if np.any(center < margin) or np.any(center > size - 1 - margin):
        return False
    return all(np.linalg.norm(center - c) >= radius + r + GAP for c, r in obstacles)


def _simulate(
    rng: np.random.Generator,
    n_frames: int,
    size: int,
    n_cells: int,
    divisions: int,
    ndim: int,
) -> tuple[list[_Cell], list[tuple[np.ndarray, int, int]]]:
    """Move cells without overlap; returns the tracks and the debris (center, first, last frame)."""
    n_div = min(max(divisions, 0), n_cells) if n_frames >= 3 else 0
    order = rng.permutation(n_cells)
    parents = order[:n_div].tolist()
    n_fast = round(0.375 * (n_cells - n_div))
    fast = set(order[n_div : n_div + n_fast].tolist())
    div_frames = np.linspace(n_frames // 2, (2 * n_frames) // 3, n_div).round().astype(int)
    div_frames = np.clip(div_frames, 1, n_frames - 1)

    obstacles: list[tuple[np.ndarray, float]] = []
    cells: list[_Cell] = []
    for i in range(n_cells):
        if i in parents:
            r_eq, speed = rng.uniform(11.0, 12.3), rng.uniform(1.0, 2.5)
        elif i in fast:
            r_eq, speed = rng.uniform(9.0, 11.0), rng.uniform(7.0, 10.0)
        else:
            r_eq, speed = rng.uniform(7.0, 11.0), rng.uniform(1.0, 3.5)
        axes = _shape_axes(rng, r_eq, ndim)
        for _ in range(10_000):
            center = rng.uniform(0, size - 1, size=ndim)
            if _fits(center, float(axes.max()), size, obstacles):
                break
        else:
            raise ValueError(f"cannot place {n_cells} cells in a {size}^{ndim} image: too crowded")
        obstacles.append((center, float(axes.max())))
        cell = _Cell(
            label=i + 1,
            center=center,
            axes=axes,
            rotation=_random_rotation(rng, ndim),
            velocity=_unit(rng, ndim) * speed,
            begin=0,
        )
        if i in parents:
            cell.divides_at = int(div_frames[parents.index(i)])
        cells.append(cell)

    # debris: static specks, each visible during its own span of frames; half of them for the
    # whole movie, the rest for 2-3 frames somewhere in the middle
    n_debris = max(2, n_cells // 2)
    debris: list[tuple[np.ndarray, int, int]] = []
    for k in range(n_debris):
        for _ in range(10_000):
            center = rng.uniform(0, size - 1, size=ndim)
            if _fits(center, DEBRIS_RADIUS, size, obstacles):
                break
        else:
            raise ValueError("cannot place debris: too crowded")
        obstacles.append((center, DEBRIS_RADIUS))
        if k % 2 == 0 or n_frames < 4:
            first, last = 0, n_frames - 1
        else:
            length = int(rng.integers(2, 4))
            first = int(rng.integers(1, n_frames - length + 1))
            last = min(n_frames - 2, first + length - 1)
        debris.append((center, first, last))
    debris_obstacles = [(c, DEBRIS_RADIUS) for c, _, _ in debris]

    # cells drifting in through the image border in the second half of the movie
    n_enter = max(1, n_cells // 8) if n_frames >= 6 else 0
    enter_frames = rng.integers(n_frames // 2, n_frames - 2, size=n_enter).tolist()

    alive = list(cells)
    next_label = n_cells + 1
    for t in range(n_frames):
        if t > 0:
            # divisions happen before motion: daughters take the parent's place
            for parent in [c for c in alive if c.divides_at == t]:
                others = [(c.center, c.radius) for c in alive if c is not parent]
                daughters = _divide(rng, parent, others + debris_obstacles, size, next_label, t)
                if daughters is None:  # no room this frame: try again next frame
                    if t + 1 < n_frames:
                        parent.divides_at = t + 1
                    continue
                parent.end = t - 1
                alive.remove(parent)
                alive.extend(daughters)
                cells.extend(daughters)
                next_label += 2
            for cell in alive:
                if cell.begin == t:
                    continue  # newborn cells keep their birth position
                _move(rng, cell, alive, debris_obstacles, size)
            for _ in range(enter_frames.count(t)):
                others = [(c.center, c.radius) for c in alive] + debris_obstacles
                newcomer = _enter(rng, others, size, ndim, next_label, t)
                if newcomer is not None:
                    alive.append(newcomer)
                    cells.append(newcomer)
                    next_label += 1
        for cell in alive:
            cell.positions[t] = cell.center.copy()
    for cell in alive:
        cell.end = n_frames - 1
    return cells, debris


def _enter(
    rng: np.random.Generator,
    obstacles: list[tuple[np.ndarray, float]],
    size: int,
    ndim: int,
    label: int,
    t: int,
) -> _Cell | None:
    """A slow cell about two thirds inside the image, heading inwards; None if there is no room."""
    r_eq = rng.uniform(8.0, 10.0)
    axes = _shape_axes(rng, r_eq, ndim)
    radius = float(axes.max())
    for _ in range(200):
        axis, side = int(rng.integers(ndim)), int(rng.integers(2))
        center = rng.uniform(radius + 2.0, size - 3.0 - radius, size=ndim)
        center[axis] = 0.2 * radius if side == 0 else size - 1 - 0.2 * radius
        if all(np.linalg.norm(center - c) >= radius + r + GAP for c, r in obstacles):
            inward = np.zeros(ndim)
            inward[axis] = 1.0 if side == 0 else -1.0
            return _Cell(
                label=label,
                center=center,
                axes=axes,
                rotation=_random_rotation(rng, ndim),
                velocity=inward * rng.uniform(2.5, 3.5),
                begin=t,
                entering=True,
            )
    return None


def _divide(
    rng: np.random.Generator,
    parent: _Cell,
    obstacles: list[tuple[np.ndarray, float]],
    size: int,
    next_label: int,
    t: int,
) -> list[_Cell] | None:
    """Two daughters of half the parent's volume, side by side where the parent was."""
    ndim = parent.center.size
    r_eq = float(np.prod(parent.axes) ** (1.0 / ndim)) * 0.5 ** (1.0 / ndim)
    for _ in range(64):
        u = _unit(rng, ndim)
        axes = [_shape_axes(rng, r_eq, ndim) for _ in range(2)]
        rotations = [_random_rotation(rng, ndim) for _ in range(2)]
        offset = (max(a.max() for a in axes) + GAP / 2 + 0.5) * u
        centers = [parent.center + offset, parent.center - offset]
        if _fits(centers[0], axes[0].max(), size, obstacles) and _fits(
            centers[1], axes[1].max(), size, obstacles
        ):
            speed = rng.uniform(1.5, 3.0)
            return [
                _Cell(
                    label=next_label + k,
                    center=centers[k],
                    axes=axes[k],
                    rotation=rotations[k],
                    velocity=(u if k == 0 else -u) * speed,
                    begin=t,
                    parent=parent.label,
                )
                for k in range(2)
            ]
    return None


def _move(
    rng: np.random.Generator,
    cell: _Cell,
    alive: list[_Cell],
    debris: list[tuple[np.ndarray, float]],
    size: int,
) -> None:
    """One smooth step: turn a little, vary the pace, bounce off walls and neighbours, or wait."""
    ndim = cell.center.size
    speed = float(np.linalg.norm(cell.velocity))
    step = speed * rng.uniform(0.75, 1.25)
    obstacles = [(c.center, c.radius) for c in alive if c is not cell] + debris
    if cell.entering:  # straight in until fully inside; only other objects are in the way
        new = cell.center + cell.velocity / speed * step
        if all(np.linalg.norm(new - c) >= cell.radius + r + GAP for c, r in obstacles):
            cell.center = new
        cell.entering = not _fits(cell.center, cell.radius, size, obstacles)
        return
    direction = cell.velocity / speed + rng.normal(scale=0.25, size=ndim)
    direction /= np.linalg.norm(direction)
    candidates = [direction, -direction] + [_unit(rng, ndim) for _ in range(8)]
    for d in candidates:
        new = cell.center + d * step
        if _fits(new, cell.radius, size, obstacles):
            cell.center = new
            cell.velocity = d * speed
            return
    cell.velocity = -cell.velocity  # boxed in: stay put this frame


def _box(center: np.ndarray, radius: float, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the image around ``center`` and the pixel coordinates inside them (..., ndim)."""
    lo = np.maximum(np.floor(center - radius - 1).astype(int), 0)
    hi = np.minimum(np.ceil(center + radius + 2).astype(int), shape)
    ranges = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return region, np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1)


def _render(
    cells: list[_Cell],
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


def _write_gt(gt_dir: Path, labels: np.ndarray, cells: list[_Cell]) -> None:
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
    cells, debris = _simulate(rng, n_frames, size, n_cells, divisions, ndim)
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
