"""optuna-dashboard on a sweep's study: the interactive view of the same trials the tables show.

optuna-dashboard is an optional extra. A PostgreSQL password never goes on a command line (any user
on the machine can read it from the process list): such storages are served through the Python API
with a storage object that carries the password in its engine arguments."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

MISSING = "optuna-dashboard is not installed: pip install 'gridsearch[dashboard]'"
DEFAULT_HOST = "127.0.0.1"  # the study is not for the whole network unless asked


class DashboardMissing(RuntimeError):
    """The optional extra is absent; the message is the one line telling how to get it."""

    def __init__(self) -> None:
        super().__init__(MISSING)


def _has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:  # not an SQLAlchemy URL (redis://, a journal file …): look for user:pass@
        head = url.split("://", 1)[-1].split("@", 1)
        return len(head) == 2 and ":" in head[0]


def dashboard_command(storage_url: str, port: int, host: str | None = None) -> list[str]:
    """The command line, for printing or for running where only the executable exists."""
    if _has_password(storage_url):
        raise ValueError(
            "the storage URL holds a password, which a command line would show to every user; "
            "pass a storage object to launch() instead"
        )
    cmd = ["optuna-dashboard", storage_url, "--port", str(port)]
    if host is not None:
        cmd += ["--host", host]
    return cmd


def storage_for(url: str, engine_kwargs: dict[str, Any] | None = None) -> str | BaseStorage:
    """What launch() should get for a ledger: the URL when it holds no secret, else an RDBStorage
    built with the ledger's engine kwargs (where the PostgreSQL password lives)."""
    if not engine_kwargs:
        return url
    import optuna

    return optuna.storages.RDBStorage(url, engine_kwargs=dict(engine_kwargs))


def _executable() -> str | None:
    """The console script next to this interpreter first (a venv need not be on PATH)."""
    local = Path(sys.executable).parent / "optuna-dashboard"
    if local.is_file():
        return str(local)
    return shutil.which("optuna-dashboard")


def launch(storage: str | BaseStorage, port: int = 8080, host: str = DEFAULT_HOST) -> None:
    """Serve the dashboard until interrupted (blocks). In-process through optuna_dashboard.run_server
    when importable, so a storage object (and its password) never leaves this process; else the
    optuna-dashboard executable for a plain URL; else DashboardMissing."""
    try:
        import optuna_dashboard
    except ImportError:
        optuna_dashboard = None
    if optuna_dashboard is not None:
        optuna_dashboard.run_server(storage, host=host, port=port)
        return
    exe = _executable()
    if isinstance(storage, str) and exe is not None:
        cmd = dashboard_command(storage, port, host)
        subprocess.run([exe, *cmd[1:]], check=True)
        return
    raise DashboardMissing()
