"""The cells' lives: placement, motion without overlap, divisions, newcomers and debris."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GAP = 3.0
"""Minimum free space (px) between the bounding spheres of two objects: keeps foreground blobs apart."""

DEBRIS_RADIUS = 2.5
"""Bounding radius of a debris speck, used to keep cells away from it."""


@dataclass
class Cell:
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


def simulate(
    rng: np.random.Generator,
    n_frames: int,
    size: int,
    n_cells: int,
    divisions: int,
    ndim: int,
) -> tuple[list[Cell], list[tuple[np.ndarray, int, int]]]:
    """Move cells without overlap; returns the tracks and the debris (center, first, last frame).

    The order of the random draws defines the movie's bytes: placement, debris, entries, motion."""
    obstacles: list[tuple[np.ndarray, float]] = []
    cells = _place_cells(rng, n_frames, size, n_cells, divisions, ndim, obstacles)
    debris = _place_debris(rng, n_frames, size, n_cells, ndim, obstacles)
    # cells drifting in through the image border in the second half of the movie
    n_enter = max(1, n_cells // 8) if n_frames >= 6 else 0
    enter_frames = rng.integers(n_frames // 2, n_frames - 2, size=n_enter).tolist()
    _run_frames(rng, cells, [(c, DEBRIS_RADIUS) for c, _, _ in debris], enter_frames, n_frames, size, ndim)
    return cells, debris


def _place_cells(rng: np.random.Generator, n_frames: int, size: int, n_cells: int, divisions: int,
                 ndim: int, obstacles: list[tuple[np.ndarray, float]]) -> list[Cell]:
    """Frame 0: slow cells, fast cells (the ones max_distance decides about) and dividing ones."""
    n_div = min(max(divisions, 0), n_cells) if n_frames >= 3 else 0
    order = rng.permutation(n_cells)
    parents = order[:n_div].tolist()
    n_fast = round(0.375 * (n_cells - n_div))
    fast = set(order[n_div : n_div + n_fast].tolist())
    div_frames = np.linspace(n_frames // 2, (2 * n_frames) // 3, n_div).round().astype(int)
    div_frames = np.clip(div_frames, 1, n_frames - 1)
    cells: list[Cell] = []
    for i in range(n_cells):
        if i in parents:
            r_eq, speed = rng.uniform(11.0, 12.3), rng.uniform(1.0, 2.5)
        elif i in fast:
            r_eq, speed = rng.uniform(9.0, 11.0), rng.uniform(7.0, 10.0)
        else:
            r_eq, speed = rng.uniform(7.0, 11.0), rng.uniform(1.0, 3.5)
        axes = _shape_axes(rng, r_eq, ndim)
        center = _free_spot(rng, float(axes.max()), size, ndim, obstacles,
                            f"cannot place {n_cells} cells in a {size}^{ndim} image: too crowded")
        cell = Cell(label=i + 1, center=center, axes=axes, rotation=_random_rotation(rng, ndim),
                     velocity=_unit(rng, ndim) * speed, begin=0)
        if i in parents:
            cell.divides_at = int(div_frames[parents.index(i)])
        cells.append(cell)
    return cells


def _free_spot(rng: np.random.Generator, radius: float, size: int, ndim: int,
               obstacles: list[tuple[np.ndarray, float]], crowded: str) -> np.ndarray:
    """A random center where a sphere of ``radius`` fits; it becomes an obstacle."""
    for _ in range(10_000):
        center = rng.uniform(0, size - 1, size=ndim)
        if _fits(center, radius, size, obstacles):
            obstacles.append((center, radius))
            return center
    raise ValueError(crowded)


def _place_debris(rng: np.random.Generator, n_frames: int, size: int, n_cells: int, ndim: int,
                  obstacles: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, int, int]]:
    """Static specks, each visible during its own span of frames; half of them for the whole
    movie, the rest for 2-3 frames somewhere in the middle."""
    debris: list[tuple[np.ndarray, int, int]] = []
    for k in range(max(2, n_cells // 2)):
        center = _free_spot(rng, DEBRIS_RADIUS, size, ndim, obstacles, "cannot place debris: too crowded")
        if k % 2 == 0 or n_frames < 4:
            first, last = 0, n_frames - 1
        else:
            length = int(rng.integers(2, 4))
            first = int(rng.integers(1, n_frames - length + 1))
            last = min(n_frames - 2, first + length - 1)
        debris.append((center, first, last))
    return debris


def _run_frames(rng: np.random.Generator, cells: list[Cell],
                debris_obstacles: list[tuple[np.ndarray, float]], enter_frames: list[int], n_frames: int,
                size: int, ndim: int) -> None:
    """Frame by frame: divisions (daughters take the parent's place), motion, then newcomers."""
    alive = list(cells)
    next_label = len(cells) + 1
    for t in range(n_frames):
        if t > 0:
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
                if cell.begin != t:  # newborn cells keep their birth position
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


def _enter(
    rng: np.random.Generator,
    obstacles: list[tuple[np.ndarray, float]],
    size: int,
    ndim: int,
    label: int,
    t: int,
) -> Cell | None:
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
            return Cell(
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
    parent: Cell,
    obstacles: list[tuple[np.ndarray, float]],
    size: int,
    next_label: int,
    t: int,
) -> list[Cell] | None:
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
                Cell(
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
    cell: Cell,
    alive: list[Cell],
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
