"""Stage 5's template proof: which candidate chat template the models are published with, proven in Ollama.

Each candidate (modelfile.candidate_formats) in turn: the models are created with it and proven (prove:
prompt parity on every rendering users' Ollama may use, with the tools and thinking conversations the
checkpoint's template supports; the TEMPLATE pinned when only the GGUF's Jinja differs; the checkpoint's
tools offered). The first that passes is published. When none does, choose() settles it: the first whose
prompts lack only the reasoning Ollama never passes to llama-server is published with a caveat; else,
with prompt-parity: warn, the one with the fewest failures, with a warning; else the run fails. Used by
the pipeline and by the template corpus report, so both follow one policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from . import chat_jinja, checks, github, modelfile
from .errors import ParityFailed
from .ollama import OllamaClient


@dataclasses.dataclass(frozen=True)
class Attempt:
    """A candidate, as created and proven."""

    chat_format: modelfile.ChatFormat
    spec: modelfile.ModelSpec  # as created: with PARSER passthrough when the proof pinned the TEMPLATE
    rendering: str  # the rendering Ollama uses for the models (checks.selected_rendering)
    offered: tuple[str, ...]  # the tools and thinking the models offer (their /api/show)
    failures: list[checks.ParityFailure] | None  # None: nothing was compared (prompt-parity: off, or no template)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclasses.dataclass(frozen=True)
class Choice:
    """What choose() settled on when no candidate passed: `index` into the attempts, and `why`."""

    index: int
    why: str  # "reasoning dropped" (published with a caveat) or "fewest failures" (prompt-parity: warn)


def choose(attempts: list[Attempt], prompt_parity: str) -> Choice | None:
    """Of candidates that all failed: the first whose prompts lack only the reasoning Ollama drops, else with
    prompt-parity: warn the one with the fewest failures (the first of equals), else none."""
    for index, attempt in enumerate(attempts):
        if checks.only_reasoning_dropped(attempt.failures or []):
            return Choice(index, "reasoning dropped")
    if prompt_parity == "warn" and attempts:
        return Choice(min(range(len(attempts)), key=lambda i: len(attempts[i].failures or [])), "fewest failures")
    return None


def settle(candidates: list[modelfile.ChatFormat], attempt: Callable[[modelfile.ChatFormat, int], Attempt],
           prompt_parity: str, name: str, version: str) -> tuple[Attempt, str]:
    """Try the candidates in order with `attempt(candidate, index)` (which creates the models with it and
    proves them) until one passes; else the one choose() picks, created again unless it was the last. Returns
    the attempt the models now hold and the caveat for the summary ("" when none). Raises CheckFailed when
    nothing may be published."""
    attempts: list[Attempt] = []
    for index, candidate in enumerate(candidates):
        result = attempt(candidate, index)
        if result.passed:
            return result, ""
        attempts.append(result)
        if index + 1 < len(candidates):
            github.log(f"{candidate.name}: {failure_headline(result.failures or [])}; trying "
                       f"{candidates[index + 1].name} instead.\n" + checks.explain(result.failures or []))
    choice = choose(attempts, prompt_parity)
    last = attempts[-1]
    if choice is None:
        raise ParityFailed(parity_message(name, last.failures or []))
    chosen = attempts[choice.index]
    if choice.index + 1 < len(attempts):
        github.log(f"{last.chat_format.name}: {failure_headline(last.failures or [])}.\n"
                   + checks.explain(last.failures or []) + f"\nNo candidate passes outright: publishing "
                   f"{chosen.chat_format.name} again ({choice.why}).")
        chosen = attempt(chosen.chat_format, len(attempts))
    if choice.why == "reasoning dropped":
        return chosen, reasoning_dropped(name, version, chosen.failures or [])
    github.warning(parity_message(name, chosen.failures or []))
    return chosen, ""


# Creates the models with a spec; returns the name of the one to check (every quantization has the same
# template and tokenizer, so the same prompts) and the create request it was made with (for a probe).
Create = Callable[[modelfile.ModelSpec], tuple[str, dict]]


def prove(client: OllamaClient, create: Create, spec: modelfile.ModelSpec, chat_format: modelfile.ChatFormat,
          info: modelfile.TokenizerInfo, caps: chat_jinja.Capabilities, adds_bos: bool, prompt_parity: str
          ) -> Attempt:
    """Create the models with `spec` and prove them.

    Parity is checked on every rendering users' Ollama may use (checks.renderings_to_check), with the tools
    and thinking conversations the checkpoint's template supports. When only the GGUF's Jinja, which Ollama
    prefers, fails (llama-server renders it other than transformers, or the GGUF's copy is stale) the
    TEMPLATE is pinned. Then the models must offer the checkpoint's tools (and should offer its thinking)."""
    name, body = create(spec)
    show = client.show(name)
    rendering, offered = checks.selected_rendering(show, spec.template), checks.offered_capabilities(show)
    if prompt_parity == "off":
        return Attempt(chat_format, spec, rendering, offered, None)
    if not info.chat_template:
        github.warning("prompt parity not checked: the checkpoint has no chat template to compare with")
        return Attempt(chat_format, spec, rendering, offered, None)
    renderings = checks.renderings_to_check(rendering, spec.template)
    github.log(f"prompt parity of {name} with the checkpoint's chat template (the same for every quantization), "
               f"as Ollama renders it [{', '.join(renderings)}]:")
    failures, compared = checks.prompt_parity(client, name, body, info, adds_bos, renderings, caps,
                                              chat_format.leading_bos, show)
    if not compared:  # the template renders no conversation: refused, or warned about, before any weights
        return Attempt(chat_format, spec, rendering, offered, None)
    if checks.pins_template(failures, renderings):
        github.warning(f"Ollama would render the prompts of {name} with the GGUF's own Jinja chat template, in "
                       "llama-server (it supports more than the TEMPLATE: tools, thinking), and that builds other "
                       f"prompts than the checkpoint for {len(failures)} conversations; the TEMPLATE builds the same. "
                       f"The models pin the TEMPLATE (PARSER {checks.PIN_PARSER}), so Ollama renders that.\n"
                       + checks.explain(failures))
        spec = dataclasses.replace(spec, parser=checks.PIN_PARSER)
        name, _ = create(spec)
        show = client.show(name)
        rendering, offered, failures = checks.selected_rendering(show, spec.template), checks.offered_capabilities(
            show), []
    failures += checks.capability_failures(caps, show)
    if not failures and checks.missing_thinking(caps, show):
        github.warning(f"The checkpoint's chat template thinks, and {name} does not offer thinking: Ollama "
                       f"{client.version()} leaves the reasoning in the answer (it splits it off only between tags it "
                       "knows, such as <think>). The prompts are the checkpoint's.")
    return Attempt(chat_format, spec, rendering, offered, failures)


def reasoning_dropped(name: str, version: str, failures: list[checks.ParityFailure]) -> str:
    """Warn that the published prompts lack the conversation's reasoning; returns the summary's sentence."""
    caveat = (f"Ollama {version} passes no assistant turn's thinking to llama-server, which renders these "
              "prompts with the checkpoint's Jinja: a conversation that sends the model's reasoning back (between "
              "tool calls, say) reaches the model without it, where the checkpoint's template writes it. Every "
              "other prompt compared is the checkpoint's; these lack the reasoning: "
              f"{', '.join(dict.fromkeys(f.conversation for f in failures))}.")
    github.warning(f"{name}: {caveat}\n" + checks.explain(failures))
    return caveat


def failure_headline(failures: list[checks.ParityFailure]) -> str:
    return f"{len(failures)} failed checks ({', '.join(dict.fromkeys(f.conversation for f in failures))})"


def parity_message(name: str, failures: list[checks.ParityFailure]) -> str:
    return (f"Prompt parity failed for {name}: Ollama builds other prompts than the checkpoint's own chat "
            f"template, or offers other capabilities: {failure_headline(failures)}. Set the template input to "
            "the right template (or prompt-parity: warn to publish anyway).\n" + checks.explain(failures))
