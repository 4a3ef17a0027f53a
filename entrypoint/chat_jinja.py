"""Render a checkpoint's own Jinja chat template the way transformers does, in a sandbox.

The template comes from the repository, so it is untrusted: it runs in jinja2's immutable sandbox, can
only see the messages and special tokens given to it, and has a budget: a rendering that takes longer
than RENDER_BUDGET_S or writes more than RENDER_MAX_CHARS (a loop, say) refuses the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from .errors import RepoRefused


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' training marker) renders its body as is."""
    tags = {"generation"}  # noqa: RUF012 (jinja2 declares Extension.tags a set)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


RENDER_BUDGET_S = 5.0  # real templates render a conversation in milliseconds
RENDER_MAX_CHARS = 1_000_000


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (SIGALRM: the pipeline renders in the main thread; elsewhere,
    where signals cannot be handled, the block runs without a budget)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render(template: str, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True, today: datetime.datetime | None = None,
           variables: Mapping[str, Any] | None = None) -> str:
    """The prompt text `template` makes of `messages` (`today` fixes strftime_now's date; `variables` are
    further ones, as transformers' apply_chat_template passes its keyword arguments: tools, enable_thinking).
    Raises jinja2.TemplateError if it cannot, RepoRefused past the budget."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: (today or datetime.datetime.now()).strftime(fmt)
    context = {**(variables or {}), "messages": messages, "bos_token": bos_token, "eos_token": eos_token,
               "add_generation_prompt": add_generation_prompt}
    pieces, size = [], 0
    try:
        with _time_budget(RENDER_BUDGET_S):
            for piece in env.from_string(template).generate(**context):
                pieces.append(piece)
                size += len(piece)
                if size > RENDER_MAX_CHARS:
                    raise RepoRefused(f"The checkpoint's chat template writes more than {RENDER_MAX_CHARS:,} "
                                      f"characters for a conversation of {len(messages)} short messages. Set the "
                                      "template input to a catalog template or a Go template file.",
                                      input_name="template", title="Chat template refused")
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        # Python's own errors inside an untrusted template (tojson of a generator, say): it cannot render this.
        raise jinja2.TemplateError(f"{type(exc).__name__}: {exc}") from exc
    except _OutOfTime:
        raise RepoRefused(f"The checkpoint's chat template did not render a conversation of {len(messages)} short "
                          f"messages within {RENDER_BUDGET_S:.0f} s (real ones take milliseconds: a loop?). Set the "
                          "template input to a catalog template or a Go template file.", input_name="template",
                          title="Chat template refused") from None
    return "".join(pieces)


class CannotDerive(Exception):
    """The template's text cannot be described by fixed per-transition strings."""


# Marker contents: plain words, so templates that trim or escape content leave them intact.
_SYSTEM, _USER1, _ASSISTANT1, _USER2, _ASSISTANT2, _USER3 = (
    "SYSTEMMARKERA", "USERMARKERB", "ASSISTANTMARKERC", "USERMARKERD", "ASSISTANTMARKERE", "USERMARKERF")


@dataclasses.dataclass(frozen=True)
class Derived:
    go_template: str
    default_system: str  # what the template inserts when a conversation has no system message
    supports_system: bool  # False: the template refuses system messages or silently drops them
    end_of_turn: tuple[str, ...]  # special tokens that close an assistant turn
    begin_of_turn: tuple[str, ...]  # special tokens that open a turn (never stop tokens)


def _split(text: str, markers: list[str]) -> list[str]:
    """The literal pieces around `markers`, which must appear once each and in order."""
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise CannotDerive(f"message content '{marker}' is rendered {rest.count(marker)} times")
        before, _, rest = rest.partition(marker)
        pieces.append(before)
    return pieces + [rest]


_TODAY = "\x00today\x00"  # stands for the current date inside derived pieces
_DATES = (datetime.datetime(2025, 1, 15), datetime.datetime(2026, 7, 4))


def _literal(text: str) -> str:
    """Go template text for a piece: literal unless it holds delimiters (then a quoted string), with
    the date placeholder as Ollama's {{ currentDate }} (YYYY-MM-DD)."""
    parts = []
    for i, chunk in enumerate(text.split(_TODAY)):
        if i:
            parts.append("{{ currentDate }}")
        parts.append("{{ " + json.dumps(chunk) + " }}" if "{{" in chunk or "}}" in chunk else chunk)
    return "".join(parts)


