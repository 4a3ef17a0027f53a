"""Unit tests: bounded retries, decided by the error's own `retriable`."""

from __future__ import annotations

import pytest

from entrypoint import retry
from entrypoint.errors import RegistryError


def flaky(failures: int, *, retriable: bool = True):
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= failures:
            raise RegistryError("connection refused", status=None if retriable else 401, retriable=retriable)
        return "done"

    return action, calls


def test_retries_until_success_within_the_bound(capsys):
    action, calls = flaky(2)
    assert retry.retrying(action, "pushing x", delays=(0, 0)) == "done"
    assert len(calls) == 3
    assert capsys.readouterr().out.count("::warning::pushing x failed (attempt") == 2


def test_gives_up_after_the_last_attempt_and_never_retries_a_refusal():
    action, calls = flaky(5)
    with pytest.raises(RegistryError):
        retry.retrying(action, "x", delays=(0, 0))
    assert len(calls) == 3
    action, calls = flaky(1, retriable=False)
    with pytest.raises(RegistryError):
        retry.retrying(action, "x", delays=(0, 0))
    assert len(calls) == 1
