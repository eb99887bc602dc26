"""Writing files so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` in one rename.

    Beside, not in /tmp: a rename is only atomic within one filesystem (NFS and Lustre included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: Path, data: str | bytes | Callable[[Path], object], mode: int | None = None) -> Path:
    """Write text, bytes, or whatever ``data(tmp_path)`` writes, then rename into place."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def tail(path: Path | None, lines: int = 8) -> str:
    """The last lines of a log, read from its end (job logs can be large)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stamp() -> str:
    """A timestamp for archive names, to the millisecond: two `--restart`s within one second (a
    script, a quick retry) must not collide on their archive's name."""
    now = time.time()
    return time.strftime("%Y%m%d%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}"


def tree_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist), without following links and
    without the entries of ``path`` itself named in ``skip``. One scandir per directory: a
    workdir's logs hold a file per SLURM task. What cannot be read counts as nothing."""
    total = 0
    stack = [(path, True)]
    while stack:
        here, top = stack.pop()
        try:
            with os.scandir(here) as entries:
                for e in entries:
                    if top and e.name in skip:
                        continue
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((Path(e.path), False))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total