def _dated_pieces(run, messages, markers: list[str]) -> list[str]:
    """Split the rendering at `markers` on two dates; a piece that differs only by an ISO date gets the
    date placeholder, any other difference cannot be expressed in a fixed template."""
    first, second = (_split(run(messages, today), markers) for today in _DATES)
    if len(first) != len(second):
        raise CannotDerive("the template renders a different conversation structure on different dates")
    pieces = []
    for a, b in zip(first, second, strict=True):
        a_ = a.replace(_DATES[0].strftime("%Y-%m-%d"), _TODAY)
        b_ = b.replace(_DATES[1].strftime("%Y-%m-%d"), _TODAY)
        if a_ != b_:
            raise CannotDerive("the template writes today's date in a format other than YYYY-MM-DD, which Ollama "
                               "templates cannot produce")
        pieces.append(a_)
    return pieces


def derive(template: str, *, bos_token: str, eos_token: str, special_tokens: tuple[str, ...],
           bos_added: bool = False) -> Derived:
    """Read a Go template off a Jinja chat template by rendering marker conversations.

    Every piece of text between two messages must depend only on the roles on either side; the
    pieces are checked for that across three conversations (and the parity check proves the result).
    With bos_added (the GGUF's tokenizer prepends BOS itself), a BOS the template writes first is
    left out, or the model would see it twice.
    """
    def run(messages, today):
        return render(template, [{"role": r, "content": c} for r, c in messages], bos_token=bos_token,
                      eos_token=eos_token, today=today)

    try:
        no_system = _dated_pieces(run, [("user", _USER1), ("assistant", _ASSISTANT1), ("user", _USER2)],
                                  [_USER1, _ASSISTANT1, _USER2])
        longer = _dated_pieces(run, [("user", _USER1), ("assistant", _ASSISTANT1), ("user", _USER2),
                                     ("assistant", _ASSISTANT2), ("user", _USER3)],
                               [_USER1, _ASSISTANT1, _USER2, _ASSISTANT2, _USER3])
    except jinja2.TemplateError as exc:
        raise CannotDerive(f"the template fails on a plain conversation: {exc}") from exc
    start_user, user_to_assistant, assistant_to_user, user_end = no_system
    if longer != [start_user, user_to_assistant, assistant_to_user, user_to_assistant, assistant_to_user, user_end]:
        raise CannotDerive("the text between turns depends on their position in the conversation")
    with_system_messages = [("system", _SYSTEM), ("user", _USER1), ("assistant", _ASSISTANT1), ("user", _USER2)]
    try:
        if _SYSTEM not in run(with_system_messages, _DATES[0]):
            raise jinja2.TemplateError("the template drops system messages")
        start_system, system_to_user, *with_system = _dated_pieces(
            run, with_system_messages, [_SYSTEM, _USER1, _ASSISTANT1, _USER2])
        if with_system != [user_to_assistant, assistant_to_user, user_end]:
            raise CannotDerive("a system message changes how the other turns are rendered")
    except jinja2.TemplateError:  # the template refuses system messages, or drops them: so are Ollama's
        start_system, system_to_user = None, ""

    if bos_added and bos_token:
        start_user = start_user.removeprefix(bos_token)
        start_system = start_system.removeprefix(bos_token) if start_system is not None else None

    default_system = ""
    if start_system is not None and start_user != start_system + system_to_user:
        head, tail = start_system, system_to_user
        if start_user.startswith(head) and start_user.endswith(tail) and len(start_user) > len(head) + len(tail):
            default_system = start_user[len(head):len(start_user) - len(tail)]
        if _TODAY in default_system:  # a dated default stays in the template, where currentDate works
            default_system = ""

    if start_system is None:  # system messages are skipped, as the template cannot render them
        first, system_case = _literal(start_user), ""
    else:
        first = ('{{ if eq $m.Role "system" }}' + _literal(start_system) + "{{ else }}" + _literal(start_user)
                 + "{{ end }}")
        system_case = '{{ else if eq $prev "system" }}' + _literal(system_to_user)
    body = ('{{ if eq $prev "" }}' + first + system_case + '{{ else if eq $m.Role "assistant" }}'
            + _literal(user_to_assistant) + "{{ else }}" + _literal(assistant_to_user) + "{{ end }}"
            + "{{ $m.Content }}{{ $prev = $m.Role }}")
    if start_system is None:
        body = '{{ if ne $m.Role "system" }}' + body + "{{ end }}"
    go_template = ('{{ $prev := "" }}{{ range $m := .Messages }}' + body + "{{ end }}"
                   '{{ if ne $prev "assistant" }}' + _literal(user_end) + "{{ end }}")

    by_length = sorted(special_tokens, key=len, reverse=True)
    closing = assistant_to_user.lstrip()
    end_of_turn: tuple[str, ...] = ()
    for token in by_length:
        if closing.startswith(token):
            end_of_turn = (token,)
            break
    opening_text = start_user + user_to_assistant + closing[len(end_of_turn[0]) if end_of_turn else 0:]
    begin_of_turn = tuple(t for t in special_tokens if t in opening_text and t not in end_of_turn)
    return Derived(go_template=go_template, default_system=default_system, supports_system=start_system is not None,
                   end_of_turn=end_of_turn, begin_of_turn=begin_of_turn)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a chat template writes, found by rendering marker conversations (never by searching its text)."""
    tools: bool  # the tool definitions of a request with `tools`
    tool_round_trip: bool  # an assistant turn's tool calls and the tool results after it
    thinking: bool  # a thinking block: earlier turns' reasoning_content, a <think> it opens, or a switch
    thinking_switch: bool  # enable_thinking changes the prompt

    def names(self) -> tuple[str, ...]:
        """As Ollama's /api/show lists them."""
        return tuple(name for name, present in (("tools", self.tools), ("thinking", self.thinking)) if present)


