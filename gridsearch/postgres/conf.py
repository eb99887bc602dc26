"""The text a managed server reads and writes, as pure functions: testable without a server.

Rendered: ``gridsearch.conf`` (settings, included from postgresql.conf), ``pg_hba.conf`` and
``pg_ident.conf``. Parsed: ``postmaster.pid``, the port of the last start, and why initdb or a
start failed (the one line a user needs, picked out of PostgreSQL's output)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from gridsearch.core.errors import first_line

SETTINGS_FILE = "gridsearch.conf"
# Appended once to postgresql.conf by initdb's caller: our settings then win over the defaults.
INCLUDE_SETTINGS = f"\n# gridsearch settings, rewritten at every start\ninclude '{SETTINGS_FILE}'\n"
# The lines of postmaster.pid, in PostgreSQL's order (see pidfile.h).
PIDFILE_KEYS = ("pid", "data_dir", "start", "port", "socket_dir", "listen", "shm", "state")
# How many trailing server-log lines can hold the reason a start failed.
LOG_REASON_LINES = 50
_LOG_MESSAGE = re.compile(r"\b(LOG|FATAL|PANIC|ERROR):\s+(.*)")
# initdb puts the cause (e.g. a FATAL "No space left on device") between its progress lines.
_INITDB_MARKERS = ("fatal:", "no space left", "could not", "error")


def conf_str(value: str) -> str:
    """Quote a value for postgresql.conf: quotes are doubled, backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_settings(*, port: int, listen_addresses: str, socket_dir: str, max_connections: int) -> str:
    """``gridsearch.conf``: rewritten at every start, so a changed port or worker count applies."""
    settings = {
        "port": str(port),
        "listen_addresses": conf_str(listen_addresses),
        "unix_socket_directories": conf_str(socket_dir),
        "unix_socket_permissions": "0700",
        "max_connections": str(max_connections),
        "password_encryption": "'scram-sha-256'",
        # Never log statement text: ALTER ROLE ... PASSWORD must not reach the log.
        "log_statement": "'none'",
        "log_min_error_statement": "'panic'",
        "log_min_duration_statement": "-1",
        "log_connections": "off",
    }
    return "# written by gridsearch at start\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


def render_hba(superuser: str) -> str:
    """No ``trust`` anywhere: the socket is peer-only for the server's OS user, TCP needs SCRAM."""
    return (
        "# written by gridsearch: the socket is for the server's OS user (peer, via\n"
        "# pg_ident map 'gridsearch'); every TCP connection needs scram-sha-256.\n"
        f"local all {superuser} peer map=gridsearch\n"
        "host  all all 0.0.0.0/0 scram-sha-256\n"
        "host  all all ::/0      scram-sha-256\n"
    )


def render_ident(superuser: str, os_users: Iterable[str]) -> str:
    """Map each OS user allowed on the socket (the server's, and root driving it) to the superuser."""
    return "".join(f"gridsearch {u} {superuser}\n" for u in dict.fromkeys(os_users))


def configured_port(settings_text: str) -> int | None:
    """The port of the last start, from ``gridsearch.conf``: restarting on it keeps addresses valid."""
    m = re.search(r"^port\s*=\s*(\d+)", settings_text, re.MULTILINE)
    return int(m.group(1)) if m else None


def parse_pidfile(text: str) -> dict[str, str]:
    """``postmaster.pid`` by key; a file caught mid-write just yields fewer keys."""
    return {k: v.strip() for k, v in zip(PIDFILE_KEYS, text.splitlines(), strict=False)}


def start_failure_reason(log_lines: Sequence[str], fallback: str) -> str:
    """Why a start failed, from the server log: a bind error first, else the last FATAL/PANIC.

    A "contains errors" FATAL follows the line naming the bad setting, so both are kept."""
    msgs = [
        (m.group(1), m.group(2).strip())
        for ln in log_lines[-LOG_REASON_LINES:]
        if (m := _LOG_MESSAGE.search(ln))
    ]
    for _, msg in reversed(msgs):
        if "could not bind" in msg:
            return f"port already in use ({msg})"
    for i in range(len(msgs) - 1, -1, -1):
        level, msg = msgs[i]
        if level in ("FATAL", "PANIC"):
            if "contains errors" in msg and i > 0:
                return f"{msgs[i - 1][1]}; {msg}"
            return msg
    return first_line(fallback or "pg_ctl start failed")


def initdb_failure_reason(stdout: str, stderr: str) -> str:
    """initdb's error line rather than its last progress line; the strongest marker wins."""
    lines = [ln for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    reason = next(
        (ln.split("FATAL:", 1)[-1] for m in _INITDB_MARKERS for ln in lines if m in ln.lower()),
        lines[-1] if lines else "no output",
    )
    return reason.strip()
