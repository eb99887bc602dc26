"""Rules on sweep-file values that ultrack's and our pydantic models let through but that would
break a stage: non-finite numbers, empty windows, sizes that select nothing, a workdir that cannot
be created, SLURM resources sbatch would refuse. Each rule says why it exists; none refuses what
ultrack legitimately allows (a weight of any sign, a threshold outside [0, 1] ...)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gridsearch.core.errors import BadInput
from gridsearch.stages import Stage, stage_phases


class SpecError(BadInput):
    """Bad input: the message is one line naming what, where and why."""


def _borders_ok(v: Any) -> bool:
    return v is None or (len(v) <= 3 and all(b >= 0 for b in v))


# key -> (accepts the value, why). Checked on every trial's validated sections and on the base config.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "segmentation.min_area": (lambda v: v >= 0, "must be >= 0 (an area in pixels)"),
    "segmentation.max_area": (lambda v: v >= 1, "must be >= 1 (an area in pixels: 0 splits every "
                                               "region into single pixels)"),
    "segmentation.min_area_factor": (lambda v: v > 0, "must be > 0 (ultrack divides min_area by it)"),
    "linking.max_distance": (lambda v: v > 0, "must be > 0 (no candidate could link)"),
    "linking.max_neighbors": (lambda v: v >= 1, "must be >= 1 (no candidate could link)"),
    "tracking.window_size": (lambda v: v is None or v >= 1,
                             "must be > 0 or unset (the solve would have no batch)"),
    "tracking.overlap_size": (lambda v: v >= 0, "must be >= 0 (frames shared with each neighbouring window)"),
    "tracking.solution_gap": (lambda v: v >= 0, "must be >= 0 (a relative MIP gap)"),
    "tracking.time_limit": (lambda v: v > 0, "must be > 0 seconds (the solver would stop with no solution)"),
    "tracking.n_threads": (lambda v: v >= -1, "must be >= -1 (-1: all cores, 0: the solver's default)"),
    "tracking.image_border_size": (_borders_ok, "must be at most 3 sizes (Z, Y, X), each >= 0"),
}


def _numbers(value: Any, key: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _numbers(v, key)


def section_problem(sections: Mapping[str, Mapping[str, Any]]) -> str | None:
    """`key: why` of the first value a stage cannot work with, or None.

    `sections` is ultrack's validated config in Python mode (a JSON dump would turn NaN into null);
    every rule looks at one section, so any subset of the sections can be checked."""
    for section, values in sections.items():
        for name, value in values.items():
            for key, x in _numbers(value, f"{section}.{name}"):
                if not math.isfinite(x):
                    return f"{key}: must be a finite number, got {x} (ultrack would compute with it)"
    for key, (ok, why) in RULES.items():
        section, _, name = key.partition(".")
        if section not in sections:  # a single section checked on its own (spec._expand)
            continue
        value = sections[section].get(name)
        if not ok(value):
            return f"{key}: {value!r} {why}"
    tracking = sections.get("tracking", {})
    window, overlap = tracking.get("window_size"), tracking.get("overlap_size", 0)
    if window is not None and overlap >= window:
        return (f"tracking.overlap_size: {overlap} must be smaller than tracking.window_size ({window}); "
                "windows solved at once would share frames")
    return None


def batch_problem(sections: Mapping[str, Mapping[str, Any]], n_frames: int,
                  frames_per_batch: int) -> str | None:
    """A stage with no batch would be recorded as done without running: refuse it up front."""
    window = sections["tracking"].get("window_size")
    for stage in Stage:
        if not any(stage_phases(stage, n_frames, frames_per_batch, window)):
            return (f"{stage.section}: the {stage.label} stage would have no batch for {n_frames} frames "
                    f"(frames_per_batch {frames_per_batch}, window_size {window})")
    return None


def workdir_problem(workdir: Path) -> str | None:
    """Why the workdir cannot be created or used, or None. Checked before anything is created.

    os.access, not the mode bits: it also answers for root on a read-only filesystem (EROFS)."""
    existing = workdir
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing == workdir:
        return None if workdir.is_dir() else f"{workdir} exists and is not a directory"
    if not existing.is_dir():
        return f"cannot create {workdir}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create {workdir}: {existing} is not writable"
    return None


def check_writable(workdir: Path, spec_path: Path) -> None:
    """An existing workdir must be writable for a sweep (views only read it)."""
    if workdir.is_dir() and not os.access(workdir, os.W_OK | os.X_OK):
        raise SpecError(f"{spec_path}: workdir: {workdir} is not writable")


# sbatch --mem: an integer with an optional unit (K, M, G, T; M by default).
SBATCH_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds; or no limit.
SBATCH_TIME = re.compile(r"^(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|INFINITE|UNLIMITED)$", re.IGNORECASE)


def sbatch_mem(value: Any) -> str:
    """A YAML integer is megabytes, as sbatch reads it; anything else must be sbatch's format."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not SBATCH_MEM.match(text):
        raise ValueError(f"{value!r} is not an sbatch --mem value: an integer with an optional "
                         "K, M, G or T suffix, e.g. 16G")
    return text


def sbatch_time(value: Any) -> str:
    """Quoted only: YAML reads an unquoted 01:00:00 as the number 3600."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{value!r} is a number: quote it (YAML reads 01:00:00 as 3600), e.g. \"01:00:00\"")
    if not isinstance(value, str) or not SBATCH_TIME.match(value):
        raise ValueError(f"{value!r} is not an sbatch --time value: minutes, minutes:seconds, "
                         "hours:minutes:seconds, days-hours, days-hours:minutes or "
                         "days-hours:minutes:seconds")
    return value
