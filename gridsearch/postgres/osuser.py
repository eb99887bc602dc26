"""Running the server when gridsearch runs as root: initdb and pg_ctl refuse root, so they run as an
unprivileged OS user (the data dir's owner, else ``postgres``, else the system user
``gridsearch-pg``, created on demand). Off root every function here is the identity."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from gridsearch.core.errors import first_line
from gridsearch.core.secrets import without_secrets
from gridsearch.postgres.client import PostgresError

FALLBACK_OS_USER = "gridsearch-pg"
# Variables that could carry a password into a child's /proc/<pid>/environ.
_USERADD_EXISTS = 9  # useradd's exit status when a concurrent starter created the user first


def is_root() -> bool:
    return os.geteuid() == 0


def server_os_user(data_dir: Path) -> str:
    """Who runs initdb/pg_ctl: the data dir's owner, else self, else (as root) a system user."""
    if data_dir.exists():
        return pwd.getpwuid(data_dir.stat().st_uid).pw_name
    if not is_root():
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return FALLBACK_OS_USER


def current_os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def ensure_os_user(user: str) -> None:
    """As root, make sure the server user exists: if it does not, create the fallback system user."""
    if not is_root():
        return
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode not in (0, _USERADD_EXISTS):
        raise PostgresError(
            f"cannot create system user {FALLBACK_OS_USER!r} to run PostgreSQL (initdb refuses root): "
            f"{first_line(res.stderr or res.stdout)}"
        )


def check_traversable(user: str, root: Path) -> None:
    """As root, ``user`` must be able to enter every ancestor of ``root``, or initdb fails obscurely."""
    if not is_root():
        return
    for parent in reversed(root.parents):
        res = subprocess.run(as_user(user, ["test", "-x", str(parent)]), capture_output=True, check=False)
        if res.returncode != 0:
            raise PostgresError(
                f"PostgreSQL runs as OS user {user!r}, which cannot enter {parent}; "
                f"choose a root outside it or `chmod o+x {parent}`"
            )


def chown_to(path: Path, user: str) -> None:
    """As root, hand a file we wrote to the server user (it must read it)."""
    if is_root():
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def private_dir(path: Path, user: str) -> None:
    """A 0700 directory owned by the server user; refuse one someone else owns or a symlink."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.lstat()
    owner_ok = {os.geteuid(), pwd.getpwnam(user).pw_uid}
    if path.is_symlink() or st.st_uid not in owner_ok:
        raise PostgresError(f"{path} is not a private directory of {user!r}; remove it")
    os.chmod(path, 0o700)
    chown_to(path, user)


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (through runuser when we are root)."""
    return ["runuser", "-u", user, "--", *argv] if is_root() else argv


def child_env() -> dict[str, str]:
    """Environment for server processes: nothing secret may reach /proc/<pid>/environ."""
    env = without_secrets()
    env.setdefault("LC_ALL", "C")
    return env
