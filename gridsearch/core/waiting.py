"""Polling until a condition holds: one implementation (tenacity), so every wait has a deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    timeout: float,
    interval: float = 0.25,
    *,
    while_: Callable[[], bool] | None = None,
) -> T | None:
    """Call ``probe`` until it returns something truthy (returned) or ``timeout`` seconds pass (None).

    ``while_``: stop early, returning None, as soon as it turns false (e.g. the process we wait for
    has died): waiting longer could not help."""

    def keep_polling(state: tenacity.RetryCallState) -> bool:
        if state.outcome is None or state.outcome.failed:
            return False
        return not state.outcome.result() and (while_ is None or while_())

    retrying = tenacity.Retrying(
        retry=keep_polling,
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry_error_callback=lambda state: None,
        reraise=True,
    )
    result = retrying(probe)
    return result or None
