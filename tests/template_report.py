"""Template report: for each real chat template in llama.cpp's models/templates (71 current model
families), how ollama-publish handles it (ChatML catalog entry, derived, or refused) and whether
Ollama then builds the same prompts as the template itself (the prompt-parity check, in a real
Ollama).

    scripts/template-report [--markdown FILE]

Every template is checked on one real model, SmolLM2-135M-Instruct converted to Q8_0: parity is
about the prompt text and its tokens, and a tokenizer without a family's special tokens still
splits equal texts into equal tokens. bos_token/eos_token are given as <s> and </s>; a template
that writes BOS first is checked as for a GGUF that prepends BOS itself (as its family's does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jinja2

from entrypoint import chat_jinja, checks, convert, modelfile
from entrypoint.errors import PublishError
from entrypoint.ollama import OllamaClient
from tests import servers

BOS, EOS = "<s>", "</s>"


def _starts_with_bos(jinja: str) -> bool:
    try:
        return chat_jinja.render(jinja, [{"role": "user", "content": "hi"}], bos_token=BOS,
                                 eos_token=EOS).startswith(BOS)
    except jinja2.TemplateError:
        return False


def check_template(client: OllamaClient, digest: str, index: int, jinja: str) -> tuple[str, str]:
    """(how it is handled, parity result) for one template."""
    info = modelfile.TokenizerInfo(chat_template=jinja, eos_tokens=(EOS,), bos_token=BOS)
    # A family whose template writes BOS first has a tokenizer that prepends BOS (its GGUF says so):
    # check what the action does for such a GGUF, although SmolLM2's own adds none.
    bos_added = _starts_with_bos(jinja)
    try:
        chat = modelfile.choose_format("auto", info, Path("."), bos_added=bos_added)
    except PublishError as exc:
        return "refused", exc.message.split(": ", 1)[-1].split(". Set")[0]
    how = chat.name.replace("derived from the checkpoint's chat template", "derived")
    spec = modelfile.ModelSpec(template=chat.template, system=chat.default_system, parameters=(), license="",
                               source="report")
    name = f"report.local/templates/t{index}:latest"
    body = modelfile.create_request(spec, name, digest, "model.gguf")
    try:
        client.create(body, quiet=True)
    except PublishError as exc:
        return how, f"FAIL: Ollama rejects the template ({exc.message[:80]})"
    try:
        failures = checks.prompt_parity(client, name, body, info, adds_bos=bos_added, tokenizer_json=None)
    finally:
        client.delete(name)
    if failures:
        return how, f"FAIL ({', '.join(f.conversation for f in failures)})"
    return how, "pass"


def build_report() -> list[tuple[str, str, str]]:
    """(template, how it is handled, parity result) for every template in the corpus."""
    templates = sorted((Path(os.environ["LLAMA_CPP_DIR"]) / "models" / "templates").glob("*.jinja"))
    root = Path(tempfile.mkdtemp(prefix="template-report-"))
    gguf = root / "smollm2-q8_0.gguf"
    convert.convert(Path(os.environ["SMOLLM2_CHECKPOINT"]), gguf, "q8_0", "SmolLM2-135M-Instruct")
    rows = []
    with servers.ollama(root / "home") as url:
        client = OllamaClient(url)
        digest = client.upload_blob(gguf)
        # Keeps the GGUF blob referenced: Ollama deletes a blob with the last model that uses it.
        client.create({"model": "report.local/templates/keep:latest", "files": {"model.gguf": digest}}, quiet=True)
        for index, path in enumerate(templates):
            how, parity = check_template(client, digest, index, path.read_text(encoding="utf-8"))
            rows.append((path.stem, how, parity))
            print(f"{path.stem}: {how}: {parity}", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def to_markdown(rows: list[tuple[str, str, str]]) -> str:
    passed = sum(1 for _, _, parity in rows if parity == "pass")
    refused = sum(1 for _, how, _ in rows if how == "refused")
    caught = sum(1 for _, how, parity in rows if how != "refused" and parity != "pass")
    lines = ["| Template | Handled as | Prompt parity |", "|---|---|---|"]
    lines += [f"| {name} | {how} | {parity.replace('|', '/')} |" for name, how, parity in rows]
    lines += ["", f"{passed} of {len(rows)} templates pass prompt parity ({100 * passed / len(rows):.0f}%); "
                  f"{refused} refused before conversion; {caught} handled but caught by the parity check."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    table = to_markdown(build_report())
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
