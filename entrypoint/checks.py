"""Prove a created model works before it is pushed: it answers and stops (smoke test), and Ollama
builds the same prompt, character for character, as the checkpoint's own chat template (prompt parity)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import jinja2

from . import chat_jinja, github, modelfile
from .errors import OllamaRefused, SmokeTestFailed
from .ollama import OllamaClient

SMOKE_MAX_TOKENS = 256
# Deterministic decoding for every check; one token is enough to make Ollama tokenize the prompt.
GREEDY = {"temperature": 0, "seed": 0}

SYSTEM = "You are a terse assistant."
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Name a prime number."}],
    "system + user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a prime number."}],
    "multi-turn": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
                   {"role": "user", "content": "And an even one?"}],
    "system + multi-turn": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a prime number."},
                            {"role": "assistant", "content": "7"}, {"role": "user", "content": "And an even one?"}],
}

# Two tools in the form Ollama passes every request's tools on (its Go structs' key order: type, required,
# properties; empty lists left out), so that the comparison measures the template, not that reordering.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALL_ID = "call00001"  # 9 characters: Mistral's templates refuse other ids
CALL = {"role": "assistant", "content": "", "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]}
RESULT = {"role": "tool", "content": "18 C, sunny", "tool_call_id": CALL_ID}
REASONING = "The user wants the weather: call get_weather."


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A parity conversation as transformers takes it, with the request's tools and think (None: not sent;
    a think sent is the Jinja's enable_thinking)."""
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    think: bool | None = None
    kind: str = "plain"  # plain, tools or thinking: the report's columns


def conversations(caps: chat_jinja.Capabilities) -> dict[str, Conversation]:
    """The plain conversations, and those of the tools and thinking the checkpoint's template supports."""
    cases = {label: Conversation(messages) for label, messages in CONVERSATIONS.items()}
    system = {"role": "system", "content": SYSTEM}
    if caps.tools:
        cases["two tools"] = Conversation([ASK], TOOLS, kind="tools")
        cases["two tools + system"] = Conversation([system, ASK], TOOLS, kind="tools")
        if caps.tool_round_trip:
            cases["tool call + result"] = Conversation([ASK, CALL, RESULT], TOOLS, kind="tools")
    if caps.thinking_switch:
        cases["thinking on"] = Conversation([ASK], think=True, kind="thinking")
        cases["thinking off"] = Conversation([ASK], think=False, kind="thinking")
    if caps.thinking and caps.tool_round_trip:
        cases["thinking + tool call + result"] = Conversation(
            [ASK, {**CALL, "reasoning_content": REASONING}, RESULT], TOOLS, think=True, kind="thinking")
    return cases


def plain_rendering_failures(info: modelfile.TokenizerInfo) -> list[str]:
    """Why the checkpoint's own template renders none of the plain conversations ('label: error' each), or
    [] when it renders one (or has no template: there is nothing to render)."""
    failures = []
    for label, messages in CONVERSATIONS.items() if info.chat_template else ():
        try:
            chat_jinja.render(info.chat_template, messages, bos_token=info.bos_token,
                              eos_token=(info.eos_tokens or ("",))[0])
            return []
        except jinja2.TemplateError as exc:
            failures.append(f"{label}: {exc}")
    return failures


def for_ollama(message: dict[str, Any]) -> dict[str, Any]:
    """A message as Ollama's API takes it: tool calls without their type, thinking as "thinking" (transformers'
    reasoning_content)."""
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    if "reasoning_content" in message:
        out["thinking"] = message["reasoning_content"]
    if "tool_calls" in message:
        out["tool_calls"] = [{k: v for k, v in call.items() if k != "type"} for call in message["tool_calls"]]
    return out


def warn_instead(mode: str, smoke: Callable[[], str]) -> str:
    """Run a smoke test; with mode warn, its failure becomes a warning and the account says it failed."""
    try:
        return smoke()
    except SmokeTestFailed as exc:
        if mode != "warn":
            raise
        github.warning(f"{exc.message} (smoke-test: warn, so the run goes on)")
        return "smoke test failed (see the warning)"


