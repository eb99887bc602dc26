"""The pure renderers and parsers behind ManagedServer: recorded inputs, no server needed."""

from __future__ import annotations

import pytest
import sqlalchemy

from gridsearch.postgres import Credentials, sqlalchemy_url
from gridsearch.postgres.conf import (
    INCLUDE_SETTINGS,
    SETTINGS_FILE,
    conf_str,
    configured_port,
    initdb_failure_reason,
    parse_pidfile,
    render_hba,
    render_ident,
    render_settings,
    start_failure_reason,
)


def _entries(text: str) -> list[list[str]]:
    """Non-comment lines of a PostgreSQL conf file, split into fields."""
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _settings(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (" ".join(f).partition("=") for f in _entries(text))}


# ------------------------------------------------------------------ rendering


def test_hba_has_no_trust_and_scram_on_every_tcp_line() -> None:
    entries = _entries(render_hba("postgres"))
    assert not any("trust" in f for f in entries)
    tcp = [f for f in entries if f[0].startswith("host")]
    assert {f[3] for f in tcp} == {"0.0.0.0/0", "::/0"}  # both families, every address
    assert all(f[4] == "scram-sha-256" for f in tcp)
    local = [f for f in entries if f[0] == "local"]
    assert local == [["local", "all", "postgres", "peer", "map=gridsearch"]]


def test_ident_maps_each_os_user_once_to_the_superuser() -> None:
    assert _entries(render_ident("postgres", ["postgres", "root", "postgres"])) == [
        ["gridsearch", "postgres", "postgres"],
        ["gridsearch", "root", "postgres"],
    ]


def test_settings_never_log_statements_and_use_our_socket() -> None:
    text = render_settings(
        port=54321, listen_addresses="127.0.0.1,::1", socket_dir="/tmp/it's\\run", max_connections=54
    )
    s = _settings(text)
    assert s["log_statement"] == "'none'"
    assert s["log_min_error_statement"] == "'panic'" and s["log_connections"] == "off"
    assert s["unix_socket_directories"] == "'/tmp/it''s\\\\run'"
    assert s["unix_socket_permissions"] == "0700"
    assert s["listen_addresses"] == "'127.0.0.1,::1'"
    assert s["port"] == "54321" and s["max_connections"] == "54"
    assert s["password_encryption"] == "'scram-sha-256'"
    assert configured_port(text) == 54321


def test_include_line_names_the_settings_file() -> None:
    assert _entries(INCLUDE_SETTINGS) == [["include", f"'{SETTINGS_FILE}'"]]


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        ("plain", "'plain'"),
        ("it's", "'it''s'"),
        ("a\\b", "'a\\\\b'"),
        ("\\'", "'\\\\'''"),
        ("", "''"),
    ],
)
def test_conf_str_quotes_quotes_and_backslashes(raw: str, quoted: str) -> None:
    assert conf_str(raw) == quoted


def test_configured_port_absent_or_commented() -> None:
    assert configured_port("# port = 5433\nmax_connections = 50\n") is None
    assert configured_port("") is None


# ------------------------------------------------------------------ postmaster.pid


PIDFILE = "4242\n/srv/pg/data\n1700000000\n54321\n/srv/pg/run\n127.0.0.1\n  1234   5678\nready   \n"


def test_pidfile_full() -> None:
    assert parse_pidfile(PIDFILE) == {
        "pid": "4242",
        "data_dir": "/srv/pg/data",
        "start": "1700000000",
        "port": "54321",
        "socket_dir": "/srv/pg/run",
        "listen": "127.0.0.1",
        "shm": "1234   5678",
        "state": "ready",
    }


def test_pidfile_truncated_mid_write() -> None:
    info = parse_pidfile("4242\n/srv/pg/data\n1700000000\n")
    assert info == {"pid": "4242", "data_dir": "/srv/pg/data", "start": "1700000000"}
    assert "port" not in info and "socket_dir" not in info
    assert parse_pidfile("") == {}


# ------------------------------------------------------------------ why a start failed


def test_start_failure_bind_error_wins() -> None:
    log = [
        '2024-05-01 10:00:00.000 UTC [77] LOG:  starting PostgreSQL 15.6 on x86_64-pc-linux-gnu',
        '2024-05-01 10:00:00.001 UTC [77] LOG:  could not bind IPv4 address "127.0.0.1": Address in use',
        "2024-05-01 10:00:00.001 UTC [77] HINT:  Is another postmaster already running on port 5432?",
        "2024-05-01 10:00:00.002 UTC [77] FATAL:  could not create any TCP/IP sockets",
        "2024-05-01 10:00:00.003 UTC [77] LOG:  database system is shut down",
    ]
    assert start_failure_reason(log, "pg_ctl: could not start server") == (
        'port already in use (could not bind IPv4 address "127.0.0.1": Address in use)'
    )


