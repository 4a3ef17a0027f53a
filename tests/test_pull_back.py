"""The pull-back check after the push (publish.pull_back), against real registries. Ollama 0.30 and
later download a blob only from where the registry redirects it, as ollama.com redirects to its CDN: the
stack's registry does (tests/servers.registry), so an empty Ollama pulls every tag there (tests/test_release).
A plain docker-registry serves blobs itself and no current Ollama can pull from it: with pull-check: fail
the run fails saying so, with warn it publishes and warns; neither calls the model pulled."""

from __future__ import annotations

import json

import pytest

from tests import fault_report, servers
from tests.conftest import registry_tags

pytestmark = pytest.mark.servers
RELEASE_Q8 = ["1.0.0", "1.0.0-q8_0", "latest"]


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    with servers.registry(tmp_path_factory.mktemp("plain-registry"), blob_redirect=False) as address:
        yield address


def _publish(ready_gguf, run_action, registry: str, repository: str, pull_check: str):
    return run_action({"model-path": str(ready_gguf), "ollama-model": f"{registry}/{repository}",
                       "quantizations": "Q8_0", "insecure-registry": "true", "pull-check": pull_check})


def test_a_registry_no_ollama_can_pull_from_fails_the_run(ready_gguf, run_action, plain_registry):
    run = _publish(ready_gguf, run_action, plain_registry, "pull-back/fail", "fail")
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1, errors
    assert "title=Pull check failed" in errors[0] and "pull-check" in errors[0]
    assert "could not pull it back" in errors[0] and "no Location header" in errors[0]
    assert "redirects them" in errors[0]  # why: the registry serves blobs without redirecting them
    assert "retrying" not in run.stdout.split("7. Pull back", 1)[1]  # the same answer every time: not retried
    assert "Pull check failed" in run.summary
    # What the push left is complete (the pull check comes after it): a re-run, with the registry fixed, pulls.
    assert sorted(registry_tags(plain_registry, "pull-back/fail")) == RELEASE_Q8
    assert "pulled" not in run.outputs_text
    fault_report.pull_check_failed()


def test_pull_check_warn_publishes_and_says_it_was_not_pulled(ready_gguf, run_action, plain_registry):
    run = _publish(ready_gguf, run_action, plain_registry, "pull-back/warn", "warn")
    assert run.returncode == 0, run.stdout[-3000:]
    warnings = [line for line in run.stdout.splitlines() if line.startswith("::warning")]
    assert any("could not pull it back" in w and "no Location header" in w for w in warnings), warnings
    models = json.loads(run.outputs["models"])
    assert models and all(m["pushed"] and not m["pulled"] for m in models), models
    assert run.summary.count("yes, **not pulled back**") == len(RELEASE_Q8)
    assert sorted(registry_tags(plain_registry, "pull-back/warn")) == RELEASE_Q8
    fault_report.pull_check_failed()


def test_pull_check_off_publishes_without_pulling_and_says_so(ready_gguf, run_action, plain_registry):
    run = _publish(ready_gguf, run_action, plain_registry, "pull-back/off", "off")
    assert run.returncode == 0, run.stdout[-3000:]
    warnings = [line for line in run.stdout.splitlines() if line.startswith("::warning")]
    assert any("pull check skipped (pull-check: off)" in w for w in warnings), warnings
    assert "pulled by an empty Ollama" not in run.stdout and "could not pull" not in run.stdout
    models = json.loads(run.outputs["models"])
    assert models and all(m["pushed"] and not m["pulled"] for m in models), models
    assert sorted(registry_tags(plain_registry, "pull-back/off")) == RELEASE_Q8
