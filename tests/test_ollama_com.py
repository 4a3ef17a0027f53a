"""Publishing to a registry that behaves like ollama.com (tests/ollama_com.py: a front over the real
docker-registry, built from Ollama 0.34.3's client code): private models, the Bearer challenge answered
with the push key's signature, manifests without Docker-Content-Digest or Content-Length and as text/plain.
Each release starts from ready GGUF files (model-path): publishing is the subject, not converting. The
strictest setting is published by the action's image run as the runner runs it; the others by the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from entrypoint import registry
from tests import fault_report, ollama_com, servers
from tests.conftest import (SMOKE_PROMPT, ActionRun, action_runner, make_ollama_key, parse_outputs,
                            registry_tags)
from tests.container import Runner

pytestmark = pytest.mark.servers
RELEASE_Q8 = {"1.0.0", "1.0.0-q8_0", "latest"}


@pytest.fixture(scope="module")
def alice_key(tmp_path_factory) -> str:
    return make_ollama_key(tmp_path_factory.mktemp("alice"))


def _publish(tmp_path, ready_gguf, front: str, repository: str, key: str):
    return action_runner(tmp_path)({"model-path": str(ready_gguf), "ollama-model": f"{front}/{repository}",
                                    "quantizations": "Q8_0", "insecure-registry": "true", "ollama-key": key})


def _publish_in_the_image(tmp_path, ready_gguf, front: str, repository: str, key: str) -> ActionRun:
    """The same, by the action's image run as the runner runs it (ready GGUF files in the checkout)."""
    runner = Runner(tmp_path)
    shutil.copytree(ready_gguf, runner.workspace / "model")
    run = runner.run({"model-path": "model", "ollama-model": f"{front}/{repository}", "quantizations": "Q8_0",
                      "insecure-registry": "true", "ollama-key": key, "smoke-test-prompt": SMOKE_PROMPT})
    return ActionRun(returncode=run.exit_code, stdout=run.stdout, stderr=run.stderr,
                     outputs=parse_outputs(run.outputs_text), outputs_text=run.outputs_text, summary=run.summary,
                     home=run.home, workspace=run.workspace, runner_temp=run.runner_temp)


@pytest.mark.parametrize("repository, behaviour, publish", [
    # The strictest, in the image as users run it: private, manifests as text/plain without
    # Docker-Content-Digest or Content-Length.
    ("alice/strict", ollama_com.Behaviour(), _publish_in_the_image),
    ("alice/with-headers", ollama_com.Behaviour(manifest_as_text_plain=False, digest_header=True,
                                                manifest_content_length=True), _publish),
    ("alice/public", ollama_com.Behaviour(private=False), _publish),  # anyone reads it; no optional header
], ids=["private-no-digest-header-image", "private-with-digest-header", "public-no-digest-header"])
def test_a_release_is_published_verified_pulled_back_and_found_on_a_rerun(
        tmp_path, stack, ready_gguf, alice_key, repository, behaviour, publish):
    with ollama_com.front(stack.registry, {"alice": alice_key}, behaviour) as (front, record):
        first = publish(tmp_path / "first", ready_gguf, front, repository, alice_key)
        assert first.returncode == 0, first.stdout[-3000:]
        models = json.loads(first.outputs["models"])
        assert {m["tag"] for m in models} == RELEASE_Q8
        assert all(m["pushed"] and m["pulled"] for m in models), models
        # The pull-back asked the front (as the owner, when private) whether it holds the weights, and did
        # not download them again.
        assert first.stdout.count("were not downloaded again") == 1, first.stdout[-3000:]
        # Private: nobody reads it without the owner's token; the owner's key reads what was pushed.
        url = f"http://{front}/v2/{repository}/manifests/1.0.0"
        anonymous = requests.get(url, headers={"Accept": registry.MANIFEST_MEDIA_TYPE}, timeout=10)
        assert anonymous.status_code == (401 if behaviour.private else 200)
        name = registry.parse_model_name(f"{front}/{repository}")
        for model in models:
            digest, manifest = registry.fetch_manifest(name, model["tag"], insecure=True, key=alice_key)
            assert digest == model["registry_digest"] and manifest["layers"]
        assert (repository, frozenset({"pull", "push"})) in record.tokens_given
        assert record.refused == []
        # Every blob went up in parts through the storage host, and was committed once.
        assert record.parts_stored and len(record.blobs_committed) == len(set(record.blobs_committed)) >= 3

        again = publish(tmp_path / "again", ready_gguf, front, repository, alice_key)
    assert again.returncode == 0, again.stdout[-3000:]
    skipped = [line for line in again.stdout.splitlines() if "already published with the same layers" in line]
    assert len(skipped) == len(RELEASE_Q8), again.stdout[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("pushing ")]
    assert set(registry_tags(stack.registry, repository)) == RELEASE_Q8
    if behaviour.private:
        fault_report.private_release_published()