def smoke_test(client: OllamaClient, model: str, prompt: str, parameters: tuple[tuple[str, Any], ...],
               tools: bool) -> str:
    """The model must load, answer something, and stop by itself. Returns the answer: its text, or the tool
    calls it made. A model that offers tools is asked as a client with tools asks (the parity check's
    two): Ollama's built-in parsers return a call as tool_calls then, and drop it from a request without."""
    options: dict[str, Any] = dict(GREEDY)
    if not any(name == "num_predict" for name, _ in parameters):
        options["num_predict"] = SMOKE_MAX_TOKENS
    reply = client.chat(model, [{"role": "user", "content": prompt}], options, tools=TOOLS if tools else None)
    message = reply.get("message", {})
    answer = message.get("content", "").strip() or describe_tool_calls(message.get("tool_calls", []))
    reason = reply.get("done_reason", "")
    github.log(f"{model}: {answer!r} (done_reason: {reason})")
    if not answer:
        raise SmokeTestFailed(f"Smoke test failed: {model} gave an empty answer to {prompt!r}. Check the template and "
                              "parameters inputs.")
    if reason != "stop":
        raise SmokeTestFailed(
            f"Smoke test failed: {model} did not stop by itself (done_reason '{reason}' after "
            f"{reply.get('eval_count')} tokens). Its answer began: {answer[:200]!r}. A model that does not stop "
            "usually has the wrong template or stop tokens, or a num_predict parameter that is too small.")
    return answer.strip()


# A sentence, the same with one word changed, and an unrelated one: any embedding model, even an untrained
# one (through shared tokens), puts the first two closer together.
EMBEDDING_PROBE = ("The cat sits on the mat.", "The dog sits on the mat.", "Quarterly revenue rose by four percent.")


