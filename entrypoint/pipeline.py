"""The whole job, top-down: server, checkpoint, GGUFs, Modelfile, create and prove, push, report.

Each stage's work is in its module: source (2: the checkpoint and its facts), ggufs (3), modelfile (4),
proof (5: the template the models are published with), checks (5: smoke tests), publish (6, 7)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import checks, convert, ggufs, github, gguf_header, modelfile, proof, publish, quantize, registry, retry, source
from .errors import InputError
from .ollama import OllamaClient, serve
from .publish import TagResult
from .settings import Settings


@dataclasses.dataclass
class Report:
    results: list[TagResult]
    modelfile: Path
    commit: str
    ollama_version: str
    path_taken: str  # how the repo was published, and why (hub.Plan.why)
    extra_ggufs: tuple[Path, ...]  # a vision model's projector: shared by every tag
    rendering: str  # what renders the prompts in users' Ollama (checks.selected_rendering); "" for embeddings
    capabilities: tuple[str, ...] = ()  # tools, thinking: what the published models offer (their /api/show)
    chat_template: str = ""  # the candidate template or renderer published (modelfile.ChatFormat.name)
    sampling: tuple[tuple[str, Any, str], ...] = ()  # (parameter, value, where it came from)
    caveat: str = ""  # what the published models' prompts lack that the checkpoint's have, "" if nothing


def run(settings: Settings) -> Report:
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    # Scratch space (checkpoint, intermediate GGUF, our Ollama's models) on the same mount as output-dir:
    # finished GGUFs are then renamed into output-dir and handed to Ollama as hard links, never copied.
    # In a container, RUNNER_TEMP and HOME are other mounts, where renames and links would be copies.
    scratch = Path(tempfile.mkdtemp(prefix=".ollama-publish-", dir=settings.output_dir))
    try:
        with contextlib.ExitStack() as stack:
            with github.group("1. Start Ollama"):
                client = stack.enter_context(_ollama(settings, scratch))  # runs until the stack closes
                if settings.push:  # an unreachable registry should fail the run now, not after an hour of work
                    retry.retrying(lambda: registry.check_reachable(settings.model_name,
                                                                    insecure=settings.insecure_registry),
                                   f"reaching the registry {settings.model_name.host}")
            with github.group("2. Download the checkpoint"):
                src = source.fetch(settings, scratch, client)  # its other files are checked before its weights
            projector = ggufs.extra_path(settings, "mmproj-f16") if src.task == "vision" else None
            if src.checkpoint.plan.kind == "gguf":
                with github.group("3. Take the repo's GGUF files (no conversion)"):
                    files = ggufs.take(settings, src.checkpoint, src.seal)
            else:
                with github.group("3. Convert to GGUF and quantize"):
                    files = ggufs.build(settings, src.checkpoint, scratch, projector, src.seal)
            metadata = gguf_header.read_metadata(files[settings.quantizations[0]])  # every tag's tokenizer
            adds_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
            with github.group("4. Render the Modelfile"):
                candidates, spec, embedding_size = _describe(settings, src, metadata, adds_bos)
                modelfile_path = _write_modelfile(settings, spec, files, projector)
            with github.group("5. Create the models and prove they work"):
                models = _Models(client, settings, files, projector)
                chosen, caveat, offered = _prove(models, settings, src, candidates, spec, adds_bos)
                if chosen is not None and chosen.spec != spec:
                    modelfile_path = _write_modelfile(settings, chosen.spec, files, projector)
                smoke = _smoke(settings, src.task, offered, embedding_size)
                _smoke_test(settings, models.results, lambda name: smoke(client, name), client.unload)
            if settings.push:
                with publish.push_key(settings, _server_home(scratch)):  # on disk only for the push and pull-back
                    with github.group("6. Push"):
                        publish.push(client, settings, models.results)
                    with github.group("7. Pull back with an empty Ollama"):
                        if settings.pull_check == "off":
                            github.warning("pull check skipped (pull-check: off): nothing proves users can pull "
                                           "what was pushed")
                        else:
                            publish.pull_back(settings, scratch, models.results, client, smoke)
            return Report(results=models.results, modelfile=modelfile_path, commit=src.checkpoint.commit,
                          ollama_version=client.version(), path_taken=src.path_taken,
                          extra_ggufs=(projector,) if projector else (),
                          rendering=checks.describe_rendering(chosen.rendering, bool(chosen.spec.template))
                          if chosen else "", capabilities=offered, sampling=src.sampling,
                          chat_template=chosen.chat_format.name if chosen else "", caveat=caveat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        github.give_to_workspace_owner(settings.output_dir, settings.workspace)


@contextlib.contextmanager
def _ollama(settings: Settings, scratch: Path) -> Iterator[OllamaClient]:
    if settings.ollama_host:
        client = OllamaClient(settings.ollama_host)
        if not client.is_healthy():
            raise InputError(f"No Ollama server answers at {settings.ollama_host}.", input_name="ollama-host")
        github.log(f"Using the Ollama server at {settings.ollama_host} (version {client.version()})")
        if settings.push:
            github.log("Pushes are signed with that server's own key (its ~/.ollama/id_ed25519)")
        yield client
    else:
        # A private server's models live in the scratch space unless OLLAMA_MODELS says otherwise.
        models_dir = Path(os.environ.get("OLLAMA_MODELS") or scratch / "models")
        with serve(scratch / "ollama-server.log", models_dir, _server_home(scratch)) as client:
            yield client


def _server_home(scratch: Path) -> Path:
    return scratch / "home"


def _describe(settings: Settings, src: source.Source, metadata: dict[str, Any], adds_bos: bool
              ) -> tuple[list[modelfile.ChatFormat], modelfile.ModelSpec, int]:
    """A chat model's candidate templates and the spec of the first; an embedding model's spec (no template,
    no stop tokens, inputs cut where sentence-transformers cuts them) and its embedding size."""
    if src.chat is not None:
        candidates = source.candidates_for(settings, src.chat, adds_bos)
        return candidates, _chat_spec(settings, src, candidates[0]), 0
    size = convert.check_embedding_model(metadata, source.input_name(settings))
    parameters = settings.parameters
    if src.embedding_context and "num_ctx" not in dict(parameters):
        parameters = (*parameters, ("num_ctx", src.embedding_context))
        github.log(f"num_ctx {src.embedding_context}: inputs are cut where sentence-transformers cuts them "
                   "(its max_seq_length)")
    github.log(f"embedding model ({size} dimensions): no chat template, no stop tokens")
    return [], modelfile.ModelSpec(template="", system="", parameters=parameters, license=src.license_text,
                                   source=settings.source_label), size


def _chat_spec(settings: Settings, src: source.Source, chat_format: modelfile.ChatFormat) -> modelfile.ModelSpec:
    """Template, stop tokens, system prompt, parameters and license of every tag, with `chat_format`."""
    assert src.chat is not None
    stops = modelfile.stop_tokens(chat_format, src.chat.info)
    system = chat_format.system_prompt(settings.system)
    github.log(f"chat template: {chat_format.name}; stop tokens: {', '.join(stops) or '(none)'}")
    if chat_format.default_system and not system:
        github.log(f"default system prompt, which the template writes in a chat without one: "
                   f"{chat_format.default_system}")
    user_stops = [v for n, v in settings.parameters if n == "stop"]
    defaults = tuple((name, value) for name, value, origin in src.sampling if origin == "generation_config.json")
    parameters = tuple(("stop", s) for s in stops if s not in user_stops) + defaults + settings.parameters
    return modelfile.ModelSpec(template=chat_format.template, system=system, parameters=parameters,
                               license=src.license_text, source=settings.source_label, renderer=chat_format.renderer,
                               parser=chat_format.parser)


def _write_modelfile(settings: Settings, spec: modelfile.ModelSpec, files: dict[str, Path],
                     projector: Path | None) -> Path:
    path = settings.output_dir / "Modelfile"
    text = modelfile.render_modelfile(spec, files[settings.quantizations[0]].name, projector.name if projector else "")
    with quantize.written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")
    github.log(text)
    return path


class _Models:
    """The models of every tag in our Ollama, made from the GGUFs (uploaded once) with a spec at a time."""

    def __init__(self, client: OllamaClient, settings: Settings, files: dict[str, Path], projector: Path | None):
        self.client, self.settings, self.files = client, settings, files
        self.digests = {q: client.upload_blob(path) for q, path in files.items()}
        self.projector = (projector.name, client.upload_blob(projector)) if projector else None
        self.results: list[TagResult] = []

    def create(self, spec: modelfile.ModelSpec) -> tuple[str, dict]:
        """Every tag with `spec`. Returns what the proof checks: the smallest quantization (the quickest to
        load) and its create request."""
        self.results = []
        for quant, tag in self.settings.tags:
            name = self.settings.model_name.with_tag(tag)
            github.log(f"creating {name}")
            self.client.create(modelfile.create_request(spec, name, self.digests[quant], self.files[quant].name,
                                                        self.projector))
            digest, size = self.client.model_digest(name)
            self.results.append(TagResult(tag=tag, name=name, quantization=quant, gguf=self.files[quant],
                                          digest=digest, size=size))
        smallest = min(self.files, key=lambda q: self.files[q].stat().st_size)
        name = next(r.name for r in self.results if r.quantization == smallest)
        return name, modelfile.create_request(spec, name, self.digests[smallest], self.files[smallest].name)

    def unload(self) -> None:
        """Stop their llama-servers, so that models made again get their own (client.unload says why)."""
        for result in self.results:
            self.client.unload(result.name)


def _prove(models: _Models, settings: Settings, src: source.Source, candidates: list[modelfile.ChatFormat],
           spec: modelfile.ModelSpec, adds_bos: bool) -> tuple[proof.Attempt | None, str, tuple[str, ...]]:
    """Create the models; a chat model's with the first candidate template that proves itself (proof.settle).
    Returns the attempt published (None for an embedding model), the summary's caveat, and the tools and
    thinking the models offer."""
    if src.chat is None:
        models.create(spec)
        return None, "", ()
    chat = src.chat
    github.log("the checkpoint's chat template supports: "
               f"{checks.describe_capabilities(chat.capabilities.names())}")

    def attempt(candidate: modelfile.ChatFormat, index: int) -> proof.Attempt:
        if index:  # the previous candidate failed its proof: this one from scratch
            models.unload()
        return proof.prove(models.client, models.create, spec if index == 0 else _chat_spec(settings, src, candidate),
                           candidate, chat.info, chat.capabilities, adds_bos, settings.prompt_parity)

    name = settings.model_name.with_tag(settings.tags[0][1])
    chosen, caveat = proof.settle(candidates, attempt, settings.prompt_parity, name, models.client.version())
    rendering = checks.describe_rendering(chosen.rendering, bool(chosen.spec.template))
    github.log(f"Ollama renders the prompts with {rendering}; the models offer: "
               f"{checks.describe_capabilities(chosen.offered)}")
    return chosen, caveat, chosen.offered


def _smoke(settings: Settings, task: str, offered: tuple[str, ...], embedding_size: int
           ) -> Callable[[OllamaClient, str], str]:
    """The smoke test of a model on a server (ours, or the pull-back's): returns the account for the summary."""
    if task == "embedding":
        return lambda server, name: checks.embedding_smoke_test(server, name, embedding_size)

    def chat(server: OllamaClient, name: str) -> str:
        answer = checks.smoke_test(server, name, settings.smoke_test_prompt, settings.parameters, "tools" in offered)
        return f"{answer} ({checks.vision_smoke_test(server, name)})" if task == "vision" else answer

    return chat


def _smoke_test(settings: Settings, results: list[TagResult], test: Callable[[str], str],
                unload: Callable[[str], None]) -> None:
    """Once per quantization (the tags of one quantization are the same model): `test(name)` raises or
    returns the account shown in the summary. With smoke-test: warn a failure is a warning instead. Each
    model is unloaded once answered, so the run holds one model in memory at a time (an 8B's Q8_0 and Q4_K_M
    together would not fit a runner's 16 GB)."""
    if settings.smoke_test == "off":
        github.warning("smoke test skipped (smoke-test: off): nothing proves the models work")
        return
    answers: dict[str, str] = {}
    for result in results:
        if result.digest not in answers:
            answers[result.digest] = checks.warn_instead(settings.smoke_test, functools.partial(test, result.name))
            unload(result.name)
        result.answer = answers[result.digest]
