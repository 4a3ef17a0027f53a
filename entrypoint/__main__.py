"""Entry point: `python -m entrypoint` in the container (inputs from INPUT_*), or as a CLI with flags."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import github, pipeline, process
from .errors import PublishError
from .settings import INPUTS, SECRET_INPUTS, build_settings, read_inputs


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="python -m entrypoint",
        description="Publish a Hugging Face checkpoint as an Ollama model. Every flag is the action input of "
                    "the same name; unset flags fall back to INPUT_* variables, then to the defaults.")
    for name, default in INPUTS.items():
        extra = " (prefer the INPUT_ variable for secrets)" if name in SECRET_INPUTS else ""
        parser.add_argument(f"--{name}", dest=name, metavar="VALUE", help=f"default: {default!r}{extra}")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def _display(path: Path, workspace: Path) -> str:
    """Paths relative to the workspace read the same inside the container and on the runner."""
    try:
        return str(path.resolve().relative_to(workspace.resolve()))
    except ValueError:
        return str(path)


def write_outputs(report: pipeline.Report, workspace: Path) -> None:
    models = [{"name": r.name, "tag": r.tag, "quantization": r.quantization, "digest": r.digest,
               "registry_digest": r.registry_digest, "size": r.size, "pushed": r.pushed, "pulled": r.pulled,
               "answer": r.answer}
              for r in report.results]
    ggufs = list(dict.fromkeys(_display(r.gguf, workspace) for r in report.results))
    ggufs += [_display(path, workspace) for path in report.extra_ggufs]
    github.set_outputs({
        "models": json.dumps(models),
        "modelfile": _display(report.modelfile, workspace),
        "gguf-paths": "\n".join(ggufs),
        "revision": report.commit,
    })


def summary_markdown(report: pipeline.Report, source: str, workspace: Path) -> str:
    lines = [f"## Ollama models from {source}", ""]
    if report.commit:
        lines += [f"Checkpoint commit `{report.commit}`, Ollama {report.ollama_version}.", ""]
    lines += [f"Path taken: {report.path_taken}.", ""]
    if report.rendering:
        offered = " and ".join(report.capabilities) or "neither tools nor thinking"
        lines += [f"Chat template: {report.chat_template}. Prompts are rendered by Ollama with {report.rendering}. "
                  f"The models offer {offered}.", ""]
    if report.caveat:
        lines += [f"**Caveat:** {report.caveat}", ""]
    if report.sampling:
        lines += ["Sampling defaults: " + ", ".join(f"{name} {value} ({source})" for name, value, source in
                                                    report.sampling) + ".", ""]
    lines += ["| Model | Quantization | Size | Digest | Smoke test answer | Pushed |",
              "|---|---|---:|---|---|---|"]
    pushed = {(True, True): "yes, pulled back by an empty Ollama", (True, False): "yes, **not pulled back**",
              (False, False): "no"}
    for r in report.results:
        answer = r.answer.replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| `{r.name}` | {r.quantization} | {r.size / 1e6:.1f} MB | `{r.digest[:19]}…` | {answer} | "
                     f"{pushed[r.pushed, r.pulled]} |")
    lines += ["", f"Modelfile: `{_display(report.modelfile, workspace)}`"]
    return "\n".join(lines) + "\n"


def _fail(title: str, message: str, more: str = "") -> int:
    """One error annotation and the same at the top of the summary: what happened, why and the fix (the
    message), and where the README says more."""
    github.error(f"{message}\nMore: {more}" if more else message, title=title)
    more_line = f"More: [{more.rpartition('#')[2]}]({more})\n" if more else ""
    github.write_summary(f"## ollama-publish failed\n\n**{title}**\n\n```\n{message}\n```\n\n{more_line}")
    return 1


def main() -> int:
    environ = os.environ
    signal.signal(signal.SIGTERM, process.on_cancel)
    process.keep_secrets_from_children()
    values = read_inputs(environ, parse_args(sys.argv[1:]))
    for name in SECRET_INPUTS:
        if values[name]:
            github.register_secret(values[name])
        # Read once; child processes (converter, Ollama server) must not inherit secrets.
        for key in (f"INPUT_{name.upper()}", f"INPUT_{name.upper().replace('-', '_')}"):
            os.environ.pop(key, None)
    try:
        settings = build_settings(values, environ)
        for deprecation in settings.deprecations:
            github.warning(deprecation)
        report = pipeline.run(settings)
    except PublishError as exc:
        return _fail(exc.title, exc.shown, more=github.readme_link(exc.anchor))
    except Exception as exc:  # a bug, not a user error: keep the traceback (scrubbed of secrets) for the report
        github.log(traceback.format_exc())
        return _fail("ollama-publish crashed", f"Unexpected {type(exc).__name__}: {exc}. Please report this "
                     "with the log above.")
    write_outputs(report, settings.workspace)
    github.write_summary(summary_markdown(report, settings.source_label, settings.workspace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
