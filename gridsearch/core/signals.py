"""SIGTERM (scancel, kill, a batch system's time limit) unwinds like Ctrl-C, so ``finally`` blocks run:
workers and servers stop, and the ledger is left as a kill would leave it, which is recoverable."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_as_exit(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, the given signals raise SystemExit(128 + signum); SIGINT stays Ctrl-C.

    A no-op outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_exit) for sig in signals}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_flag(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[threading.Event]:
    """For long-lived loops (the server job): a signal sets the event instead of raising mid-call."""
    event = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: event.set()) for sig in signals}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