@pytest.mark.parametrize("case", ["unknown key", "another account's namespace"])
def test_a_key_the_registry_does_not_accept_is_one_error_and_nothing_is_pushed(
        tmp_path, stack, ready_gguf, alice_key, case):
    stranger_key = make_ollama_key(tmp_path)
    accounts = {"alice": alice_key} if case == "unknown key" else {"alice": alice_key, "mallory": stranger_key}
    repository = "alice/refused" if case == "unknown key" else "alice/not-mallorys"
    with ollama_com.front(stack.registry, accounts) as (front, record):
        run = _publish(tmp_path / "run", ready_gguf, front, repository, stranger_key)
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1 and "ollama-key" in errors[0], errors
    assert "Settings > Ollama keys" in errors[0] and "More: README.md#push-refused" in errors[0], errors[0]
    assert [line for line in run.stdout.splitlines() if "retrying in" in line] == []  # a refusal is final
    assert not [line for line in run.stdout.splitlines() if line.startswith("pushing ")]
    assert registry_tags(stack.registry, repository) == []
    if case == "unknown key":
        assert record.refused == ["unknown key"]
    else:
        assert len(record.refused) == 1 and "the key of mallory has no access" in record.refused[0]
    shown = "\n".join(line for line in run.stdout.splitlines() if not line.startswith("::add-mask::"))
    assert stranger_key.splitlines()[2] not in shown + run.stderr  # masked, and scrubbed from what is printed
    fault_report.auth_refused()


@pytest.mark.parametrize("cut_with", ["dropped connection", "502"])
def test_a_part_upload_cut_mid_body_is_sent_again_alone_and_the_release_completes(
        tmp_path, stack, ready_gguf, alice_key, cut_with):
    """The storage host fails the first part upload halfway: Ollama sends that part again (and only that
    one), the log says so, and the release is published, verified and pulled back."""
    repository = f"alice/cut-upload-{cut_with.split()[0]}"
    behaviour = ollama_com.Behaviour(cut_part_uploads=1, cut_with=cut_with)
    with ollama_com.front(stack.registry, {"alice": alice_key}, behaviour) as (front, record):
        run = _publish(tmp_path, ready_gguf, front, repository, alice_key)
    assert run.returncode == 0, run.stdout[-3000:]
    assert record.parts_cut == 1
    resent = [line for line in run.stdout.splitlines() if "Ollama sent a part again" in line]
    assert len(resent) == 1 and " part 0 attempt 0 failed: " in resent[0], run.stdout[-3000:]
    assert len(record.parts_stored) == len(set(record.parts_stored)), record.parts_stored  # none sent twice
    models = json.loads(run.outputs["models"])
    assert len(record.blobs_committed) == len(set(record.blobs_committed)) >= 3, record.blobs_committed
    assert all(m["pushed"] and m["pulled"] for m in models), models
    assert set(registry_tags(stack.registry, repository)) == RELEASE_Q8
    fault_report.fault_injected()
    fault_report.upload_recovered()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    """docker-registry over HTTPS with a self-signed certificate nothing trusts."""
    with servers.registry(tmp_path_factory.mktemp("tls-registry"), tls=True) as address:
        yield address


@pytest.mark.parametrize("insecure, input_name, phrase", [
    ("true", "insecure-registry", "speaks TLS, and insecure-registry: true makes Ollama talk plain HTTP"),
    ("false", "ollama-model", "has a TLS certificate this runner does not trust"),
])
def test_a_registry_with_a_self_signed_certificate_is_one_error_before_any_work(
        tmp_path, ready_gguf, tls_registry, insecure, input_name, phrase):
    """insecure-registry means plain HTTP, as Ollama's --insecure does: it cannot reach a TLS registry whose
    certificate is not trusted, and neither can anything else. Both ways, one error before any work."""
    run = action_runner(tmp_path)({"model-path": str(ready_gguf), "ollama-model": f"{tls_registry}/team/model",
                                   "quantizations": "Q8_0", "insecure-registry": insecure})
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1 and phrase in errors[0] and input_name in errors[0], errors
    assert "2. Download" not in run.stdout and "retrying in" not in run.stdout
    fault_report.bad_input_refused()