NO_CAPABILITIES = Capabilities(tools=False, tool_round_trip=False, thinking=False, thinking_switch=False)

_TOOL_NAME, _CALL_NAME, _RESULT, _REASONING = "TOOLMARKERG", "CALLMARKERH", "RESULTMARKERI", "REASONINGMARKERJ"


def _marker_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "A marker tool", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "A city"}}, "required": ["city"]}}}


def capabilities(template: str, *, bos_token: str, eos_token: str) -> Capabilities:
    """Which of tools and thinking `template` supports: each is rendered in a marker conversation and must
    show up in the prompt (a template that fails on one lacks it)."""
    def shows(marker: str, messages: list[dict[str, Any]], **variables: Any) -> bool:
        try:
            return marker in render(template, messages, bos_token=bos_token, eos_token=eos_token,
                                    add_generation_prompt=variables.pop("add_generation_prompt", True),
                                    today=_DATES[0], variables=variables)
        except jinja2.TemplateError:
            return False

    user = {"role": "user", "content": _USER1}
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function", "function": {
        "name": _CALL_NAME, "arguments": {"city": "Paris"}}}]}
    result = {"role": "tool", "content": _RESULT, "tool_call_id": "call00001"}
    tools = [_marker_tool(_TOOL_NAME), _marker_tool(_CALL_NAME)]
    with_tools = shows(_TOOL_NAME, [user], tools=tools)
    round_trip = shows(_CALL_NAME, [user, call, result], tools=[_marker_tool(_TOOL_NAME)]) and \
        shows(_RESULT, [user, call, result], tools=[_marker_tool(_TOOL_NAME)])
    answer = {"role": "assistant", "content": _ASSISTANT1, "reasoning_content": _REASONING}
    reasoning = shows(_REASONING, [user, answer], add_generation_prompt=False)
    try:
        on, off, opened = (render(template, [user], bos_token=bos_token, eos_token=eos_token, today=_DATES[0],
                                  variables=v) for v in ({"enable_thinking": True}, {"enable_thinking": False}, None))
        switch, opens = on != off, "<think>" in opened.rpartition(_USER1)[2]
    except jinja2.TemplateError:
        switch = opens = False
    return Capabilities(tools=with_tools, tool_round_trip=with_tools and round_trip,
                        thinking=reasoning or switch or opens, thinking_switch=switch)
