"""The template proof's decisions (entrypoint/proof.py): which candidate is published when some or none pass.
The models themselves are proven against real Ollama servers in test_rendering, test_families and
test_tool_round_trip; here `attempt` stands for "create the models with this candidate and prove them",
returning what that proof found, so every branch of the policy is exercised."""

from __future__ import annotations

import pytest

from entrypoint import checks, modelfile, proof
from entrypoint.errors import CheckFailed

SPEC = modelfile.ModelSpec(template="", system="", parameters=(), license="", source="test")


def _format(name: str) -> modelfile.ChatFormat:
    return modelfile.ChatFormat(name=name, template=f"{{{{ .Prompt }}}}{name}", end_of_turn=(), begin_of_turn=())


def _failure(conversation: str, dropped: bool = False) -> checks.ParityFailure:
    return checks.ParityFailure(conversation, checks.CHAT_TEMPLATE, "expected", "actual", reasoning_dropped=dropped)


def _attempt(name: str, failures: list[checks.ParityFailure] | None) -> proof.Attempt:
    return proof.Attempt(_format(name), SPEC, checks.GO_TEMPLATE, (), failures)


class Candidates:
    """`attempt` for settle: each candidate's failures, by name; records the calls."""

    def __init__(self, failures: dict[str, list[checks.ParityFailure] | None]):
        self.failures, self.calls = failures, []

    def attempt(self, candidate: modelfile.ChatFormat, index: int) -> proof.Attempt:
        self.calls.append((candidate.name, index))
        return _attempt(candidate.name, self.failures[candidate.name])

    def settle(self, prompt_parity: str = "fail") -> tuple[proof.Attempt, str]:
        return proof.settle([_format(name) for name in self.failures], self.attempt, prompt_parity,
                            "registry.local/team/model:1.0.0", "0.34.3")


def test_choose_picks_nothing_when_every_candidate_differs():
    assert proof.choose([], "fail") is None
    assert proof.choose([_attempt("a", [_failure("user")]), _attempt("b", [_failure("user")])], "fail") is None


def test_choose_picks_the_first_that_lacks_only_the_dropped_reasoning():
    attempts = [_attempt("a", [_failure("user")]), _attempt("b", [_failure("thinking", dropped=True)]),
                _attempt("c", [_failure("thinking", dropped=True)])]
    assert proof.choose(attempts, "fail") == proof.Choice(1, "reasoning dropped")
    assert proof.choose(attempts, "warn") == proof.Choice(1, "reasoning dropped")


def test_choose_under_warn_picks_the_fewest_failures_not_the_last():
    attempts = [_attempt("a", [_failure("user"), _failure("multi-turn")]), _attempt("b", [_failure("user")]),
                _attempt("c", [_failure("user")]), _attempt("d", [_failure(x) for x in "wxyz"])]
    assert proof.choose(attempts, "warn") == proof.Choice(1, "fewest failures")


def test_settle_publishes_the_first_that_passes_and_tries_no_more():
    candidates = Candidates({"a": [_failure("user")], "b": [], "c": []})
    chosen, caveat = candidates.settle()
    assert (chosen.chat_format.name, caveat) == ("b", "")
    assert candidates.calls == [("a", 0), ("b", 1)]


def test_settle_takes_nothing_compared_as_passed():
    """prompt-parity: off, or a checkpoint without a chat template: nothing to prove, the first is published."""
    candidates = Candidates({"a": None, "b": []})
    assert candidates.settle()[0].chat_format.name == "a" and candidates.calls == [("a", 0)]


def test_settle_creates_the_reasoning_dropped_candidate_again_and_says_why():
    candidates = Candidates({"a": [_failure("thinking + tool call + result", dropped=True)], "b": [_failure("user")]})
    chosen, caveat = candidates.settle()
    assert chosen.chat_format.name == "a"
    assert candidates.calls == [("a", 0), ("b", 1), ("a", 2)]  # b was created last: a is created again
    assert "passes no assistant turn's thinking" in caveat and "thinking + tool call + result" in caveat


def test_settle_does_not_create_again_what_was_created_last():
    candidates = Candidates({"a": [_failure("user")], "b": [_failure("thinking", dropped=True)]})
    assert candidates.settle()[0].chat_format.name == "b" and candidates.calls == [("a", 0), ("b", 1)]


def test_settle_fails_naming_the_last_candidates_differences():
    candidates = Candidates({"a": [_failure("user")], "b": [_failure("multi-turn")]})
    with pytest.raises(CheckFailed) as failed:
        candidates.settle()
    assert failed.value.input_name == "template" and failed.value.title == "Prompt parity failed"
    assert "registry.local/team/model:1.0.0" in failed.value.message
    assert "1 failed checks (multi-turn)" in failed.value.message


def test_settle_under_warn_publishes_the_best_candidate(capsys):
    candidates = Candidates({"a": [_failure("user")], "b": [_failure("user"), _failure("multi-turn")]})
    chosen, caveat = candidates.settle("warn")
    assert (chosen.chat_format.name, caveat) == ("a", "")
    assert candidates.calls == [("a", 0), ("b", 1), ("a", 2)]
    assert "::warning::Prompt parity failed for registry.local/team/model:1.0.0" in capsys.readouterr().out
