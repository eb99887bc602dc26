"""The shared mechanisms in gridsearch.core: each is written once, so each is tested once here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gridsearch.core.errors import BadInput, GridsearchError, first_line, one_line
from gridsearch.core.files import atomic_write, tail
from gridsearch.core.signals import stop_flag, terminate_as_exit
from gridsearch.core.waiting import wait_until


def test_first_line_skips_blank_lines_and_one_line_names_the_type() -> None:
    assert first_line("\n\n  FATAL: no such role\nDETAIL: x\n") == "FATAL: no such role"
    assert first_line(ValueError("")) == "ValueError"
    assert one_line(RuntimeError("k\nmore")) == "RuntimeError: k"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert BadInput("x").exit_code == 2 and GridsearchError("x").exit_code == 1


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write(target, "one")
    atomic_write(target, b"two", mode=0o600)
    assert target.read_text() == "two" and (target.stat().st_mode & 0o777) == 0o600
    atomic_write(target, lambda tmp: tmp.write_text("three"))
    assert target.read_text() == "three"

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_text() == "three"  # the reader never sees half a file
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_tail_reads_the_end(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(10_000)))
    assert tail(log, 2) == "line 9998\nline 9999"
    assert tail(tmp_path / "missing") == "" and tail(None) == ""


def test_wait_until_returns_the_value_times_out_or_stops_early() -> None:
    calls: list[float] = []

    def probe() -> int | None:
        calls.append(time.monotonic())
        return 7 if len(calls) >= 3 else None

    assert wait_until(probe, 5, 0.01) == 7 and len(calls) == 3
    t0 = time.monotonic()
    assert wait_until(lambda: None, 0.3, 0.05) is None
    assert 0.25 < time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert wait_until(lambda: None, 30, 0.05, while_=lambda: False) is None
    assert time.monotonic() - t0 < 1  # the thing waited for is gone: no point waiting on
    with pytest.raises(ZeroDivisionError):  # a probe's error is not swallowed
        wait_until(lambda: 1 / 0, 1, 0.01)


def test_sigterm_unwinds_finally_blocks(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    code = (
        "import os, signal, sys, time\n"
        "from gridsearch.core.signals import terminate_as_exit\n"
        "with terminate_as_exit():\n"
        "    try:\n"
        "        print('ready', flush=True); time.sleep(30)\n"
        f"    finally:\n        open({str(marker)!r}, 'w').write('yes')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert marker.read_text() == "yes"


def test_handlers_are_restored_and_ignored_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with terminate_as_exit():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    seen: list[object] = []
    t = threading.Thread(target=lambda: seen.append(terminate_as_exit().__enter__()))
    t.start()
    t.join()
    assert seen == [None] and signal.getsignal(signal.SIGTERM) is before


def test_stop_flag_turns_a_signal_into_an_event() -> None:
    with stop_flag((signal.SIGUSR1,)) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.wait(5)


def test_pgpass_holds_the_password_privately_and_reads_it_back(tmp_path: Path) -> None:
    from gridsearch.core.secrets import read_pgpass, without_secrets, write_pgpass

    for password in ("plain", r"a:b\c:\\d", "ends with \\"):
        path = write_pgpass(tmp_path / "secrets" / "pgpass", password)
        assert read_pgpass(path) == password
        assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert without_secrets({"PGPASSWORD": "x", "ULTRACK_DB_PW": "y", "HOME": "/h"}) == {"HOME": "/h"}
