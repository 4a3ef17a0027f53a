"""Template report: for each real chat template in llama.cpp's models/templates (the chat templates of
current model families), how ollama-publish handles it (the template it publishes, or refused), which
rendering Ollama then uses, and whether Ollama builds the same prompts as the template itself for the
plain, tools and thinking conversations (the prompt-parity check, in a real Ollama).

    scripts/template-report [--markdown FILE]

Every template is checked on a GGUF with SmolLM2-135M-Instruct's tokenizer (tests/material/tiny_gguf.py:
its Q4_1 GGUF's metadata, with one tiny layer of zero weights), rewritten with the template as its
tokenizer.chat_template (as the converter embeds a checkpoint's): Ollama sees each template's own Jinja
and picks between it and the TEMPLATE as it would for the real model, and the Jinja path is
llama-server's real rendering. Parity is about the prompt text, which depends on the tokenizer and never
on the weights; BOS and EOS are SmolLM2's. As in the action, the candidate templates are tried in order
(modelfile.candidate_formats) and the first that proves itself is the one reported, else the first whose
prompts lack only the reasoning Ollama does not pass to llama-server; when none does, the parity columns
are those of the candidate with the fewest failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jinja2

from entrypoint import chat_jinja, checks, gguf_header, modelfile, proof
from entrypoint.errors import PublishError
from entrypoint.ollama import OllamaClient
from tests import servers
from tests.material import tiny_gguf

# Each conversation's kind (plain, tools, thinking), for the report's columns.
KINDS = {label: case.kind for label, case in checks.conversations(
    chat_jinja.Capabilities(tools=True, tool_round_trip=True, thinking=True, thinking_switch=True)).items()}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    handled: str  # the template published, "caught: ..." (every candidate failed) or "refused"
    rendering: str
    supports: tuple[str, ...]  # the checkpoint's template's tools and thinking
    parity: dict[str, str]  # kind -> "pass", "FAIL (labels)" or "" (not compared)

    @property
    def published(self) -> bool:
        return not self.handled.startswith(("caught", "refused"))


def _writes_bos_first(jinja: str) -> bool:
    """Whether the template starts with its bos_token (probed with a text of its own: SmolLM2's BOS,
    <|im_start|>, is also ChatML's turn marker)."""
    probe = "<BOSPROBE>"
    try:
        return chat_jinja.render(jinja, [{"role": "user", "content": "hi"}], bos_token=probe,
                                 eos_token="").startswith(probe)
    except jinja2.TemplateError:
        return False


def _with_template(source: Path, template: Path, target: Path) -> None:
    """A copy of `source` (a tiny GGUF: tiny_gguf) carrying `template`; one that prepends BOS itself when the
    template writes BOS first, as the GGUFs of those families do (so both sides get one BOS token, as for
    the real model)."""
    jinja = template.read_text(encoding="utf-8")
    overrides: dict[str, object] = {"tokenizer.chat_template": jinja}
    if _writes_bos_first(jinja):
        overrides["tokenizer.ggml.add_bos_token"] = True
    tiny_gguf.write(tiny_gguf.metadata(source), target, overrides)


# The verdict of conversations whose only difference is the reasoning Ollama does not pass to llama-server.
DROPPED = "reasoning dropped by Ollama"


def _verdict(failures: list[checks.ParityFailure], compared: set[str]) -> dict[str, str]:
    verdict = {}
    for kind in ("plain", "tools", "thinking"):
        labels = [label for label in compared if KINDS.get(label, "plain") == kind]
        of_kind = [f for f in failures if KINDS.get(f.conversation, "plain") == kind]
        failed = list(dict.fromkeys(f.conversation for f in of_kind))
        if of_kind and checks.only_reasoning_dropped(of_kind):
            verdict[kind] = f"{DROPPED} ({', '.join(failed)})"
        else:
            verdict[kind] = f"FAIL ({', '.join(failed)})" if failed else ("pass" if labels else "")
    return verdict


def check_template(client: OllamaClient, index: int, path: Path, base_gguf: Path, root: Path) -> Row:
    gguf = root / f"t{index}.gguf"
    _with_template(base_gguf, path, gguf)
    metadata = gguf_header.read_metadata(gguf)
    info = modelfile.tokenizer_info_from_gguf(metadata)
    adds_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    caps = chat_jinja.capabilities(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_tokens[0])
    try:
        formats = modelfile.candidate_formats("auto", info, Path("."), bos_added=adds_bos, caps=caps)
    except PublishError as exc:
        gguf.unlink()
        return Row(path.stem, "refused: " + exc.message.split(": ", 1)[-1].split(". Set")[0], "", caps.names(), {})
    try:
        return _prove_candidates(client, index, path, gguf, info, adds_bos, caps, formats)
    finally:
        gguf.unlink()


def _prove_candidates(client: OllamaClient, index: int, path: Path, gguf: Path, info: modelfile.TokenizerInfo,
                      adds_bos: bool, caps: chat_jinja.Capabilities, formats: list[modelfile.ChatFormat]) -> Row:
    """As the pipeline's stage 5 (proof.prove each candidate, proof.choose when none passes): the first
    candidate that passes parity and offers the checkpoint's tools and thinking, else what each failed on."""
    digest = client.upload_blob(gguf)
    name = f"report.local/templates/t{index}:latest"

    def create(spec: modelfile.ModelSpec) -> tuple[str, dict]:
        body = modelfile.create_request(spec, name, digest, "model.gguf")
        client.create(body, quiet=True)
        return name, body

    tried: list[str] = []  # why each candidate failed
    attempts: list[tuple[proof.Attempt, Row]] = []
    try:
        for attempt_index, chat in enumerate(formats):
            if attempt_index:
                client.unload(name)  # as the pipeline does between candidates
            spec = modelfile.ModelSpec(template=chat.template, system=chat.system_prompt(""), parameters=(),
                                       license="", source="report", renderer=chat.renderer, parser=chat.parser)
            how = chat.name.replace("derived from the checkpoint's chat template", "derived").replace(
                " (Ollama's built-in renderer)", " (renderer)").replace(
                modelfile.JINJA_FORMAT_NAME, "the checkpoint's own Jinja")
            try:
                attempt = proof.prove(client, create, spec, chat, info, caps, adds_bos, "fail")
            except PublishError as exc:
                tried.append(f"Ollama rejects {how} ({exc.message[:60]})")
                continue
            failures, offered = attempt.failures or [], attempt.offered
            compared = set(checks.conversations(checks.compared_capabilities(caps, set(offered))))
            verdict = _verdict([f for f in failures if f.conversation != "capabilities"], compared)
            row = Row(path.stem, how, attempt.rendering, caps.names(), verdict)
            if attempt.passed:
                return row
            attempts.append((attempt, row))
            failed = list(dict.fromkeys(f.conversation for f in failures if f.conversation != "capabilities"))
            why = ([f"{len(failed)} prompts differ"] if failed else []) + \
                ([f"offers {', '.join(offered) or 'no tools, no thinking'}"]
                 if any(f.conversation == "capabilities" for f in failures) else [])
            tried.append(f"{how} [{attempt.rendering}]: {', '.join(why)}")
    finally:
        client.delete(name)  # and the GGUF blob with it
    choice = proof.choose([attempt for attempt, _ in attempts], "fail")
    if choice is not None:  # as the pipeline, which publishes it with a caveat
        return attempts[choice.index][1]
    # Every candidate failed: what each failed on, and the columns of the one closest to passing.
    closest = min(attempts, key=lambda pair: len(pair[0].failures or []))[1] if attempts else \
        Row(path.stem, "", "", caps.names(), {})
    return dataclasses.replace(closest, handled="caught: " + "; ".join(tried))


def templates() -> list[Path]:
    """The corpus: llama.cpp's models/templates, from the tree the image ships."""
    return sorted((Path(os.environ["LLAMA_CPP_DIR"]) / "models" / "templates").glob("*.jinja"))


def tokenizer_gguf(root: Path) -> Path:
    """The GGUF every template is embedded in: SmolLM2's tokenizer, tiny weights."""
    gguf = root / "smollm2-tokenizer.gguf"
    tiny_gguf.build(Path(os.environ["SMOLLM2_GGUF"]), gguf)
    return gguf


def build_report() -> list[Row]:
    """A Row for every template in the corpus."""
    root = Path(tempfile.mkdtemp(prefix="template-report-"))
    rows = []
    with servers.ollama(root / "home") as url:
        client, base = OllamaClient(url), tokenizer_gguf(root)
        for index, path in enumerate(templates()):
            row = check_template(client, index, path, base, root)
            rows.append(row)
            print(f"{row.name}: {row.handled} [{row.rendering}] {row.parity}", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def summary(rows: list[Row]) -> dict[str, tuple[int, int]]:
    """(passed, of) for: every template published with all its parity passing; the templates that support
    tools, published with tools parity passing; the same for thinking."""
    tools = [r for r in rows if "tools" in r.supports]
    thinking = [r for r in rows if "thinking" in r.supports]
    return {"published": (sum(r.published for r in rows), len(rows)),
            "tools": (sum(r.published and r.parity.get("tools") == "pass" for r in tools), len(tools)),
            "thinking": (sum(r.published and r.parity.get("thinking") == "pass" for r in thinking), len(thinking))}


def to_markdown(rows: list[Row]) -> str:
    lines = ["| Template | Supports | Published as | Rendering | Prompt parity | Tools parity | Thinking parity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.name, ", ".join(r.supports) or "-", r.handled, r.rendering or "-",
                 *(r.parity.get(kind) or "-" for kind in ("plain", "tools", "thinking"))]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    counts = summary(rows)
    (published, total), (tools, with_tools), (thinking, with_thinking) = counts.values()
    refused = sum(r.handled.startswith("refused") for r in rows)
    dropped = sum(r.published and any(v.startswith(DROPPED) for v in r.parity.values()) for r in rows)
    lines += ["", f"{published} of {total} templates are published ({100 * published / total:.0f}%): "
                  f"{published - dropped} with every comparison passing, {dropped} whose prompts lack only the "
                  f"reasoning Ollama does not pass to llama-server; {refused} refused before conversion; "
                  f"{total - published - refused} caught by the checks before any push.",
              f"Of the {with_tools} templates that support tools, {tools} are published with tools parity passing "
              f"({100 * tools / max(with_tools, 1):.0f}%); of the {with_thinking} that think, {thinking} with "
              f"thinking parity passing ({100 * thinking / max(with_thinking, 1):.0f}%)."]
    return "\n".join(lines)


HEADER = """# Chat template corpus report

Generated by `scripts/template-report --markdown docs/templates.md` (also run as `tests/test_template_corpus.py`) on
{date} with Ollama {ollama} and the `models/templates` of the llama.cpp tree the action's image ships. "derived
(F family)": the Ollama template was read off the checkpoint template, and the template has the markers of
catalog family F; "F (catalog)": the detected family's catalog template; "R (renderer)": Ollama's built-in
renderer and parser R (templates/chat/renderers.toml);
"the checkpoint's own Jinja": no TEMPLATE, Ollama renders the GGUF's Jinja (no TEMPLATE can write it);
"refused": the action stops before conversion and names the `template` input; "caught": every candidate
template failed a check, so the action publishes nothing. "reasoning dropped by Ollama": the prompt is the
template's for the conversation without the reasoning of its assistant turns, which Ollama 0.34 does not pass
to llama-server (the action publishes such a model, with a caveat in the log and summary, only when no
candidate passes outright). Each template is embedded in the GGUF, so Ollama
picks its rendering (`renderer`, `go_template`, `gguf_chat_template`, or `parser`: the TEMPLATE pinned) as for a real
checkpoint. Parity compares the prompts Ollama builds for chat requests with the Jinja renderings: the four
plain conversations, and the tools and thinking ones for what the template supports or the model offers
(see the README's "Chat templates"). "Supports" is what the template renders (tools, thinking).

"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, help="also write the report, with its header, to this file")
    args = parser.parse_args()
    table = to_markdown(build_report())
    print(table)
    if args.markdown:
        version = subprocess.run([os.environ["OLLAMA_BIN"], "--version"], capture_output=True, text=True).stdout
        header = HEADER.format(date=datetime.date.today().isoformat(), ollama=version.split()[-1])
        args.markdown.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
