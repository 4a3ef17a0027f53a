"""Bounded retries with backoff for network steps that can resume (Hub downloads, registry calls, pushes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from . import github
from .errors import PublishError

T = TypeVar("T")
DELAYS_S = (5.0, 15.0)  # three attempts in all, about 20 s of waiting at most


def retrying(action: Callable[[], T], what: str, *, delays: tuple[float, ...] = DELAYS_S) -> T:
    """Run `action`; when it raises a PublishError that says it is retriable, wait and try again."""
    for attempt, delay in enumerate((*delays, None), start=1):
        try:
            return action()
        except PublishError as exc:
            if delay is None or not exc.retriable:
                raise
            github.warning(f"{what} failed (attempt {attempt} of {len(delays) + 1}), retrying in {delay:.0f} s: "
                           f"{exc.message.splitlines()[0]}")
            time.sleep(delay)
    raise AssertionError("unreachable")
