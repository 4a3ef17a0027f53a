"""Prove a created model works before it is pushed: it answers and stops (smoke test), and Ollama
builds the same prompt, token for token, as the checkpoint's own chat template (prompt parity)."""

from __future__ import annotations

import base64
import dataclasses
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import jinja2

from . import chat_jinja, github, modelfile
from .errors import PublishError
from .ollama import OllamaClient

SMOKE_MAX_TOKENS = 256
# Deterministic decoding for every check; one token is enough to make Ollama tokenize the prompt.
GREEDY = {"temperature": 0, "seed": 0}

SYSTEM = "You are a terse assistant."
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user": [{"role": "user", "content": "Name a prime number."}],
    "system + user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a prime number."}],
    "multi-turn": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
                   {"role": "user", "content": "And an even one?"}],
    "system + multi-turn": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a prime number."},
                            {"role": "assistant", "content": "7"}, {"role": "user", "content": "And an even one?"}],
}


def smoke_test(client: OllamaClient, model: str, prompt: str, parameters: tuple[tuple[str, Any], ...]) -> str:
    """The model must load, answer something, and stop by itself. Returns the answer."""
    options: dict[str, Any] = dict(GREEDY)
    if not any(name == "num_predict" for name, _ in parameters):
        options["num_predict"] = SMOKE_MAX_TOKENS
    reply = client.chat(model, [{"role": "user", "content": prompt}], options)
    answer = reply.get("message", {}).get("content", "")
    reason = reply.get("done_reason", "")
    github.log(f"{model}: {answer.strip()!r} (done_reason: {reason})")
    if not answer.strip():
        raise PublishError(f"Smoke test failed: {model} gave an empty answer to {prompt!r}. Check the template and "
                           "parameters inputs.", title="Smoke test failed")
    if reason != "stop":
        raise PublishError(
            f"Smoke test failed: {model} did not stop by itself (done_reason '{reason}' after "
            f"{reply.get('eval_count')} tokens). Its answer began: {answer[:200]!r}. A model that does not stop "
            "usually has the wrong template or stop tokens, or a num_predict parameter that is too small.",
            title="Smoke test failed")
    return answer.strip()


# A sentence, the same with one word changed, and an unrelated one: any embedding model, even an untrained
# one (through shared tokens), puts the first two closer together.
EMBEDDING_PROBE = ("The cat sits on the mat.", "The dog sits on the mat.", "Quarterly revenue rose by four percent.")


def embedding_smoke_test(client: OllamaClient, model: str, dimensions: int) -> str:
    """The model must load and embed: one vector of `dimensions` per input, similar sentences closer
    than unrelated ones. Returns a one-line account for the summary."""
    vectors = client.embed(model, list(EMBEDDING_PROBE))
    if len(vectors) != len(EMBEDDING_PROBE) or any(len(v) != dimensions for v in vectors):
        raise PublishError(f"Smoke test failed: {model} returned {len(vectors)} embeddings of sizes "
                           f"{sorted({len(v) for v in vectors})} for {len(EMBEDDING_PROBE)} inputs; expected "
                           f"{dimensions} dimensions each.", title="Smoke test failed")
    similar, unrelated = _cosine(vectors[0], vectors[1]), _cosine(vectors[0], vectors[2])
    account = f"{dimensions} dimensions; similar sentences {similar:.3f} > unrelated {unrelated:.3f}"
    github.log(f"{model}: {account.replace(' > ', ' vs ')}")
    if not similar > unrelated:
        raise PublishError(f"Smoke test failed: {model} puts {EMBEDDING_PROBE[0]!r} closer to the unrelated "
                           f"{EMBEDDING_PROBE[2]!r} ({unrelated:.3f}) than to {EMBEDDING_PROBE[1]!r} ({similar:.3f}). "
                           "The pooling or the weights are wrong.", title="Smoke test failed")
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
        raise PublishError(f"Smoke test failed: {model} ignores images ({with_image} prompt tokens with one, "
                           f"{without} without). Its projector did not load.", title="Smoke test failed")
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
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


