"""What ultrack's models made of a sweep's config, kept in the workdir so that a view of an
unchanged sweep need not import ultrack (4-6 s: its package imports torch) to validate it again.

`sweep` validates everything with ultrack's models and records, in `workdir/validated.json`, a digest
of exactly what those models were given (the base config's sections and the grid, as parsed) and of
the models themselves (their files, pydantic's version), with what they made of it: the base sections
and each grid value as dumped. A later command whose digest matches rebuilds every trial's sections
from the record; any difference, however small, and the command validates with ultrack's models
again. gridsearch's own rules
(validate.py) are not recorded: they run on every command. The record also keeps the inputs'
headers (inputs.Headers), trusted while their files keep their size and mtime."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridsearch.core.files import atomic_write
from gridsearch.stages import canonical_json

RECORD = "validated.json"  # in the workdir
FORMAT = 1


def ultrack_models() -> str:
    """Which config models validate here: the size and mtime of ultrack's files that define them,
    found without importing ultrack (importlib.metadata alone costs 60 ms), and pydantic's version."""
    import pydantic

    spec = importlib.util.find_spec("ultrack")
    if spec is None or spec.origin is None:
        return "none"
    files = sorted((Path(spec.origin).parent / "config").glob("*.py"))
    return pydantic.VERSION + "".join(f"\n{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def digest(base_raw: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> str:
    """What ultrack's models are given for a sweep, and which models: equal digests, equal results."""
    doc = {"format": FORMAT, "ultrack": ultrack_models(), "base": base_raw, "grid": grid}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


@dataclass
class Validated:
    """The validated base sections (JSON mode) and, per swept key, each grid value as ultrack's
    model dumps it. A trial's section is the base section with its swept values put in: `record`
    checks that this reproduces what the models made of every section, and gives up otherwise."""

    digest: str
    base: dict[str, dict[str, Any]]
    values: dict[str, list[Any]]
    _unset: set[tuple[str, int]] = field(default_factory=set, repr=False)
    broken: bool = False  # some section is not base + swept values: nothing to record
    trusted: bool = False  # read from the record: sections come from it, not from ultrack's models

    @classmethod
    def start(cls, digest_: str, base: dict[str, dict[str, Any]],
              grid: Mapping[str, Sequence[Any]]) -> Validated:
        """An empty record for a full validation to fill in, section by section."""
        unset = {(k, i) for k, vs in grid.items() for i in range(len(vs))}
        return cls(digest_, base, {k: [None] * len(vs) for k, vs in grid.items()}, unset)

    def section(self, section: str, swept: Mapping[str, int]) -> dict[str, Any]:
        """The section of a trial from the record; `swept` maps the section's swept keys to value indices."""
        out = dict(self.base[section])
        for key, i in swept.items():
            out[key.partition(".")[2]] = self.values[key][i]
        return out

    def record(self, section: str, swept: Mapping[str, int], validated: Mapping[str, Any]) -> None:
        """Note what ultrack's models made of one section; the record is given up if it could not
        reproduce that section exactly."""
        if self.broken:
            return
        for key, i in swept.items():
            if (key, i) in self._unset:
                self._unset.discard((key, i))
                self.values[key][i] = validated.get(key.partition(".")[2])
        if self.section(section, swept) != validated:
            self.broken = True

    def complete(self) -> bool:
        return not self.broken and not self._unset


@dataclass(frozen=True)
class Record:
    """What the last `sweep` validated, as `workdir/validated.json` holds it."""

    doc: dict[str, Any]

    def config(self, digest_: str) -> Validated | None:
        """The config's validation, if it is that of the config whose digest is `digest_`."""
        d = self.doc
        with contextlib.suppress(KeyError, TypeError):
            if d["format"] == FORMAT and d["digest"] == digest_:
                return Validated(digest_, d["base"], d["values"], trusted=True)
        return None

    @property
    def headers(self) -> dict[str, Any]:
        """The inputs' headers and the stat lines of their files (inputs.Headers)."""
        h = self.doc.get("headers") if self.doc.get("format") == FORMAT else None
        return h if isinstance(h, dict) else {}


def read(workdir: Path) -> Record:
    """The record, empty when there is none or it cannot be read: then everything is validated."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads((workdir / RECORD).read_text())
        if isinstance(doc, dict):
            return Record(doc)
    return Record({})


def write(workdir: Path, config: Validated, headers: Mapping[str, Any]) -> None:
    """After a full validation: the config's part only when it reproduces every section exactly."""
    doc: dict[str, Any] = {"format": FORMAT, "headers": dict(headers)}
    if config.complete():
        doc.update(digest=config.digest, base=config.base, values=config.values)
    atomic_write(workdir / RECORD, json.dumps(doc))
