"""PostgreSQL names for a sweep's databases and schemas, within the 63 bytes PostgreSQL keeps
(longer identifiers are silently truncated, so two long names could become one)."""

from __future__ import annotations

import hashlib
import re

from gridsearch.spec import Sweep
from gridsearch.workspace import Workspace

_MAX_IDENTIFIER = 63
_HASH_CHARS = 10
_WORKDIR_HASH_CHARS = 8


def fit_identifier(stem: str, suffix: str, key: str) -> str:
    """``stem + suffix`` when it fits in 63 bytes (so names in use stay what they are); else the stem
    is cut and a hash of ``key`` (the full name it stands for) keeps two cut names apart."""
    name = stem + suffix
    if len(name.encode()) <= _MAX_IDENTIFIER:
        return name
    tail = f"_{hashlib.sha256(key.encode()).hexdigest()[:_HASH_CHARS]}{suffix}"
    return stem.encode()[: _MAX_IDENTIFIER - len(tail.encode())].decode(errors="ignore") + tail


def db_name(sweep: Sweep, what: str) -> str:
    """PostgreSQL folds case and dislikes '-': one predictable name per sweep and role, whole up to
    63 bytes (as it always was), cut and hashed beyond (the state and main names would coincide)."""
    base = re.sub(r"[^a-z0-9_]", "_", sweep.name.lower())
    return fit_identifier(f"gs_{base}", f"_{what}", sweep.name)


def schema_name(sweep: Sweep, ws: Workspace) -> str:
    """The schema of one sweep in a user's database: its name, and a hash of its workdir's path so
    that two workdirs of one sweep file never share tables."""
    digest = hashlib.sha256(str(ws.root.resolve()).encode()).hexdigest()[:_WORKDIR_HASH_CHARS]
    return db_name(sweep, digest)