def describe_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Tool calls as a reader writes them: 'tool call get_weather({"city": "Paris"})'."""
    functions = [call.get("function", {}) for call in calls]
    return "; ".join(f"tool call {f.get('name', '?')}({json.dumps(f.get('arguments', {}), ensure_ascii=False)})"
                     for f in functions)


def embedding_smoke_test(client: OllamaClient, model: str, dimensions: int) -> str:
    """The model must load and embed: one vector of `dimensions` per input, similar sentences closer
    than unrelated ones. Returns a one-line account for the summary."""
    vectors = client.embed(model, list(EMBEDDING_PROBE))
    if len(vectors) != len(EMBEDDING_PROBE) or any(len(v) != dimensions for v in vectors):
        raise SmokeTestFailed(f"Smoke test failed: {model} returned {len(vectors)} embeddings of sizes "
                              f"{sorted({len(v) for v in vectors})} for {len(EMBEDDING_PROBE)} inputs; expected "
                              f"{dimensions} dimensions each.")
    similar, unrelated = _cosine(vectors[0], vectors[1]), _cosine(vectors[0], vectors[2])
    account = f"{dimensions} dimensions; similar sentences {similar:.3f} > unrelated {unrelated:.3f}"
    github.log(f"{model}: {account.replace(' > ', ' vs ')}")
    if not similar > unrelated:
        raise SmokeTestFailed(f"Smoke test failed: {model} puts {EMBEDDING_PROBE[0]!r} closer to the unrelated "
                              f"{EMBEDDING_PROBE[2]!r} ({unrelated:.3f}) than to {EMBEDDING_PROBE[1]!r} "
                              f"({similar:.3f}). The pooling or the weights are wrong.")
    return account


def vision_smoke_test(client: OllamaClient, model: str) -> str:
    """An image must reach the model: the same question with an image costs more prompt tokens (a model
    without a working projector accepts images and silently drops them). Returns a one-line account."""
    question = [{"role": "user", "content": "What is in this image?"}]
    options = {**GREEDY, "num_predict": 1}
    without = client.chat(model, question, options).get("prompt_eval_count", 0)
    with_image = client.chat(model, [{**question[0], "images": [base64.b64encode(probe_image()).decode()]}],
                             options).get("prompt_eval_count", 0)
    account = f"an image adds {with_image - without} prompt tokens"
    github.log(f"{model}: {account} ({without} without it)")
    if with_image <= without:
        raise SmokeTestFailed(f"Smoke test failed: {model} ignores images ({with_image} prompt tokens with one, "
                              f"{without} without). Its projector did not load.")
    return account


def probe_image(size: int = 32) -> bytes:
    """A small RGB gradient as PNG (no imaging library needed)."""
    rows = b"".join(b"\x00" + bytes(v for x in range(size) for v in (x * 8 % 256, y * 8 % 256, 128))
                    for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


# How Ollama 0.34 renders a model's prompts, named as its own "template selection" log line names them
# (server/images.go, selectedTemplateSource). The Go TEMPLATE is used unless the GGUF's own Jinja
# chat_template advertises more (tools, thinking): then, with OLLAMA_GO_TEMPLATE unset, llama-server
# renders the Jinja instead. A RENDERER beats both: Ollama assigns one to a few architectures on create,
# and the action to the families of templates/chat/renderers.toml.
# A model with a PARSER is always rendered with its TEMPLATE, whatever the GGUF's Jinja offers: the
# passthrough parser (the answer as it is) pins the TEMPLATE.
GO_TEMPLATE = "go_template"
CHAT_TEMPLATE = "gguf_chat_template"
RENDERER = "renderer"
PINNED = "parser"
PIN_PARSER = "passthrough"


def selected_rendering(show: dict[str, Any], go_template: str) -> str:
    """Which of the renderings above Ollama uses for a model by default, from its /api/show: `template` is
    the Jinja when llama-server renders it, else the Go template as sent; RENDERER and PARSER lines."""
    commands = {line.split(" ", 1)[0] for line in str(show.get("modelfile", "")).splitlines()}
    if "RENDERER" in commands:
        return RENDERER
    if "PARSER" in commands:
        return PINNED
    return GO_TEMPLATE if go_template and show.get("template") == go_template else CHAT_TEMPLATE


def describe_rendering(rendering: str, has_template: bool) -> str:
    """A selected_rendering value in words, with why Ollama chose it, for the log and the summary; has_template:
    the Modelfile has a TEMPLATE."""
    return {
        GO_TEMPLATE: "the Modelfile's TEMPLATE (go_template)",
        CHAT_TEMPLATE: "the checkpoint's own Jinja chat template, by llama-server (gguf_chat_template): " + (
            "it supports more (tools, thinking) than the TEMPLATE; Ollama with OLLAMA_GO_TEMPLATE=1 renders the "
            "TEMPLATE instead" if has_template else "the Modelfile has no TEMPLATE, as none can write its prompts"),
        RENDERER: "Ollama's built-in renderer and parser for the family (renderer): Go code in Ollama that writes "
                  "its prompts, tools and thinking, and reads its tool calls and reasoning",
        PINNED: f"the Modelfile's TEMPLATE, pinned by PARSER {PIN_PARSER} (parser): the checkpoint's Jinja chat "
                "template, which Ollama would prefer, builds other prompts in llama-server than the checkpoint",
    }[rendering]


def renderings_to_check(default: str, go_template: str) -> list[str]:
    """The default rendering, and the Go TEMPLATE too when the Jinja is the default: users who set
    OLLAMA_GO_TEMPLATE=1 get that one."""
    return [default, GO_TEMPLATE] if default == CHAT_TEMPLATE and go_template else [default]


@dataclasses.dataclass(frozen=True)
class ParityFailure:
    conversation: str
    rendering: str
    expected: str  # the checkpoint's own rendering
    actual: str  # Ollama's prompt (or why Ollama could not build it)
    # The prompt is the checkpoint's rendering of the conversation without its assistant turns' thinking:
    # Ollama 0.34 passes none to llama-server (llm/llama_server.go, llamaServerChatMessage), so no model
    # rendered by the GGUF's Jinja can get it, whatever the action publishes.
    reasoning_dropped: bool = False


def compared_capabilities(caps: chat_jinja.Capabilities, offered: set[str]) -> chat_jinja.Capabilities:
    """What to compare on a rendering that offers `offered`: the tools and thinking conversations of what
    it offers, as detailed as the checkpoint's template allows. A rendering offering what the checkpoint's
    template lacks is compared on all of it: those requests must still build the checkpoint's prompts (a
    think: false the template ignores, say). What it lacks is capability_failures' to report."""
    tools, thinking = "tools" in offered, "thinking" in offered
    return chat_jinja.Capabilities(
        tools=tools, tool_round_trip=tools and (caps.tool_round_trip or not caps.tools),
        thinking=thinking, thinking_switch=thinking and (caps.thinking_switch or not caps.thinking))


