"""What the failure-mode tests proved, printed at the end of the test session (conftest's
pytest_terminal_summary): bad inputs tried, faults injected, runs that recovered, and checks that
the registry held the whole release or nothing of it. Counted only when a test reaches that point,
that is after its assertions passed."""

from __future__ import annotations

import collections

from tests.conftest import registry_tags

COUNTS: collections.Counter[str] = collections.Counter()
ORDER = ("bad inputs tried", "faults injected", "runs recovered", "nothing-lost checks passed",
         "hostile repositories refused", "workflow-command injections not obeyed", "full disks named",
         "unpullable pushes caught", "remote-code attempts refused", "limits enforced",
         "private releases through the ollama.com-like front", "registry auth refusals",
         "interrupted uploads recovered")


def bad_input_refused() -> None:
    COUNTS["bad inputs tried"] += 1


def fault_injected() -> None:
    COUNTS["faults injected"] += 1


def run_recovered() -> None:
    COUNTS["runs recovered"] += 1


def hostile_repo_refused() -> None:
    COUNTS["hostile repositories refused"] += 1


def injection_not_obeyed() -> None:
    COUNTS["workflow-command injections not obeyed"] += 1


def disk_full_named() -> None:
    COUNTS["full disks named"] += 1


def pull_check_failed() -> None:
    COUNTS["unpullable pushes caught"] += 1


def remote_code_refused() -> None:
    COUNTS["remote-code attempts refused"] += 1


def limit_enforced() -> None:
    COUNTS["limits enforced"] += 1


def private_release_published() -> None:
    COUNTS["private releases through the ollama.com-like front"] += 1


def auth_refused() -> None:
    COUNTS["registry auth refusals"] += 1


def upload_recovered() -> None:
    COUNTS["interrupted uploads recovered"] += 1


def assert_all_or_nothing(registry: str, repository: str, release_tags: set[str]) -> set[str]:
    """The registry holds every tag of the release or none of them. Returns the tags present."""
    present = set(registry_tags(registry, repository))
    assert present in (set(), release_tags), f"{repository} holds part of the release: {sorted(present)}"
    COUNTS["nothing-lost checks passed"] += 1
    return present


def lines() -> list[str]:
    return [f"{name}: {COUNTS[name]}" for name in ORDER]
