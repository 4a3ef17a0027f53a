"""Render a checkpoint's own Jinja chat template the way transformers does, sealed off.

The template comes from the repository, so it is untrusted. It is compiled and rendered in a worker
process of its own, behind sealed.py (no network, nothing of the action's environment, no code from
outside the Python installation), in jinja2's immutable sandbox, and within limits the kernel keeps: CPU
seconds per rendering (RENDER_CPU_S, compiling included: Jinja folds constant expressions while
compiling), memory (RENDER_MEMORY_BYTES), and RENDER_MAX_CHARS of output. A template past one is refused by
name (LimitExceeded); one that cannot render a conversation raises jinja2.TemplateError, as in-process.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import resource
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import IO, Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from . import process
from .errors import LimitExceeded, RepoRefused


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


RENDER_CPU_S = 5  # CPU seconds for one rendering, compiling included; real templates take milliseconds
RENDER_WALL_S = 60  # the same in wall time, on a busy machine: a worker that neither answers nor uses CPU
RENDER_MEMORY_BYTES = 512 * 2**20  # the worker, Python and jinja2 included (they take about 30 MB)
RENDER_MAX_CHARS = 1_000_000
_FIX = "Set the template input to a catalog template or a Go template file."


class _TooLong(Exception):
    pass


@functools.lru_cache(maxsize=64)
def _compiled(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _render_here(template: str, messages: list[dict[str, Any]], bos_token: str, eos_token: str,
                 add_generation_prompt: bool, today: str, variables: dict[str, Any]) -> str:
    """The worker's rendering (in the worker process only)."""
    now = datetime.datetime.fromisoformat(today)
    context = {**variables, "messages": messages, "bos_token": bos_token, "eos_token": eos_token,
               "add_generation_prompt": add_generation_prompt, "strftime_now": lambda fmt: now.strftime(fmt)}
    pieces, size = [], 0
    try:
        for piece in _compiled(template).generate(**context):
            pieces.append(piece)
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                raise _TooLong
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError) as exc:
        # Python's own errors inside an untrusted template (tojson of a generator, say): it cannot render this.
        raise jinja2.TemplateError(f"{type(exc).__name__}: {exc}") from exc
    return "".join(pieces)


def serve_renderings() -> None:
    """The worker: one JSON request per line on stdin, one JSON answer per line on stdout, until stdin ends.
    Each rendering gets RENDER_CPU_S more CPU seconds than the worker has used: past them the kernel ends
    it (SIGXCPU), even inside C code that never returns to Python."""
    for line in sys.stdin:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(usage.ru_utime + usage.ru_stime) + RENDER_CPU_S, hard))
        try:
            answer: dict[str, Any] = {"text": _render_here(**json.loads(line))}
        except jinja2.TemplateError as exc:
            answer = {"template_error": str(exc)}
        except _TooLong:
            answer = {"too_long": True}
        except MemoryError:  # past RENDER_MEMORY_BYTES (the kernel refused the allocation)
            _compiled.cache_clear()
            answer = {"memory": True}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class _Worker:
    """The action's side: starts the sealed worker on first use, and again after it was stopped."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.errors: IO[bytes] | None = None  # the worker's stderr: an unlinked file, read if it fails

    def render(self, request: dict[str, Any], conversation: str) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], RENDER_WALL_S)
            line = self.proc.stdout.readline() if ready else b""
        except BrokenPipeError:
            line = b""
        if line:
            return json.loads(line)
        self.stop()
        assert self.proc is not None and self.errors is not None
        code = self.proc.returncode
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            raise LimitExceeded(f"The checkpoint's chat template used more than {RENDER_CPU_S} CPU seconds on "
                                f"{conversation} (compiling it included; real ones take milliseconds). {_FIX}",
                                resource="cpu", limit=RENDER_CPU_S, input_name="template",
                                title="Chat template refused")
        if code is not None and code < 0:
            raise RepoRefused(f"The checkpoint's chat template crashed its sealed renderer (signal {-code}) on "
                              f"{conversation}. {_FIX}", input_name="template", title="Chat template refused")
        if not ready:
            raise LimitExceeded(f"The checkpoint's chat template did not render {conversation} within "
                                f"{RENDER_WALL_S} s. {_FIX}", resource="time", limit=RENDER_WALL_S,
                                input_name="template", title="Chat template refused")
        if code == process.SEALED_STOPPED:  # a MemoryError outside a rendering, as sealed.py reports it
            raise LimitExceeded(f"The checkpoint's chat template asked for more than {RENDER_MEMORY_BYTES // 2**20} "
                                f"MiB of memory on {conversation}. {_FIX}", resource="memory",
                                limit=RENDER_MEMORY_BYTES, input_name="template", title="Chat template refused")
        self.errors.seek(0)
        raise RuntimeError(f"the sealed template renderer exited with code {code}: "
                           f"{self.errors.read()[-2000:].decode(errors='replace')}")

    def _start(self) -> None:
        command = process.sealed_command(["entrypoint.chat_jinja"], how="python-module", report=None,
                                         memory_bytes=RENDER_MEMORY_BYTES, code_roots=[process.APP_ROOT])
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     env=process.sealed_environment(process.NOWHERE))

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.proc.stdin.close()
            process.stop(self.proc, timeout=5)


_worker = _Worker()
atexit.register(_worker.stop)


def render(template: str, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True, today: datetime.datetime | None = None,
           variables: Mapping[str, Any] | None = None) -> str:
    """The prompt text `template` makes of `messages` (`today` fixes strftime_now's date; `variables` are
    further ones, as transformers' apply_chat_template passes its keyword arguments: tools, enable_thinking).
    Raises jinja2.TemplateError if it cannot, LimitExceeded past a limit (RepoRefused if it crashes its
    worker)."""
    conversation = f"a conversation of {len(messages)} short messages"
    answer = _worker.render({"template": template, "messages": messages, "bos_token": bos_token,
                             "eos_token": eos_token, "add_generation_prompt": add_generation_prompt,
                             "today": (today or datetime.datetime.now()).isoformat(),
                             "variables": dict(variables or {})}, conversation)
    if "template_error" in answer:
        raise jinja2.TemplateError(answer["template_error"])
    if answer.get("too_long"):
        raise LimitExceeded(f"The checkpoint's chat template writes more than {RENDER_MAX_CHARS:,} characters for "
                            f"{conversation}. {_FIX}", resource="output", limit=RENDER_MAX_CHARS,
                            input_name="template", title="Chat template refused")
    if answer.get("memory"):
        raise LimitExceeded(f"The checkpoint's chat template asked for more than {RENDER_MEMORY_BYTES // 2**20} MiB "
                            f"of memory on {conversation}. {_FIX}", resource="memory", limit=RENDER_MEMORY_BYTES,
                            input_name="template", title="Chat template refused")
    return answer["text"]


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


if __name__ == "__main__":
    serve_renderings()
