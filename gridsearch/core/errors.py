"""One-line error text and the exit-code policy every command follows.

Users read errors in job logs and terminals: one line saying what, where and why. The exit code
says whose move it is: 2 the input (fix the sweep file or the command), 1 the run (a trial failed,
a server is unreachable, a disk is full: fix the environment and run the same command again)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class GridsearchError(Exception):
    """An expected failure whose message is already one line meant for the user."""

    exit_code = EXIT_FAILED


class BadInput(GridsearchError):
    """The sweep file, a command's arguments or the workdir refuse the request."""

    exit_code = EXIT_BAD_INPUT


def first_line(text: BaseException | str) -> str:
    """The first non-blank line: libpq and SLURM put the cause first and DETAIL/HINT after it."""
    for line in str(text).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(text).__name__ if isinstance(text, BaseException) else "unknown error"


def one_line(exc: BaseException) -> str:
    """``Type: first line`` for exceptions whose type tells something the message does not."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Busy(BadInput):
    """Another driver holds the sweep (its workdir or its database): refused, like bad input, before
    anything is touched. The message names the holder."""


class Unavailable(GridsearchError):
    """A service the sweep needs (the scheduler, the database server) stayed unavailable: the sweep
    stops, resumable, instead of failing its trials one after another."""


def ignore(text: str) -> None:
    """The default for a `notify` callback: say nothing."""