def prompt_parity(client: OllamaClient, model: str, create_body: dict[str, Any], info: modelfile.TokenizerInfo,
                  adds_bos: bool, renderings: list[str], caps: chat_jinja.Capabilities | None = None,
                  leading_bos: str = "", show: dict[str, Any] | None = None) -> tuple[list[ParityFailure], int]:
    """For each conversation and each of `renderings` (renderings_to_check's: the model's own first), the
    prompt Ollama builds for a chat request must be the checkpoint's own Jinja rendering, character for
    character (so token for token). The conversations: the plain ones, and with `caps` (the checkpoint's
    template's) those of compared_capabilities for each rendering. Returns the conversations that differ,
    and how many were compared (a conversation the checkpoint's own template cannot render is skipped).

    Ollama's chat endpoint returns the prompt a request renders to, without running the model, when
    asked with _debug_render_only; on the Jinja rendering it is llama-server's. The model itself is
    asked for its own rendering; a probe created like it but forced to the Go TEMPLATE for that one.
    A request without `think`, as most clients send, makes a model Ollama deems able to think think
    (think: true, passed to the Jinja as enable_thinking), so the Jinja rendering compared gets the same.
    leading_bos: the BOS text a RENDERER writes first, which Ollama takes off the prompt when the GGUF's
    tokenizer adds BOS itself (so it is taken off here too). show: the model's /api/show, when the caller has it.
    """
    probe = f"{model.rpartition(':')[0]}:parity-probe"
    forced = GO_TEMPLATE in renderings[1:]
    if forced:
        client.create({**create_body, "parser": PIN_PARSER, "model": probe}, quiet=True)
    failures, compared = [], 0
    try:
        targets = {rendering: probe if forced and rendering == GO_TEMPLATE else model for rendering in renderings}
        shown = {target: show if target == model and show is not None else client.show(target)
                 for target in set(targets.values())}
        offered = {rendering: set(shown[target].get("capabilities", [])) for rendering, target in targets.items()}
        thinks = {rendering: "thinking" in offered[rendering] for rendering in targets}
        cases = {rendering: conversations(compared_capabilities(caps, offered[rendering]) if caps else
                                          chat_jinja.NO_CAPABILITIES) for rendering in targets}
        labels = dict.fromkeys(label for by_label in cases.values() for label in by_label)
        for label in labels:
            for rendering, target in targets.items():
                if label not in cases[rendering]:
                    continue
                case = cases[rendering][label]
                try:
                    expected = _reference(info, case, thinks[rendering], adds_bos)
                except jinja2.TemplateError as exc:
                    if case.kind == "plain":
                        github.warning(f"prompt parity: the checkpoint's template cannot render '{label}' ({exc}); "
                                       "skipped")
                    else:  # a request with what the checkpoint's template lacks: nothing to compare with
                        github.log(f"  {label}: the checkpoint's template cannot render it ({exc}); skipped")
                    break
                compared += 1
                try:
                    actual = client.render_chat(target, [for_ollama(m) for m in case.messages], case.tools,
                                                case.think)
                except OllamaRefused as exc:  # the chat template itself fails in Ollama's renderer
                    failures.append(ParityFailure(label, rendering, expected, f"(Ollama could not build it: {exc})"))
                    github.log(f"  {label} [{rendering}]: FAILED TO RENDER")
                    continue
                if rendering == RENDERER and adds_bos and leading_bos:
                    actual = actual.removeprefix(leading_bos)
                if actual == expected:
                    github.log(f"  {label} [{rendering}]: same prompt ({len(actual)} characters)")
                elif rendering == CHAT_TEMPLATE and actual == _without_reasoning(info, case, thinks[rendering],
                                                                                 adds_bos):
                    failures.append(ParityFailure(label, rendering, expected, actual, reasoning_dropped=True))
                    github.log(f"  {label} [{rendering}]: the checkpoint's prompt without the reasoning of its "
                               "assistant turns, which Ollama does not pass to llama-server")
                else:
                    failures.append(ParityFailure(label, rendering, expected, actual))
                    github.log(f"  {label} [{rendering}]: DIFFERENT")
    finally:
        if forced:
            client.delete(probe)
    return failures, compared


