"""The chat template catalog (templates/chat/catalog.toml and its Go templates) proven against the
families' own Jinja chat templates in a real Ollama.

For every catalog entry and every template in its verified_with, a model is created with the
catalog template and checks.prompt_parity compares, character for character, the prompt Ollama builds
for a chat request with the Jinja rendering for the four fixed conversations. One real model serves
every family: SmolLM2-135M-Instruct converted once to Q8_0 (parity is about prompt text, which does not
depend on the model; tests/template_report.py relies on the same).

Tools and thinking go through the same chat path, with `tools` and `think` in the request: Ollama's
_debug_render_only returns the prompt it built, and the model never runs.

The catalog file itself (entries, templates, markers, reference templates) is checked without Ollama.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

from entrypoint import chat_jinja, checks, convert, modelfile, preflight, process
from entrypoint.ollama import OllamaClient
from tests import servers

pytestmark = pytest.mark.servers

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOG_DIR = REPO_ROOT / "templates" / "chat"
MATERIAL = REPO_ROOT / "tests" / "material" / "templates"
LLAMA_CPP_TEMPLATES = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent")) / "models" / "templates"


@dataclasses.dataclass(frozen=True)
class Reference:
    """How a real model of a reference template tokenizes: its BOS and EOS texts, whether its GGUF
    adds BOS by itself (tokenizer.ggml.add_bos_token), and Jinja variables to render it with."""
    bos: str
    eos: str
    adds_bos: bool
    variables: tuple[tuple[str, Any], ...] = ()


LLAMA3 = Reference("<|begin_of_text|>", "<|eot_id|>", True)
MISTRAL = Reference("<s>", "</s>", True)
GEMMA = Reference("<bos>", "<eos>", True)
QWEN = Reference("", "<|im_end|>", False)  # Qwen has no BOS token (bos_token null, add_bos_token false)
GRANITE = Reference("<|end_of_text|>", "<|end_of_text|>", False)
DEEPSEEK = Reference("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True)

# Every template a catalog entry names in verified_with, and the partly matching ones below.
REFERENCES: dict[str, Reference] = {
    "NousResearch-Hermes-3-Llama-3.1-8B": Reference("<|begin_of_text|>", "<|im_end|>", True),
    "teknium-OpenHermes-2.5-Mistral-7B": Reference("<s>", "<|im_end|>", True),
    "Qwen-Qwen2.5-7B-Instruct": QWEN,
    "Qwen-Qwen3-0.6B": QWEN,
    "Qwen-Qwen3-4B-Instruct-2507": QWEN,
    "Qwen-Qwen3-4B-Thinking-2507": QWEN,
    # llama.cpp's copy of QwQ's template closes <think> at once unless enable_thinking is set; QwQ's
    # own template (and the model) always think, which is what enable_thinking=True renders.
    "Qwen-QwQ-32B": Reference("", "<|im_end|>", False, (("enable_thinking", True),)),
    "Qwen3.5-4B": QWEN,
    "meta-llama-Llama-2-7b-chat-hf": MISTRAL,
    "meta-llama-Meta-Llama-3-8B-Instruct": LLAMA3,
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA3,
    "meta-llama-Llama-3.3-70B-Instruct": LLAMA3,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "mistralai-Mistral-7B-Instruct-v0.2": MISTRAL,
    "mistralai-Mistral-7B-Instruct-v0.3": MISTRAL,
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL,
    "google-gemma-7b-it": GEMMA,
    "google-gemma-2-2b-it": GEMMA,
    "google-gemma-3-4b-it": GEMMA,
    "microsoft-Phi-3-mini-4k-instruct": Reference("<s>", "<|endoftext|>", False),
    "microsoft-Phi-3.5-mini-instruct": Reference("<s>", "<|endoftext|>", False),
    "microsoft-phi-4": Reference("<|endoftext|>", "<|im_end|>", False),
    "microsoft-Phi-4-mini-instruct": Reference("<|endoftext|>", "<|endoftext|>", False),
    "HuggingFaceH4-zephyr-7b-beta": MISTRAL,
    "tatsu-lab-alpaca-7b": MISTRAL,
    "lmsys-vicuna-7b-v1.5": MISTRAL,
    "CohereForAI-c4ai-command-r-v01": Reference("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", True),
    "ibm-granite-granite-4.1": GRANITE,
    "ibm-granite-granite-4.0": GRANITE,
    "ibm-granite-granite-3.3-2B-Instruct": GRANITE,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": DEEPSEEK,
    # As QwQ: llama.cpp's copy adds an enable_thinking switch that is off by default; DeepSeek's own
    # template opens <think> for the answer, which is what enable_thinking=True renders.
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": dataclasses.replace(DEEPSEEK, variables=(("enable_thinking", True),)),
}

# Templates a family's template matches only in chats that carry a system prompt: without one they
# write their own default system turn (the catalog entry has none, as Granite 4.1), given here for a
# date (Granite 3.3 writes today's date as 'July 26, 2024', which Ollama cannot format).
PARTIAL: dict[tuple[str, str], Any] = {
    ("granite", "ibm-granite-granite-4.0"): lambda today: (
        "<|start_of_role|>system<|end_of_role|>You are a helpful assistant. Please ensure responses are "
        "professional, accurate, and safe.<|end_of_text|>\n"),
    ("granite", "ibm-granite-granite-3.3-2B-Instruct"): lambda today: (
        "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024. Today's Date: "
        f"{today:%B %d, %Y}. You are Granite, developed by IBM. You are a helpful AI assistant.<|end_of_text|>\n"),
}


def jinja_path(name: str) -> Path:
    for folder in (LLAMA_CPP_TEMPLATES, MATERIAL):
        if (folder / f"{name}.jinja").is_file():
            return folder / f"{name}.jinja"
    raise FileNotFoundError(f"{name}.jinja is neither in llama.cpp's models/templates nor in {MATERIAL}")


def reference_jinja(name: str) -> str:
    """The template as prompt_parity renders it: with the reference's Jinja variables set first."""
    prefix = "".join(f"{{%- set {key} = {str(value).lower()} -%}}" for key, value in REFERENCES[name].variables)
    return prefix + jinja_path(name).read_text(encoding="utf-8")


