"""End to end for three chat families, against real servers: a ChatML model (Qwen2), a Llama 3 model and
a Gemma model, each with its real tokenizer and chat template and tiny scripted weights that answer
'Paris' and then end their turn (tests/material/scripted.py). Each is committed to the test Hub and
published by the action with its defaults (template auto, prompt parity fail) to the test registry."""

from __future__ import annotations

import json
import re

import pytest

from entrypoint.checks import CONVERSATIONS
from tests import servers
from tests.conftest import action_runner, registry_tags
from tests.material import scripted

pytestmark = pytest.mark.servers
RELEASE_TAGS = {"1.0.0-q8_0", "1.0.0", "latest"}  # v1.0.0, Q8_0, default tag patterns


def _publish(name: str, stack, tmp_path_factory):
    """Build the family's checkpoint, commit it to the Hub at v1.0.0 and run the action on it once."""
    family = scripted.FAMILIES[name]
    folder = scripted.build(family.name, tmp_path_factory.mktemp(f"tiny-{family.name}"))
    servers.add_model_repo(stack.mirrors, f"test-org/tiny-{family.name}", folder, tags=("v1.0.0",))
    run = action_runner(tmp_path_factory.mktemp(f"publish-{family.name}"))({
        "hf-repo": f"test-org/tiny-{family.name}", "hf-revision": "v1.0.0",
        "ollama-model": f"{stack.registry}/families/{family.name}", "insecure-registry": "true",
        "quantizations": "Q8_0",
    }, env={"HF_ENDPOINT": stack.hub_endpoint})
    print(run.stdout[-3000:], run.stderr[-1500:])
    return family, run


# Gemma 4's template (tools, thinking) on the Gemma 3 architecture: no template here offers its tools
# and thinking with the prompts it builds, so it is not published (test_gemma_... below).
PUBLISHED = sorted(set(scripted.FAMILIES) - {"gemma"} - scripted.CHAIN_FAMILIES)  # chain ones: test_tool_round_trip


@pytest.fixture(scope="module", params=PUBLISHED)
def published(request, stack, tmp_path_factory):
    return _publish(request.param, stack, tmp_path_factory)


def _excerpt(run) -> str:
    """The log lines a failure needs: template and stop tokens, parity, smoke test, the error (decoded)."""
    wanted = re.compile(r"^(chat template:|Ollama renders |prompt parity of |  .*: (same prompt.*|DIFFERENT|FAILED.*)$"
                        r"|.*\(done_reason: )")
    lines = [line for line in run.stdout.splitlines() if wanted.match(line)]
    errors = [line.replace("%0A", "\n")[:2500] for line in run.errors()]
    tail = [] if errors else run.stdout.splitlines()[-15:] + [run.stderr[-1500:]]
    return "\n".join([f"exit code {run.returncode}", *lines, *errors, *tail])


def test_action_succeeds(published):
    _, run = published
    assert run.returncode == 0 and not run.errors(), _excerpt(run)


# Ollama 0.34 prefers each family's Jinja (it has tools) to the derived TEMPLATE. In llama-server, Llama
# 3.3's writes today's date where transformers writes its fixed "26 Jul 2024": the derived TEMPLATE, which
# matches, would be pinned, but it has no tools; the llama3.1 catalog template, tried next, has them.
PINNED: set[str] = set()


def test_gemma_4s_tool_and_thinking_template_without_a_template_offering_them_is_not_published(
        stack, tmp_path_factory):
    """Ollama's Jinja rendering of Gemma 4's template differs from transformers' (it thinks unless told
    not to), and the TEMPLATE derived from it, which matches, offers neither tools nor thinking: a model
    published with it would refuse the tool requests the checkpoint was trained for. The run fails before
    pushing, naming the template input."""
    _, run = _publish("gemma", stack, tmp_path_factory)
    assert run.returncode == 1
    assert "  user [gguf_chat_template]: DIFFERENT" in run.stdout and "  user [go_template]: same prompt" in run.stdout
    assert len(run.errors()) == 1, _excerpt(run)
    error = run.errors()[0].replace("%0A", "\n")
    assert "Prompt parity failed" in error and "template input" in error
    assert "the checkpoint's template supports: tools, thinking\n--- Ollama builds [api/show]\n" \
           "the model offers: no tools, no thinking" in error
    assert "6. Push" not in run.stdout and registry_tags(stack.registry, "families/gemma") == []


def test_prompt_parity_passes_for_every_conversation(published):
    family, run = published
    assert "prompt parity of " in run.stdout, _excerpt(run)
    renderings = ("go_template", "gguf_chat_template") if family.name == "chatml" else ("go_template",)
    for label in CONVERSATIONS:
        for rendering in renderings:
            outcome = "DIFFERENT" if rendering == "gguf_chat_template" and family.name in PINNED else "same prompt"
            assert re.search(rf"^  {re.escape(label)} \[{rendering}\]: {outcome}", run.stdout, re.MULTILINE), \
                f"{family.name}: '{label}' [{rendering}] is not '{outcome}'\n" + _excerpt(run)
    assert "FAILED TO RENDER" not in run.stdout and "Prompt parity failed" not in run.stdout
    pinned = "pinned by PARSER passthrough (parser)"
    assert (pinned in run.summary) == (family.name in PINNED), _excerpt(run)


def test_smoke_test_answers_the_scripted_word_and_stops(published):
    family, run = published
    models = json.loads(run.outputs.get("models") or "[]")
    assert {m["tag"] for m in models} == RELEASE_TAGS, _excerpt(run)
    assert all(m["answer"] == family.answer for m in models), models
    # The smoke test logs "<model>: '<answer>' (done_reason: <reason>)" for each model it asks.
    replies = re.findall(r"^(\S+): (.*) \(done_reason: (\w*)\)$", run.stdout, re.MULTILINE)
    assert replies, _excerpt(run)
    assert {name for name, _, _ in replies} <= {m["name"] for m in models}
    assert all(answer == repr(family.answer) and reason == "stop" for _, answer, reason in replies), replies


def test_every_tag_is_in_the_registry(published, stack):
    family, run = published
    models = json.loads(run.outputs.get("models") or "[]")
    assert models and all(m["pushed"] and m["pulled"] for m in models), _excerpt(run)
    assert set(registry_tags(stack.registry, f"families/{family.name}")) == RELEASE_TAGS


def test_stop_tokens_are_the_end_of_turn_and_eos_tokens(published):
    """The token that closes the family's turns comes first; the tokenizer's and generation config's EOS
    tokens follow; no token that opens a turn (it would cut answers short)."""
    family, run = published
    found = re.search(r"^chat template: (.*); stop tokens: (.*)$", run.stdout, re.MULTILINE)
    assert found, _excerpt(run)
    stops = found.group(2).split(", ")
    assert stops[0] == family.end_of_turn
    assert set(stops) == {family.end_of_turn, family.eos, *family.generation_eos}
    assert not set(stops) & set(family.begin_of_turn)
    # The Modelfile is written before the models are created and checked, so it is there even if a check failed.
    modelfile = (run.workspace / run.outputs.get("modelfile", "ollama-publish-out/Modelfile")).read_text()
    assert f'PARAMETER stop "{family.end_of_turn}"' in modelfile
    assert not any(f'PARAMETER stop "{token}"' in modelfile for token in family.begin_of_turn)
