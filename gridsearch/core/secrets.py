"""Variables that carry the database password, and keeping them out of what others can read.

A child's environment is readable in /proc by its owner; a SLURM job's is also saved by slurmctld
(and slurmdbd, with job_env accounting) for as long as the job is remembered. So processes that
need the password get a libpq pgpass file (0600, in a 0700 directory) instead."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

PASSWORD_ENV = "ULTRACK_DB_PW"
SECRET_ENV = (PASSWORD_ENV, "PGPASSWORD")


def without_secrets(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) minus every variable that may hold the password."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in SECRET_ENV}


def _escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def write_pgpass(path: Path, password: str, user: str = "*") -> Path:
    """libpq's password file, for any host, port and database: 0600 in a 0700 directory, written
    so that no moment exists where another user could read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"*:*:*:{_escape(user)}:{_escape(password)}\n")
    os.replace(tmp, path)
    return path


def read_pgpass(path: Path) -> str:
    """The password of a file written by ``write_pgpass``: its one line's last field, unescaped."""
    line = path.read_text().splitlines()[0]
    fields = re.split(r"(?<!\\):", line.replace("\\\\", "\0"))
    return fields[-1].replace("\\:", ":").replace("\0", "\\")