@dataclasses.dataclass(frozen=True)
class ParityFailure:
    conversation: str
    expected: str  # the checkpoint's own rendering
    actual: str  # Ollama's prompt, decoded


def _decode(tokenizer_json: Path | None, ids: list[int]) -> str:
    if tokenizer_json is None or not tokenizer_json.is_file():
        return " ".join(map(str, ids))
    from tokenizers import Tokenizer  # installed with transformers; only needed to explain a failure

    return Tokenizer.from_file(str(tokenizer_json)).decode(ids, skip_special_tokens=False)


def prompt_parity(client: OllamaClient, model: str, create_body: dict[str, Any], info: modelfile.TokenizerInfo,
                  adds_bos: bool, tokenizer_json: Path | None) -> list[ParityFailure]:
    """Compare, for each fixed conversation, the tokens of the prompt Ollama builds with the tokens of
    the checkpoint's own Jinja rendering. Returns the conversations that differ.

    Ollama has no endpoint that returns a chat prompt's tokens, but generate returns `context`: the
    tokens of its prompt plus the one token generated (the same on both sides when prompts are equal).
    Two temporary models make both sides go through Ollama's tokenizer: one renders each
    conversation with our template (its history as MESSAGE lines, its last user turn as the prompt),
    the other has the identity template `{{ .Prompt }}` and receives the Jinja rendering.
    """
    base = model.rpartition(":")[0]
    identity = f"{base}:parity-reference"
    reference_body = {k: v for k, v in create_body.items() if k not in ("system", "messages")}
    client.create({**reference_body, "model": identity, "template": "{{ .Prompt }}"}, quiet=True)
    failures = []
    try:
        for label, conversation in CONVERSATIONS.items():
            try:
                expected = chat_jinja.render(info.chat_template, conversation, bos_token=info.bos_token,
                                             eos_token=(info.eos_tokens or ("",))[0])
            except jinja2.TemplateError as exc:
                github.warning(f"prompt parity: the checkpoint's template cannot render '{label}' ({exc}); skipped")
                continue
            # `context` holds the prompt's tokens without the BOS the runner prepends when the GGUF says
            # so; compare the rendering without it too. A template that writes BOS itself then shows as
            # one token too many: the model would see BOS twice.
            if adds_bos and info.bos_token and expected.startswith(info.bos_token):
                expected = expected[len(info.bos_token):]
            theirs = _prompt_tokens(client, identity, expected)
            ours = _conversation_tokens(client, f"{base}:parity-probe", create_body, conversation)
            if ours != theirs:
                failures.append(ParityFailure(label, expected, _decode(tokenizer_json, ours)))
                github.log(f"  {label}: DIFFERENT")
            else:
                github.log(f"  {label}: same {len(ours)} tokens")
    finally:
        client.delete(identity)
    return failures


def _prompt_tokens(client: OllamaClient, model: str, prompt: str) -> list[int]:
    return client.generate(model, prompt, options={**GREEDY, "num_predict": 1}).get("context", [])


def _conversation_tokens(client: OllamaClient, probe: str, create_body: dict[str, Any],
                         conversation: list[dict[str, str]]) -> list[int]:
    system = next((m["content"] for m in conversation if m["role"] == "system"), None)
    turns = [m for m in conversation if m["role"] != "system"]
    body = {**create_body, "model": probe, "messages": turns[:-1]}
    if system is not None:
        body["system"] = system
    client.create(body, quiet=True)
    try:
        return _prompt_tokens(client, probe, turns[-1]["content"])
    finally:
        client.delete(probe)


def explain(failures: list[ParityFailure]) -> str:
    parts = []
    for failure in failures:
        parts.append(f"--- {failure.conversation}: the checkpoint's template renders\n{failure.expected}\n"
                     f"--- Ollama builds (decoded, including the first generated token)\n{failure.actual}")
    return "\n".join(parts)