def test_start_failure_last_fatal() -> None:
    log = [
        "2024-05-01 10:00:00.000 UTC [77] LOG:  starting PostgreSQL 15.6",
        "2024-05-01 10:00:00.001 UTC [77] FATAL:  data directory \"/srv/pg/data\" has invalid permissions",
        "2024-05-01 10:00:00.002 UTC [77] DETAIL:  Permissions should be u=rwx (0700) or u=rwx,g=rx (0750).",
    ]
    assert start_failure_reason(log, "ignored") == 'data directory "/srv/pg/data" has invalid permissions'


def test_start_failure_contains_errors_keeps_the_cause() -> None:
    log = [
        '2024-05-01 10:00:00.000 UTC [77] LOG:  invalid value for parameter "max_connections": "lots"',
        '2024-05-01 10:00:00.001 UTC [77] FATAL:  configuration file "/srv/pg/data/gridsearch.conf" '
        "contains errors",
    ]
    assert start_failure_reason(log, "ignored") == (
        'invalid value for parameter "max_connections": "lots"; '
        'configuration file "/srv/pg/data/gridsearch.conf" contains errors'
    )


def test_start_failure_only_reads_the_log_tail() -> None:
    old = ["2024-05-01 09:00:00.000 UTC [5] FATAL:  an old failure, since fixed"]
    noise = [f"2024-05-01 10:00:{i % 60:02d}.000 UTC [77] LOG:  checkpoint {i}" for i in range(60)]
    assert start_failure_reason(old + noise, "pg_ctl: server did not start in time") == (
        "pg_ctl: server did not start in time"
    )
    assert start_failure_reason(old + noise[:10], "unused") == "an old failure, since fixed"


def test_start_failure_falls_back_to_pg_ctl_output() -> None:
    assert start_failure_reason([], "pg_ctl: could not start server\nExamine the log output.\n") == (
        "pg_ctl: could not start server"
    )
    assert start_failure_reason([], "") == "pg_ctl start failed"


# ------------------------------------------------------------------ why initdb failed


def test_initdb_disk_full_between_progress_lines() -> None:
    stdout = (
        "The files belonging to this database system will be owned by user \"postgres\".\n"
        "creating directory /srv/pg/data ... ok\n"
        "creating subdirectories ... ok\n"
        "running bootstrap script ... "
    )
    stderr = (
        "2024-05-01 10:00:00.000 UTC [9] FATAL:  could not extend file \"base/1/1255\": "
        "No space left on device\n"
        "child process exited with exit code 1\n"
        "initdb: removing data directory \"/srv/pg/data\"\n"
    )
    assert initdb_failure_reason(stdout, stderr) == (
        'could not extend file "base/1/1255": No space left on device'
    )


def test_initdb_error_line_beats_progress() -> None:
    stdout = "creating directory ... ok\n"
    stderr = "initdb: error: could not write to file: No space left on device\n"
    assert initdb_failure_reason(stdout, stderr) == (
        "initdb: error: could not write to file: No space left on device"
    )


def test_initdb_fatal_beats_an_earlier_weaker_marker() -> None:
    stderr = (
        "performing post-bootstrap initialization ... error\n"
        'FATAL:  could not write to file "pg_wal/xlogtemp.42": No space left on device\n'
    )
    assert initdb_failure_reason("", stderr) == (
        'could not write to file "pg_wal/xlogtemp.42": No space left on device'
    )


def test_initdb_without_markers_reports_the_last_line() -> None:
    assert initdb_failure_reason("step one ... ok\nstep two ... ok\n", "") == "step two ... ok"
    assert initdb_failure_reason("", "  \n") == "no output"


# ------------------------------------------------------------------ URLs (pure too)


def test_sqlalchemy_url_has_no_password_and_round_trips() -> None:
    creds = Credentials("node7", 5433, "gridsearch", "s3cret")
    assert sqlalchemy_url(creds, "gs_x_state") == "postgresql+psycopg2://gridsearch@node7:5433/gs_x_state"
    odd = sqlalchemy.make_url(sqlalchemy_url(Credentials("::1", 5, "a@b:c"), "x/y?z"))
    assert (odd.username, odd.host, odd.port, odd.database) == ("a@b:c", "::1", 5, "x/y?z")
    assert odd.password is None


def test_sqlalchemy_url_for_a_unix_socket_has_no_host() -> None:
    assert sqlalchemy_url(Credentials("", 5432, "postgres"), "d") == "postgresql+psycopg2://postgres@/d"
