"""Which template Ollama 0.34 renders a published model's prompts with, and that prompt parity checks
exactly that one. The action runs against an Ollama server of the test's own (ollama-host), whose log
carries Ollama's own account of every model it loads: its "template selection" line.

SmolLM2's Jinja chat template has no tools: Ollama renders the Modelfile's TEMPLATE. The same weights
with Qwen3's tool-calling Jinja template: the derived TEMPLATE has no tools, so Ollama prefers the
GGUF's Jinja, rendered by llama-server; parity checks that and the TEMPLATE (which Ollama renders with
OLLAMA_GO_TEMPLATE=1). A checkpoint whose GGUF ends up with another Jinja template than the one
transformers uses (tokenizer_config.json's stale chat_template next to chat_template.jinja: the
converter embeds the former) differs on the Jinja path: the models would pin the TEMPLATE, which matches,
but it has no tools, so the run fails. With a wrong TEMPLATE too, no rendering matches: the run fails
and pushes nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from entrypoint import chat_jinja, checks
from entrypoint.ollama import OllamaClient, file_sha256
from tests import servers
from tests.conftest import HF_REPO, action_runner, parity_verdicts, registry_tags

pytestmark = pytest.mark.servers
TOOLS_TEMPLATE = (Path(__file__).resolve().parent / "material" / "templates" /
                  "Qwen-Qwen3-4B-Instruct-2507.jinja").read_text(encoding="utf-8")
# What it renders: tools and their round trip, no thinking (the parity check's conversations follow it).
WITH_TOOLS = chat_jinja.Capabilities(tools=True, tool_round_trip=True, thinking=False, thinking_switch=False)


def _with_template(folder: Path, template: str, stale_config_template: str | None = None) -> Path:
    """SmolLM2's checkpoint with `template` as its chat_template.jinja (what transformers uses), and
    tokenizer_config.json's own chat_template replaced by `stale_config_template` (or dropped)."""
    shutil.copytree(os.environ["SMOLLM2_CHECKPOINT"], folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if stale_config_template is not None:
        config["chat_template"] = stale_config_template
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def ollama(tmp_path_factory):
    """An Ollama server of the test's own: the action uses it (ollama-host), the test reads its log."""
    home = tmp_path_factory.mktemp("ollama-home")
    with servers.ollama(home) as url:
        yield url, home / "ollama.log"


def _publish(stack, ollama, tmp_path_factory, repo_id: str, repository: str, template: str = "auto"):
    url, _ = ollama
    run = action_runner(tmp_path_factory.mktemp(repository.replace("/", "-")))({
        "hf-repo": repo_id, "hf-revision": "v1.0.0", "ollama-model": f"{stack.registry}/{repository}",
        "quantizations": "Q8_0", "insecure-registry": "true", "ollama-host": url, "template": template,
    }, env={"HF_ENDPOINT": stack.hub_endpoint})
    print(run.stdout[-4000:], run.stderr[-1500:])
    return run


def _selections(log: Path, model: str) -> set[str]:
    """The `selected=` values of Ollama's "template selection" lines for a model (one per load)."""
    pattern = re.compile(rf'msg="template selection" model={re.escape(model)} selected=(\w+)')
    return {m.group(1) for m in pattern.finditer(log.read_text(errors="replace"))}


def test_a_plain_chat_template_is_rendered_by_the_template(stack, ollama, tmp_path_factory):
    url, log = ollama
    run = _publish(stack, ollama, tmp_path_factory, HF_REPO, "rendering/plain")
    assert run.returncode == 0, run.stdout[-3000:]
    name = f"{stack.registry}/rendering/plain:1.0.0-q8_0"
    assert _selections(log, name) == {"go_template"}  # loaded for the smoke test
    show = requests.post(f"{url}/api/show", json={"model": name}, timeout=30).json()
    assert "tools" not in show["capabilities"]
    assert "Ollama renders the prompts with the Modelfile's TEMPLATE (go_template)" in run.stdout
    assert parity_verdicts(run.stdout) == {(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}


def test_a_tool_calling_template_is_rendered_by_llama_server_and_both_renderings_pass(stack, ollama,
                                                                                       tmp_path_factory):
    url, log = ollama
    folder = _with_template(tmp_path_factory.mktemp("tools") / "checkpoint", TOOLS_TEMPLATE)
    # Qwen3-4B-Instruct-2507's own sampling defaults: they become parameters.
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
    (folder / "generation_config.json").write_text(json.dumps(generation))
    servers.add_model_repo(stack.mirrors, "test-org/SmolLM2-tools", folder, tags=("v1.0.0",))
    run = _publish(stack, ollama, tmp_path_factory, "test-org/SmolLM2-tools", "rendering/tools")
    assert run.returncode == 0, run.stdout[-3000:]
    name = f"{stack.registry}/rendering/tools:1.0.0-q8_0"
    # Ollama's own account when it loaded the published model for the smoke test: the GGUF's Jinja.
    assert _selections(log, name) == {"gguf_chat_template"}
    show = requests.post(f"{url}/api/show", json={"model": name}, timeout=30).json()
    assert "tools" in show["capabilities"] and show["template"] == TOOLS_TEMPLATE
    assert "Ollama renders the prompts with the checkpoint's own Jinja chat template, by llama-server " \
           "(gguf_chat_template)" in run.stdout
    assert "(gguf_chat_template)" in run.summary
    # Parity asked the published model itself for that rendering, and a probe for the TEMPLATE's: created
    # like it with a parser, which Ollama renders with the TEMPLATE whatever the GGUF's Jinja offers.
    # The four plain conversations on both renderings, and the three tool ones on the Jinja's, which has
    # tools (the TEMPLATE has none: Ollama with OLLAMA_GO_TEMPLATE=1 offers none).
    assert parity_verdicts(run.stdout) == {
        **{(label, "gguf_chat_template"): ["same"] for label in checks.conversations(WITH_TOOLS)},
        **{(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}}
    assert "the checkpoint's chat template supports: tools" in run.stdout and "the models offer: tools" in run.stdout
    assert "The models offer tools." in run.summary
    assert "Sampling defaults: temperature 0.7 (generation_config.json), top_p 0.8 (generation_config.json), " \
           "top_k 20 (generation_config.json)." in run.summary
    modelfile_text = (run.workspace / run.outputs["modelfile"]).read_text()
    assert "PARAMETER temperature 0.7\nPARAMETER top_p 0.8\nPARAMETER top_k 20\n" in modelfile_text
    assert show["parameters"].count("temperature") == 1 and "0.7" in show["parameters"]
    template = _template(run)
    gguf = run.workspace / run.outputs["gguf-paths"].splitlines()[0]
    probe = {"model": f"{stack.registry}/rendering/tools:probe", "files": {gguf.name: "sha256:" + file_sha256(gguf)},
             "template": template, "parser": checks.PIN_PARSER}
    OllamaClient(url).create(probe, quiet=True)
    pinned = requests.post(f"{url}/api/show", json={"model": probe["model"]}, timeout=30).json()
    assert pinned["template"] == template and "tools" not in pinned["capabilities"]
    assert sorted(registry_tags(stack.registry, "rendering/tools")) == ["1.0.0", "1.0.0-q8_0", "latest"]


def _template(run) -> str:
    return (run.workspace / run.outputs["modelfile"]).read_text().split('TEMPLATE """', 1)[1].split('"""')[0]


# tokenizer_config.json's chat_template, left behind next to a newer chat_template.jinja.
STALE_TEMPLATE = TOOLS_TEMPLATE.replace(
    "'<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n'",
    "'<|im_start|>' + message.role + ':\\n' + content + '<|im_end|>' + '\\n'", 1)


def test_a_jinja_rendering_that_differs_pins_the_template_but_not_without_the_tools(stack, ollama,
                                                                                   tmp_path_factory):
    """The GGUF carries the stale template (the converter embeds tokenizer_config.json's), Ollama would
    render that, and the TEMPLATE derived from chat_template.jinja builds the right plain prompts: the models
    would pin it. But it has no tools, which the checkpoint's template has: the pinned models would refuse
    tool requests. The catalog's qwen3 template, tried next, writes tools but also offers thinking, and
    its think: false writes an empty thinking block this checkpoint's template never writes. So nothing
    is published, and the error says why."""
    assert STALE_TEMPLATE != TOOLS_TEMPLATE
    folder = _with_template(tmp_path_factory.mktemp("stale") / "checkpoint", TOOLS_TEMPLATE, STALE_TEMPLATE)
    servers.add_model_repo(stack.mirrors, "test-org/SmolLM2-stale-template", folder, tags=("v1.0.0",))
    run = _publish(stack, ollama, tmp_path_factory, "test-org/SmolLM2-stale-template", "rendering/stale")
    assert run.returncode == 1
    # The derived TEMPLATE: the Jinja differs on the plain conversations, the TEMPLATE matches them.
    verdicts = parity_verdicts(run.stdout)
    assert verdicts[("user", "gguf_chat_template")] == ["different"]  # once: the derived TEMPLATE is pinned
    assert verdicts[("user", "go_template")][0] == "same"
    assert "The models pin the TEMPLATE (PARSER passthrough)" in run.stdout
    assert "1 failed checks (capabilities); trying qwen3 (catalog) instead" in run.stdout
    assert "the checkpoint's template supports: tools\n--- Ollama builds [api/show]\nthe model offers: no tools, " \
           "no thinking" in run.stdout
    assert len(run.errors()) == 1 and "Prompt parity failed" in run.errors()[0]
    error = run.errors()[0].replace("%0A", "\n")
    assert "2 failed checks (thinking off, thinking + tool call + result)" in error
    assert "--- Ollama builds [go_template]\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n" \
           "<|im_start|>assistant\n<think>\n\n</think>" in error
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, "rendering/stale") == []


def test_a_mismatch_on_the_rendering_ollama_uses_fails_and_pushes_nothing(stack, ollama, tmp_path_factory):
    """The same stale GGUF template, and a TEMPLATE of the wrong family (zephyr): no rendering builds the
    checkpoint's prompts, so nothing is published."""
    folder = _with_template(tmp_path_factory.mktemp("wrong") / "checkpoint", TOOLS_TEMPLATE, STALE_TEMPLATE)
    servers.add_model_repo(stack.mirrors, "test-org/SmolLM2-no-right-template", folder, tags=("v1.0.0",))
    run = _publish(stack, ollama, tmp_path_factory, "test-org/SmolLM2-no-right-template", "rendering/wrong",
                   template="zephyr")
    assert run.returncode == 1
    assert len(run.errors()) == 1 and "Prompt parity failed" in run.errors()[0]
    # The plain and tool conversations on the stale Jinja; the plain ones on zephyr (no tools to compare).
    assert parity_verdicts(run.stdout) == {
        **{(label, "gguf_chat_template"): ["different"] for label in checks.conversations(WITH_TOOLS)},
        **{(label, "go_template"): ["different"] for label in checks.CONVERSATIONS}}
    assert "[gguf_chat_template]" in run.errors()[0] and "[go_template]" in run.errors()[0]
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, "rendering/wrong") == []
