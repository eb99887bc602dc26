"""The three ultrack database stages, the fingerprints that decide what must be recomputed, and how
a stage splits into batches."""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any


class Stage(enum.IntEnum):
    """Ordered so that `a < b` means `a` runs upstream of `b`."""

    SEGMENT = 0
    LINK = 1
    SOLVE = 2

    def __bool__(self) -> bool:
        """SEGMENT is 0: without this, `if stage:` would silently treat it as missing."""
        return True

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def section(self) -> str:
        return SECTION_OF[self]

    @classmethod
    def parse(cls, text: str) -> Stage:
        return cls[text.upper()]


SECTION_OF = {Stage.SEGMENT: "segmentation", Stage.LINK: "linking", Stage.SOLVE: "tracking"}

# Keys that change how a stage is executed, not what it computes (measured: batches of 1 and 3
# frames gave identical nodes, links and tracks); keeping them out of fingerprints lets the
# executor choose them freely.
EXECUTION_KEYS = frozenset({"segmentation.n_workers", "linking.n_workers", "tracking.n_threads"})


def canonical_json(value: Any) -> str:
    """Key-order independent, whitespace free: the same object always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def fingerprints(sections: Mapping[str, Mapping[str, Any]], data_identity: str) -> dict[Stage, str]:
    """One hash per stage, chained so that a stage's hash covers everything upstream of it.

    `sections` is the validated ultrack config (JSON-mode dump, so `6` and `6.0` agree)."""
    out: dict[Stage, str] = {}
    upstream = data_identity
    for stage in Stage:
        upstream = chain_fingerprint(upstream, stage, stage_params_json(stage, sections[stage.section]))
        out[stage] = upstream
    return out


def stage_params_json(stage: Stage, values: Mapping[str, Any]) -> str:
    """What a stage's fingerprint hashes of its own section: the execution keys left out. Apart
    from the chaining so that a grid can compute it once per distinct section (spec._expand)."""
    return canonical_json({k: v for k, v in values.items() if f"{stage.section}.{k}" not in EXECUTION_KEYS})


def chain_fingerprint(upstream: str, stage: Stage, params_json: str) -> str:
    """One link of the chain: the stage's fingerprint from the one upstream of it."""
    return _digest(upstream, stage.section, params_json)


def chain_from(upstream: str, stage: Stage) -> Callable[[bytes], str]:
    """`chain_fingerprint(upstream, stage, ·)` for many children of one prefix, the shared part
    hashed once; takes the params JSON encoded (the same bytes `_digest` hashes)."""
    head = hashlib.sha256()
    for part in (upstream, stage.section):
        head.update(part.encode())
        head.update(b"\0")

    def finish(params_json: bytes) -> str:
        h = head.copy()
        h.update(params_json)
        h.update(b"\0")
        return h.hexdigest()

    return finish


def earliest_changed_stage(
    held: Mapping[Stage, str | None], wanted: Mapping[Stage, str]
) -> Stage | None:
    """First stage whose result in the database is not the one wanted; None: all reusable."""
    for stage in Stage:
        if held.get(stage) != wanted[stage]:
            return stage
    return None


def start_label(stage: Stage | None) -> str:
    """Where a trial starts; 'export' when the database already holds its solution."""
    return "export" if stage is None else stage.label


def batch_count(stage: Stage, last_frame: int, frames_per_batch: int, window_size: int | None) -> int:
    """How many batches ultrack's own loops make of a stage whose last frame with nodes is
    `last_frame` (ultrack reads it from the database: `max(nodes.t)`, see SQLTracking.num_batches).

    Planned from the movie's length, this is the most there can be: a movie whose last frames have
    no cells leaves fewer, and the batches past ultrack's count have nothing to do."""
    if stage == Stage.SEGMENT:
        return math.ceil((last_frame + 1) / frames_per_batch)
    if stage == Stage.LINK:
        return math.ceil(last_frame / frames_per_batch)
    return math.ceil(last_frame / (window_size or last_frame + 1))


def stage_phases(
    stage: Stage, n_frames: int, frames_per_batch: int, window_size: int | None
) -> list[list[int]]:
    """Batch indices in phases: every batch of a phase may run at once, phases run in order.

    segment: batch 0 creates the tables, then the rest; link: all at once; solve: even windows, then
    odd (measured: running them together gives different results)."""
    n = batch_count(stage, n_frames - 1, frames_per_batch, window_size)
    if stage == Stage.SEGMENT:
        return [[0], list(range(1, n))] if n > 1 else [[0]]
    if stage == Stage.LINK:
        return [list(range(n))]
    return [p for p in (list(range(0, n, 2)), list(range(1, n, 2))) if p]