def _reference(info: modelfile.TokenizerInfo, case: Conversation, thinks: bool, adds_bos: bool) -> str:
    """The checkpoint's own rendering of `case`, as the prompt should reach the model."""
    variables: dict[str, Any] = {}
    if case.tools is not None:
        variables["tools"] = case.tools
    if case.think is not None or thinks:
        variables["enable_thinking"] = case.think if case.think is not None else True
    expected = chat_jinja.render(info.chat_template, case.messages, bos_token=info.bos_token,
                                 eos_token=(info.eos_tokens or ("",))[0], variables=variables)
    # When the GGUF's tokenizer prepends BOS, the prompt must not hold it (llama-server leaves it out of
    # its Jinja rendering too). A TEMPLATE that writes BOS itself then differs: the model would see BOS twice.
    if adds_bos and info.bos_token and expected.startswith(info.bos_token):
        expected = expected[len(info.bos_token):]
    return expected


def _without_reasoning(info: modelfile.TokenizerInfo, case: Conversation, thinks: bool, adds_bos: bool) -> str | None:
    """The checkpoint's rendering of `case` with its assistant turns' thinking left out, None when it has none
    (or the template cannot render it)."""
    if not any("reasoning_content" in message for message in case.messages):
        return None
    messages = [{k: v for k, v in message.items() if k != "reasoning_content"} for message in case.messages]
    try:
        return _reference(info, dataclasses.replace(case, messages=messages), thinks, adds_bos)
    except jinja2.TemplateError:
        return None


def only_reasoning_dropped(failures: list[ParityFailure]) -> bool:
    """Whether every failure is Ollama's dropping of the conversation's reasoning (ParityFailure explains)."""
    return bool(failures) and all(f.reasoning_dropped for f in failures)


def pins_template(failures: list[ParityFailure], renderings: list[str]) -> bool:
    """Whether to pin the TEMPLATE: only the GGUF's Jinja, which Ollama prefers, built other prompts (not only
    for the reasoning Ollama does not pass it), and the TEMPLATE (also checked) built the checkpoint's."""
    return (not only_reasoning_dropped(failures) and bool(failures) and GO_TEMPLATE in renderings[1:]
            and all(f.rendering == CHAT_TEMPLATE for f in failures))


def offered_capabilities(show: dict[str, Any]) -> tuple[str, ...]:
    """The tools and thinking a model offers, from its /api/show."""
    return tuple(name for name in ("tools", "thinking") if name in show.get("capabilities", []))


def describe_capabilities(names: tuple[str, ...]) -> str:
    return ", ".join(names) or "no tools, no thinking"


def capability_failures(caps: chat_jinja.Capabilities, show: dict[str, Any]) -> list[ParityFailure]:
    """A model must offer the checkpoint's tools: without them, clients are refused the tool calls the model
    was trained for. (What it offers beyond them prompt_parity compares like the rest; thinking it does not
    offer is missing_thinking's.)"""
    offered = offered_capabilities(show)
    if not caps.tools or "tools" in offered:
        return []
    return [ParityFailure("capabilities", "api/show",
                          f"the checkpoint's template supports: {describe_capabilities(caps.names())}",
                          f"the model offers: {describe_capabilities(offered)}")]


def missing_thinking(caps: chat_jinja.Capabilities, show: dict[str, Any]) -> bool:
    """The checkpoint thinks and the model does not offer thinking: Ollama then leaves the reasoning in the
    answer (Ollama 0.34 splits it off only between tags it knows, <think> among them). The prompts are
    proven all the same, so the action warns instead of refusing."""
    return caps.thinking and "thinking" not in offered_capabilities(show)


def explain(failures: list[ParityFailure]) -> str:
    parts = []
    for failure in failures:
        parts.append(f"--- {failure.conversation}: the checkpoint's template renders\n{failure.expected}\n"
                     f"--- Ollama builds [{failure.rendering}]\n{failure.actual}")
        if failure.reasoning_dropped:
            parts.append("(The checkpoint's prompt without the reasoning: Ollama passes no assistant turn's thinking "
                         "to llama-server, so its rendering of the Jinja never writes it back as the checkpoint's "
                         "template does.)")
    return "\n".join(parts)