def render_jinja(name: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                 today: datetime.datetime | None = None, **variables: Any) -> str:
    """A reference template's rendering as chat_jinja.render does it (same sandbox and helpers), with the
    extra variables transformers passes (tools, enable_thinking), which chat_jinja.render does not take."""
    reference = REFERENCES[name]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[chat_jinja._GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = chat_jinja._tojson
    env.globals["raise_exception"] = chat_jinja._raise
    env.globals["strftime_now"] = lambda fmt: (today or datetime.datetime.now()).strftime(fmt)
    values = {**dict(reference.variables), **variables}
    if tools is not None:
        values["tools"] = tools
    text = env.from_string(jinja_path(name).read_text(encoding="utf-8")).render(
        messages=messages, bos_token=reference.bos, eos_token=reference.eos, add_generation_prompt=True, **values)
    # The GGUF adds BOS itself (to Ollama's prompt too), so the Jinja's own BOS text is not part of the
    # prompt text Ollama must build; the template writing it would double it.
    if reference.adds_bos and reference.bos and text.startswith(reference.bos):
        text = text[len(reference.bos):]
    return text


# ------------------------------------------------------------------------------------------------
# The catalog file, without Ollama.

def test_catalog_format():
    with open(CATALOG_DIR / "catalog.toml", "rb") as file:
        tables = tomllib.load(file)
    required = {"applies_to", "end_of_turn", "begin_of_turn", "markers", "verified_with"}
    for name, table in tables.items():
        assert required <= table.keys(), f"{name} lacks {required - table.keys()}"
        assert set(table) <= required | {"model_types", "default_system"}, f"{name} has unknown keys"
        assert table["applies_to"].strip(), name
    assert set(tables) == set(modelfile.FAMILIES)
    # The families the issue names, at least.
    assert {"chatml", "qwen2.5", "qwen3", "qwen3-thinking", "llama2", "llama3", "llama3.1", "mistral-v1",
            "mistral-v3", "mistral-tekken", "mistral-small", "gemma", "phi3", "phi4", "zephyr", "alpaca",
            "vicuna", "command-r", "granite", "deepseek-r1"} <= set(modelfile.FAMILIES)


@pytest.mark.parametrize("family", sorted(modelfile.FAMILIES))
def test_catalog_entry(family):
    entry = modelfile.FAMILIES[family]
    raw = (CATALOG_DIR / f"{family}.gotmpl").read_text(encoding="utf-8")
    # One final newline, which the loader strips: nothing may follow the generation prompt.
    assert raw.endswith("\n") and not raw.endswith("\n\n"), family
    template = modelfile.load_family(family).template
    assert template == raw[:-1] and ".Messages" in template
    assert entry.markers and all(entry.markers), family
    assert entry.end_of_turn and all(entry.end_of_turn), family
    assert not set(entry.begin_of_turn) & set(entry.end_of_turn), family
    assert entry.verified_with, family
    for name in entry.verified_with:
        path = jinja_path(name)
        assert name in REFERENCES, f"{name}: say how its model tokenizes (BOS, EOS) in REFERENCES"
        # Detection reads markers off a checkpoint's template: each of its family's templates has them all.
        text = path.read_text(encoding="utf-8")
        missing = [marker for marker in entry.markers if marker not in text]
        assert not missing, f"{family}: {name} lacks markers {missing}"
    # A template that writes the BOS text would double the BOS the GGUF adds.
    for name in entry.verified_with:
        if REFERENCES[name].adds_bos and REFERENCES[name].bos:
            assert not template.startswith(REFERENCES[name].bos), family
    # A dated default system prompt belongs in the template ({{ currentDate }}), never in SYSTEM.
    assert "{{" not in entry.default_system


def test_each_reference_template_is_detected_as_its_family():
    """Markers pick the family: every template an entry is verified with is detected as that entry
    (the most specific family whose markers all appear wins), not as a more generic one."""
    for family in modelfile.FAMILIES.values():
        for name in family.verified_with:
            info = modelfile.TokenizerInfo(chat_template=jinja_path(name).read_text(encoding="utf-8"),
                                           eos_tokens=(), bos_token="")
            detected = modelfile.detect_family(info)
            assert detected is not None and detected.name == family.name, (name, detected)


def test_reference_templates_are_unambiguous_and_material_names_its_model():
    names = {name for family in modelfile.FAMILIES.values() for name in family.verified_with}
    names |= {name for _, name in PARTIAL}
    for name in names:
        places = [folder for folder in (LLAMA_CPP_TEMPLATES, MATERIAL) if (folder / f"{name}.jinja").is_file()]
        assert len(places) == 1, f"{name}.jinja must exist in exactly one place, found {places}"
    for path in sorted(MATERIAL.glob("*.jinja")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("{#- ") and first.endswith("-#}"), path.name
        model = first.removeprefix("{#- ").split(" ")[0].rstrip(":")
        assert "/" in model and model.replace("/", "-") == path.stem, f"{path.name} names {model}"
        assert path.stem in names, f"{path.name} is not used by the catalog"


def test_tool_cases_cover_every_template_that_writes_tools():
    with_tools = {name for name in modelfile.FAMILIES if ".Tools" in modelfile.load_family(name).template}
    assert with_tools == {family for family, _ in TOOL_CASES}
    for family, name in TOOL_CASES:
        assert name in modelfile.FAMILIES[family].verified_with or (family, name) in PARTIAL, (family, name)


# The text a model writes to call a tool, which Ollama 0.11 reads off the template: the first text
# inside the first `{{ if .ToolCalls }}` (dot being the message). Without one it falls back to "{" and
# parses a tool call only from an answer that starts with a JSON object (as Llama 3.1 answers).
TOOL_CALL_TAGS = {"qwen2.5": "<tool_call>", "qwen3": "<tool_call>", "qwen3-thinking": "<tool_call>",
                  "granite": "<tool_call>", "mistral-v3": "[TOOL_CALLS] [", "mistral-tekken": "[TOOL_CALLS][",
                  "mistral-small": "[TOOL_CALLS]", "llama3.1": "{"}


@pytest.mark.parametrize("family", sorted(TOOL_CALL_TAGS))
def test_tool_call_tag_ollama_infers(family):
    template = modelfile.load_family(family).template
    if TOOL_CALL_TAGS[family] == "{":
        assert "if .ToolCalls" not in template
        return
    after = template.split("if .ToolCalls }}", 1)[1]
    text = re.sub(r"\{\{[^}]*\}\}", "", after.split("{{ \"{\" }}", 1)[0])  # the text up to the JSON
    assert text.strip().startswith(TOOL_CALL_TAGS[family]), text[:80]


# ------------------------------------------------------------------------------------------------
# Parity in a real Ollama.

@dataclasses.dataclass
class Server:
    client: OllamaClient
    digest: str


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    checkpoint = Path(os.environ.get("SMOLLM2_CHECKPOINT", ""))
    if not (checkpoint / "model.safetensors").is_file():
        raise RuntimeError("$SMOLLM2_CHECKPOINT is not set to the SmolLM2 checkpoint: run the tests via scripts/test")
    root = tmp_path_factory.mktemp("catalog")
    gguf = root / "smollm2-q8_0.gguf"
    convert.convert(checkpoint, gguf, "q8_0", "SmolLM2-135M-Instruct",
                    process.Seal(preflight.tool_memory(convert.largest_tensor(convert.safetensors_shapes(checkpoint))),
                                 input_name="hf-repo"))
    assert not convert.adds_bos(gguf)  # so no BOS is added on either side (see test_family_prompt_parity)
    with servers.ollama(root / "home") as url:
        client = OllamaClient(url)
        digest = client.upload_blob(gguf)
        # Keeps the GGUF blob referenced: Ollama deletes a blob with the last model that uses it.
        client.create({"model": "catalog.local/catalog/keep:latest", "files": {"model.gguf": digest}}, quiet=True)
        yield Server(client, digest)


def model_name(family: str) -> str:
    return f"catalog.local/catalog/{family.replace('.', '-')}:latest"


def create_family_model(server: Server, family: str, template: str | None = None) -> tuple[str, dict[str, Any]]:
    """A model with the catalog template, its default system prompt and no parameters (as the action makes it)."""
    chat = modelfile.load_family(family)
    spec = modelfile.ModelSpec(template=chat.template if template is None else template, system=chat.default_system,
                               parameters=(), license="", source="catalog test")
    name = model_name(family)
    body = modelfile.create_request(spec, name, server.digest, "model.gguf")
    server.client.create(body, quiet=True)
    return name, body


def parity_failures(server: Server, family: str, reference: str, template: str | None = None) -> set[str]:
    """checks.prompt_parity of the family's template against a reference template: the conversations
    that differ.

    BOS: a real model of a family whose Jinja writes {{ bos_token }} has a GGUF that adds BOS itself
    (REFERENCES[...].adds_bos), so Ollama's prompt must not contain the BOS text: both sides then get
    exactly one BOS token from the tokenizer. prompt_parity(adds_bos=True) models that: it strips the
    leading BOS text off the Jinja rendering and compares the rest with Ollama's prompt, so a catalog
    template that wrote the BOS text itself fails (on a real model it would double BOS). SmolLM2's GGUF
    adds no BOS, so here neither side gets one, and the comparison is that of the real model minus the
    one shared BOS token. For models whose GGUF adds no BOS (Qwen, Phi, Granite) adds_bos=False
    compares the whole rendering, BOS text included if the Jinja wrote one.
    """
    ref = REFERENCES[reference]
    name, body = create_family_model(server, family, template)
    info = modelfile.TokenizerInfo(chat_template=reference_jinja(reference), eos_tokens=(ref.eos,), bos_token=ref.bos)
    try:
        # SmolLM2's GGUF carries its own Jinja (no tools, no thinking): Ollama renders the catalog TEMPLATE.
        failures, _ = checks.prompt_parity(server.client, name, body, info, adds_bos=ref.adds_bos,
                                           renderings=[checks.GO_TEMPLATE])
    finally:
        server.client.delete(name)
    if failures:
        print(checks.explain(failures))
    return {failure.conversation for failure in failures}


VERIFIED = [(family.name, name) for family in modelfile.FAMILIES.values() for name in family.verified_with]


@pytest.mark.parametrize(("family", "reference"), VERIFIED, ids=[f"{f}-{r}" for f, r in VERIFIED])
def test_family_prompt_parity(server, family, reference):
    assert parity_failures(server, family, reference) == set()


def test_parity_catches_a_template_that_writes_bos(server):
    # The Llama 3 template with <|begin_of_text|> written into it: a real model would get BOS twice.
    template = "<|begin_of_text|>" + modelfile.load_family("llama3").template
    assert parity_failures(server, "llama3", "meta-llama-Meta-Llama-3-8B-Instruct", template=template) == set(
        checks.CONVERSATIONS)


# ------------------------------------------------------------------------------------------------
# Tools and thinking, through /api/chat.

def ollama_chat_prompt(server: Server, model: str, messages: list[dict[str, Any]],
                       tools: list[dict[str, Any]] | None = None, think: bool | None = None) -> str:
    """The prompt Ollama builds for an /api/chat request (its _debug_render_only: the whole chat path up to
    the model, which does not run: the model's SYSTEM and MESSAGEs, truncation, the template)."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True}
    if tools is not None:
        body["tools"] = tools
    if think is not None:
        body["think"] = think
    response = server.client.session.post(server.client._url("/api/chat"), json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["_debug_info"]["rendered_template"]


# The action's own tools and tool turns (checks.py): tools in the form Ollama passes them on.
TOOLS = checks.TOOLS
ASK = checks.ASK
SYSTEM = {"role": "system", "content": checks.SYSTEM}
CALL_ID = checks.CALL_ID
CALL = checks.CALL
RESULT = checks.RESULT
TOOL_CONVERSATIONS = {
    "tools + user": [ASK],
    "tools + system + user": [SYSTEM, ASK],
    "tools + multi-turn": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}, ASK],
    "tools + call + result": [ASK, CALL, RESULT],
    "tools + call + two results": [SYSTEM, ASK, CALL, RESULT, {**RESULT, "content": "and windy"}],
}
ALL = tuple(TOOL_CONVERSATIONS)
# Llama 3.1 takes one tool call per assistant turn (as here).
TOOL_CASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("qwen2.5", "Qwen-Qwen2.5-7B-Instruct"): ALL,
    ("qwen3", "Qwen-Qwen3-0.6B"): ALL,
    ("qwen3", "Qwen-Qwen3-4B-Instruct-2507"): ALL,
    ("qwen3-thinking", "Qwen-Qwen3-4B-Thinking-2507"): ALL,
    ("llama3.1", "meta-llama-Llama-3.1-8B-Instruct"): ALL,
    ("llama3.1", "meta-llama-Llama-3.3-70B-Instruct"): ALL,
    ("mistral-v3", "mistralai-Mistral-7B-Instruct-v0.3"): ALL,
    ("mistral-tekken", "mistralai-Mistral-Nemo-Instruct-2407"): ALL,
    ("mistral-small", "Mistral-Small-3.2-24B-Instruct-2506"): ALL,
    ("granite", "ibm-granite-granite-4.1"): ALL,
    # Granite 4.0 adds its default system prompt only when there are neither a system prompt nor tools.
    ("granite", "ibm-granite-granite-4.0"): ALL,
}
# Mistral's templates write the id of each tool call and result, and refuse calls without one. The
# mistral-v3 and mistral-tekken templates write the ids Ollama 0.34's messages carry (checked with them);
# mistral-small was written for Ollama 0.11, whose tool calls carried none, and writes the calls and
# results without them: the Jinja rendering with exactly this text removed must equal Ollama's prompt
# for messages without ids.
CALL_ID_TEXT = {
    "mistral-small": (f"[CALL_ID]{CALL_ID}", f"{CALL_ID}[TOOL_CONTENT]"),
}


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """checks.for_ollama, without the ids Ollama 0.11's messages did not carry."""
    out = {k: v for k, v in checks.for_ollama(message).items() if k != "tool_call_id"}
    if "tool_calls" in out:
        out["tool_calls"] = [{"function": call["function"]} for call in out["tool_calls"]]
    return out


def chat_parity(server: Server, family: str, reference: str, conversation: list[dict[str, Any]], *,
                tools: list[dict[str, Any]] | None = None, think: bool | None = None,
                today: datetime.datetime | None = None, **variables: Any) -> tuple[str, str]:
    """(the reference template's rendering, Ollama's prompt) for one conversation."""
    expected = render_jinja(reference, conversation, tools=tools, today=today, **variables)
    name, _ = create_family_model(server, family)
    try:
        for_ollama = without_ids if family in CALL_ID_TEXT else checks.for_ollama
        actual = ollama_chat_prompt(server, name, [for_ollama(m) for m in conversation], tools=tools, think=think)
    finally:
        server.client.delete(name)
    return expected, actual


TOOL_PARAMS = [(family, reference, label) for (family, reference), labels in TOOL_CASES.items() for label in labels]


@pytest.mark.parametrize(("family", "reference", "conversation"), TOOL_PARAMS,
                         ids=[f"{f}-{r}-{c.replace(' ', '')}" for f, r, c in TOOL_PARAMS])
def test_tool_prompt_parity(server, family, reference, conversation):
    messages = TOOL_CONVERSATIONS[conversation]
    expected, actual = chat_parity(server, family, reference, messages, tools=TOOLS)
    assert "get_weather" in actual and "get_time" in actual
    if family in CALL_ID_TEXT and any("tool_calls" in m for m in messages):
        for text in CALL_ID_TEXT[family]:
            assert text in expected
            expected = expected.replace(text, "")
    assert actual == expected


THINKING_CALL = {**CALL, "reasoning_content": "The user wants the weather: call get_weather."}
THINK_CASES = [
    # (family, reference, think sent to Ollama, enable_thinking given to the Jinja template, conversation)
    ("qwen3", "Qwen-Qwen3-0.6B", False, False, [ASK]),
    ("qwen3", "Qwen-Qwen3-0.6B", True, True, [SYSTEM, ASK]),
    # Thinking of a turn after the last user message is written back; the tool call follows it.
    ("qwen3", "Qwen-Qwen3-0.6B", True, True, [ASK, THINKING_CALL, RESULT]),
    ("qwen3-thinking", "Qwen3.5-4B", False, False, [ASK]),
    ("qwen3-thinking", "Qwen3.5-4B", True, True, [SYSTEM, ASK]),
]


@pytest.mark.parametrize(("family", "reference", "think", "enable_thinking", "conversation"), THINK_CASES,
                         ids=[f"{c[0]}-{c[1]}-think-{c[2]}-{len(c[4])}" for c in THINK_CASES])
def test_think_prompt_parity(server, family, reference, think, enable_thinking, conversation):
    tools = TOOLS if any(m["role"] == "tool" for m in conversation) else None
    expected, actual = chat_parity(server, family, reference, conversation, tools=tools, think=think,
                                   enable_thinking=enable_thinking)
    assert actual == expected


@pytest.mark.parametrize("conversation", sorted(checks.CONVERSATIONS))
def test_llama_3_2_differs_only_by_its_date(server, conversation):
    """Llama 3.2's template writes today's date as '26 Jul 2024'; the llama3.1 template writes the
    fixed date of 3.1 / 3.3. On that day Llama 3.2's prompts are exactly the llama3.1 template's, on
    any other day they differ (only in that line)."""
    messages = checks.CONVERSATIONS[conversation]
    same_day, actual = chat_parity(server, "llama3.1", "meta-llama-Llama-3.2-3B-Instruct", messages,
                                   today=datetime.datetime(2024, 7, 26))
    assert actual == same_day
    other_day = render_jinja("meta-llama-Llama-3.2-3B-Instruct", messages, today=datetime.datetime(2025, 3, 9))
    assert other_day == same_day.replace("Today Date: 26 Jul 2024", "Today Date: 09 Mar 2025") != same_day


PARTIAL_PARAMS = [(f, r, c) for f, r in sorted(PARTIAL) for c in checks.CONVERSATIONS]


@pytest.mark.parametrize(("family", "reference", "conversation"), PARTIAL_PARAMS,
                         ids=[f"{f}-{r}-{c.replace(' ', '')}" for f, r, c in PARTIAL_PARAMS])
def test_partly_matching_templates_differ_only_by_their_default_system_turn(server, family, reference,
                                                                            conversation):
    messages = checks.CONVERSATIONS[conversation]
    today = datetime.datetime(2025, 3, 9)
    expected, actual = chat_parity(server, family, reference, messages, today=today)
    if messages[0]["role"] == "system":
        assert actual == expected
    else:
        assert expected == PARTIAL[(family, reference)](today) + actual


def test_ollama_log_prompts_are_read_exactly(server):
    """The trace-log reader itself: a prompt with quotes, backslashes, tabs and non-ASCII text."""
    content = 'Say "hi"\\ there\ttab – 你好 ｜end▁of▁sentence｜'
    name, _ = create_family_model(server, "chatml")
    try:
        prompt = ollama_chat_prompt(server, name, [{"role": "user", "content": content}])
    finally:
        server.client.delete(name)
    assert prompt == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_tool_definitions_are_in_the_order_ollama_passes_them_on():
    """The Jinja side renders the tool dicts in their own key order; Ollama parses tools into structs and
    passes them on (to llama-server, to a Go template's fields) in the structs' order, empty lists left out.
    The test's tools must already be in that order for parity to measure the templates."""
    for tool in TOOLS:
        parameters = tool["function"]["parameters"]
        assert list(parameters) == (["type", "required", "properties"] if parameters.get("required")
                                    else ["type", "properties"])
        assert list(parameters["properties"]) == sorted(parameters["properties"])
        assert all(list(p)[:2] == ["type", "description"] for p in parameters["properties"].values())
