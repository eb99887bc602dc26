"""The README's tutorial stays true: its commands run as written and print what it shows.

The tutorial section's ```console blocks hold commands (`$ gridsearch ...`, continued by a trailing
backslash) each followed by its output as shown. They run in order, from a temporary folder holding
a copy of sweeps/data, as `python -m gridsearch.cli`, at 80 columns. Every shown line must appear in
the real output, in order, whole: `...` alone on a line stands for lines left out, `...` inside a
line for any text, and a duration (`40.0 s`) for any duration; a leading timestamp (a job log's) and
trailing blanks are ignored. The ```yaml block is an excerpt of the sweep file init writes, the
```toml block of best's config, checked the same way. The picture's caption names the plot it shows:
plot must write it, and docs/ holds a small copy of it.

init is run as on the machine the README shows (no SLURM, no PostgreSQL binaries), whatever this one
has: its first line and the file's backend follow the machine, and a sweep here must never go to a
cluster the test machine happens to reach."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## Tutorial: from your config.toml to the best parameters"

# `gridsearch` as on a laptop without SLURM or PostgreSQL: the machine the README's outputs show.
CLI = [sys.executable, "-c",
       "import gridsearch.scaffold as s; "
       "s.probe_machine = lambda: s.Machine(slurm_cpus=None, postgres=None, cores=2); "
       "from gridsearch.cli import main; main(prog_name='gridsearch')"]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
KEY = re.compile(r"[0-9a-f]{12}")
WILD = re.compile(r"(\.\.\.|\b[0-9a-f]{12}\b|\b\d+(?:\.\d+)? s\b)")


@dataclass
class Step:
    argv: list[str]
    shown: list[str] = field(default_factory=list)


def section() -> str:
    text = README.read_text()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    body = text.split(HEADING, 1)[1]
    return body.split("\n## ", 1)[0]


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of each fenced code block."""
    return [(m.group(1).strip(), m.group(2).splitlines())
            for m in re.finditer(r"^```([^\n]*)\n(.*?)^```$", text, re.M | re.S)]


def steps(text: str) -> list[Step]:
    out: list[Step] = []
    for info, lines in blocks(text):
        if info != "console":
            continue
        it = iter(lines)
        for line in it:
            if not line.startswith("$ "):
                assert out, f"output before any command: {line!r}"
                out[-1].shown.append(line)
                continue
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + next(it).strip()
            argv = shlex.split(command)
            assert argv[0] == "gridsearch", f"the tutorial runs only gridsearch commands: {command!r}"
            out.append(Step(argv))
    return out


def pattern(shown: str, keys: dict[str, str]) -> re.Pattern[str]:
    """`...`: any text; a duration: any; a trial key: the key it stood for so far, else any key
    (bound by the match, see `assert_shown`)."""
    out, named = [], set()
    for i, part in enumerate(WILD.split(shown.rstrip())):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part == "...":
            out.append(".*")
        elif KEY.fullmatch(part):
            if part in keys:
                out.append(re.escape(keys[part]))
            elif part in named:
                out.append(f"(?P=k{part})")
            else:
                named.add(part)
                out.append(f"(?P<k{part}>[0-9a-f]{{12}})")
        else:
            out.append(r"\d+(?:\.\d+)? s")
    return re.compile("".join(out))


def assert_shown(shown: list[str], real: str, what: str, keys: dict[str, str]) -> None:
    """Each shown line (but `...` alone) matches a real line, after the previous one's. `keys`
    maps the README's trial keys to the real ones, across commands: a trial key hashes the data's
    path and file times too, so each clone has its own, but one trial keeps its key throughout."""
    lines = [TIMESTAMP.sub("", line).rstrip() for line in real.splitlines()]
    at = 0
    for line in shown:
        if line.strip() == "...":
            continue
        p = pattern(line, keys)
        for i in range(at, len(lines)):
            if m := p.fullmatch(lines[i]):
                keys.update({name[1:]: value for name, value in m.groupdict().items()})
                assert len(set(keys.values())) == len(keys), f"{what}: two trials, one key: {keys}"
                at = i + 1
                break
        else:
            raise AssertionError(f"{what}: the README shows {line!r}, not found (in order) in:\n{real}")


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_the_readme_tutorial_runs_as_written(tmp_path: Path) -> None:
    text = section()
    run = steps(text)
    assert [s.argv[1] for s in run] == ["init", "plan", "sweep", "status", "results", "best", "plot"]
    excerpts = {info: lines for info, lines in blocks(text) if info in ("yaml", "toml")}
    assert set(excerpts) == {"yaml", "toml"}
    pictures = re.findall(r"!\[[^\]]*?(plots/\S+\.png)\]\((docs/[^)]+\.png)\)", text)
    assert len(pictures) == 1, "one picture, its caption naming the plot it shows"

    shutil.copytree(ROOT / "sweeps" / "data", tmp_path / "sweeps" / "data")
    env = {**os.environ, "COLUMNS": "80"}
    keys: dict[str, str] = {}
    for step in run:
        r = subprocess.run(CLI + step.argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        command = shlex.join(step.argv)
        assert r.returncode == 0, f"{command} exited {r.returncode}:\n{r.stdout}{r.stderr}"
        assert_shown(step.shown, r.stdout, command, keys)

    init, best = run[0].argv, run[5].argv
    assert_shown(excerpts["yaml"], (tmp_path / option(init, "-o")).read_text(), "the sweep file", keys)
    assert_shown(excerpts["toml"], (tmp_path / option(best, "-o")).read_text(), "best's config", keys)

    plot, copy = pictures[0]
    made = tmp_path / plot
    assert made.is_file(), f"plot did not write {plot}, which the README pictures"
    committed = ROOT / copy
    assert committed.stat().st_size < 200_000, f"{copy}: keep the README's picture small"
    assert png_size(committed) == png_size(made), f"{copy} is not a copy of {plot} as plot draws it now"
