"""Tools and thinking survive publishing, end to end: tiny checkpoints with real tokenizers and scripted
weights (tests/material/scripted.py) whose every reply is their family's tool-call text, after a thinking
block for Qwen 3, Qwen 3.5 and Bielik. One for each way a tool model is published: Qwen 3 and Llama 3.1
with catalog TEMPLATEs, Qwen 3.5 with Ollama's built-in renderer and parser, Llama 3.2 with no TEMPLATE
(llama-server renders its Jinja and parses its calls), and Bielik's template with its Jinja rendered and
parsed by llama-server, published with the caveat that Ollama passes no reasoning back to it. The action
publishes each with its defaults to the test registry, on an Ollama server of the test's own
(ollama-host); then a client asks the published model, through /api/chat with tools, and must get the
call back as message.tool_calls, and the reasoning as message.thinking. Qwen 3's is published once more
by the action's image, run as GitHub's runner runs it, and pulled from the registry into the client's
Ollama."""

from __future__ import annotations

import pytest
import requests

from entrypoint import checks, modelfile
from entrypoint.ollama import OllamaClient
from tests import servers
from tests.conftest import action_runner, registry_tags
from tests.container import Runner
from tests.material import scripted

pytestmark = pytest.mark.servers

CITY_CALL = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
# family: (the template that proves itself, how Ollama renders its prompts, the thinking returned, think sent)
CASES = {"qwen3-tools": ("qwen3 (catalog)", "go_template", "Weather lookup.", True),
         "llama3.1-tools": ("llama3.1 (catalog)", "go_template", "", None),
         "qwen3.5-tools": ("qwen3.5 (Ollama's built-in renderer)", "renderer", "Weather lookup.", True),
         "llama3.2-tools": (modelfile.JINJA_FORMAT_NAME, "gguf_chat_template", "", None),
         "bielik-tools": ("derived from the checkpoint's chat template (chatml family)", "gguf_chat_template",
                          "Weather lookup.", True)}
# Published with the caveat that Ollama passes no reasoning back to llama-server (checks.ParityFailure).
REASONING_DROPPED = {"bielik-tools"}


@pytest.fixture(scope="module")
def ollama(tmp_path_factory):
    with servers.ollama(tmp_path_factory.mktemp("round-trip-ollama")) as url:
        yield url


@pytest.fixture(scope="module", params=sorted(CASES))
def published(request, stack, ollama, tmp_path_factory):
    family = scripted.FAMILIES[request.param]
    folder = scripted.build(family.name, tmp_path_factory.mktemp(f"tiny-{family.name}"))
    repo = f"test-org/tiny-{family.name}"
    servers.add_model_repo(stack.mirrors, repo, folder, tags=("v1.0.0",))
    model = f"round-trip/{family.name.replace('.', '-')}"
    run = action_runner(tmp_path_factory.mktemp(f"publish-{family.name}"))({
        "hf-repo": repo, "hf-revision": "v1.0.0", "ollama-model": f"{stack.registry}/{model}",
        "insecure-registry": "true", "quantizations": "Q8_0", "ollama-host": ollama,
    }, env={"HF_ENDPOINT": stack.hub_endpoint})
    print(run.stdout[-5000:], run.stderr[-1500:])
    return family, run, f"{stack.registry}/{model}"


def _chat(url: str, model: str, think: bool | None) -> dict:
    body = {"model": model, "messages": [checks.ASK], "tools": checks.TOOLS, "stream": False,
            "options": {"temperature": 0, "num_predict": 64}}
    if think is not None:
        body["think"] = think
    response = requests.post(f"{url}/api/chat", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_published_with_the_template_that_offers_the_checkpoints_tools(published, stack):
    family, run, model = published
    chosen, rendering, thinking, _ = CASES[family.name]
    assert run.returncode == 0, run.stdout[-4000:]
    assert f"chat template: {chosen}" in run.stdout
    offered = "tools, thinking" if thinking else "tools"
    assert f"the checkpoint's chat template supports: {offered}" in run.stdout
    assert f"the models offer: {offered}" in run.stdout
    has_template = chosen != modelfile.JINJA_FORMAT_NAME
    assert f"Ollama renders the prompts with {checks.describe_rendering(rendering, has_template)}" in run.stdout
    assert f"  tool call + result [{rendering}]: same prompt" in run.stdout
    if family.name in REASONING_DROPPED:
        assert "  thinking + tool call + result [gguf_chat_template]: the checkpoint's prompt without the reasoning" \
            in run.stdout
        assert "No candidate passes outright" in run.stdout and "::warning::" in run.stdout
        assert "**Caveat:** Ollama " in run.summary
        assert "passes no assistant turn's thinking to llama-server" in run.summary
    else:
        assert "Caveat" not in run.summary
    assert sorted(registry_tags(stack.registry, model.split("/", 1)[1])) == ["1.0.0", "1.0.0-q8_0", "latest"]


@pytest.mark.parametrize("tag", ["1.0.0-q8_0", "latest"])
def test_the_published_model_returns_the_tool_call_and_its_thinking(published, ollama, tag):
    family, run, model = published
    assert run.returncode == 0, run.stdout[-4000:]
    _, _, thinking, think = CASES[family.name]
    reply = _chat(ollama, f"{model}:{tag}", think)
    message = reply["message"]
    assert _tool_calls(message) == CITY_CALL, reply
    assert message.get("thinking", "").strip() == thinking, reply
    assert message["content"].strip() == "", reply  # the call's text is not left in the answer
    assert reply["done_reason"] == "stop", reply


def _tool_calls(message: dict) -> list[dict]:
    return [{"function": {k: v for k, v in call["function"].items() if k in ("name", "arguments")}}
            for call in message.get("tool_calls", [])]


@pytest.mark.parametrize("name", ["qwen3-tools", "bielik-tools"])
def test_the_image_publishes_a_model_that_calls_tools_and_thinks(name, stack, ollama, tmp_path_factory):
    """Through a catalog TEMPLATE (Qwen 3) and through the GGUF's Jinja in llama-server, with the caveat
    (Bielik's template)."""
    folder = scripted.build(name, tmp_path_factory.mktemp(f"tiny-{name}-image"))
    repo, model = f"test-org/tiny-{name}-image", f"{stack.registry}/round-trip/{name}-image"
    servers.add_model_repo(stack.mirrors, repo, folder, tags=("v1.0.0",))
    run = Runner(tmp_path_factory.mktemp(f"image-round-trip-{name}")).run(
        {"hf-repo": repo, "hf-revision": "v1.0.0", "ollama-model": model, "insecure-registry": "true",
         "quantizations": "Q8_0"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    print(run.stdout[-5000:], run.stderr[-1500:])
    assert run.exit_code == 0 and run.errors() == [], run.stdout[-4000:]
    chosen, rendering, _, _ = CASES[name]
    assert f"Chat template: {chosen}. Prompts are rendered by Ollama with " in run.summary
    assert f"({rendering})" in run.summary and "The models offer tools and thinking." in run.summary
    assert ("**Caveat:**" in run.summary) == (name in REASONING_DROPPED)
    client = OllamaClient(ollama)
    client.pull(f"{model}:latest", insecure=True, on_progress=lambda _: None)
    message = _chat(ollama, f"{model}:latest", True)["message"]
    assert _tool_calls(message) == CITY_CALL, message
    assert message.get("thinking", "").strip() == "Weather lookup.", message
