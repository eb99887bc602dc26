"""The three ultrack database stages and the fingerprints that decide what must be recomputed."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
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

    @property
    def clear_mode(self) -> str:
        """`ultrack clear_database` mode that must run before this stage."""
        return {Stage.SEGMENT: "all", Stage.LINK: "links", Stage.SOLVE: "solutions"}[self]

    @classmethod
    def parse(cls, text: str) -> Stage:
        return cls[text.upper()]


SECTION_OF = {Stage.SEGMENT: "segmentation", Stage.LINK: "linking", Stage.SOLVE: "tracking"}
STAGE_OF_SECTION = {v: k for k, v in SECTION_OF.items()}

# Keys that change how a stage is executed, not what it computes (DESIGN.md: n_workers gave identical
# nodes, links and tracks); keeping them out of fingerprints lets the executor choose them freely.
EXECUTION_KEYS = frozenset({"segmentation.n_workers", "linking.n_workers", "tracking.n_threads"})


def stage_of_key(dotted: str) -> Stage:
    section = dotted.split(".", 1)[0]
    return STAGE_OF_SECTION[section]


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
        params = {
            k: v
            for k, v in sections[stage.section].items()
            if f"{stage.section}.{k}" not in EXECUTION_KEYS
        }
        upstream = _digest(upstream, stage.section, canonical_json(params))
        out[stage] = upstream
    return out


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
