"""The whole job, top-down: server, checkpoint, GGUFs, Modelfile, create and prove, push, report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import (chat_jinja, checks, convert, github, gguf_header, hub, modelfile, preflight, process, quantize, registry,
               retry)
from .errors import CheckFailed, InputError, LimitExceeded, RegistryError, RepoRefused
from .ollama import OllamaClient, free_loopback_address, serve, signing_key
from .settings import Settings


@dataclasses.dataclass
class TagResult:
    tag: str
    name: str  # the full name Ollama's API uses
    quantization: str
    gguf: Path
    digest: str = ""  # the local model digest, as `ollama list` shows it
    size: int = 0
    registry_digest: str = ""  # the manifest digest in the registry, once pushed
    layers: tuple[str, ...] = ()  # the config and layer digests the registry holds for the tag, once pushed
    answer: str = ""
    pushed: bool = False
    pulled: bool = False  # an empty Ollama pulled the tag back, with the same layers (and answered)


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
            with github.group("2. Download the checkpoint"), _blaming(_source_input(settings)):
                checkpoint = _fetch_checkpoint(settings, scratch, client)  # checks its other files before weights
                seal = process.Seal(memory_bytes=preflight.tool_memory(0), input_name=_source_input(settings))
                if checkpoint.plan.kind != "gguf":  # the converter trusts config.json: it must match the weights
                    shapes = convert.safetensors_shapes(checkpoint.path)
                    convert.check_config_matches_weights(hub.read_json(checkpoint.path / "config.json"), shapes,
                                                         _source_input(settings))
                    seal = dataclasses.replace(seal, memory_bytes=preflight.tool_memory(convert.largest_tensor(shapes)))
                task = _task(checkpoint)
                info = _tokenizer_info(checkpoint)
                sampling = _sampling(settings, checkpoint) if task != "embedding" else ()
                embedding_context = _embedding_context(checkpoint) if task == "embedding" else None
                if task != "embedding" and checkpoint.plan.kind == "gguf":  # its template is in the GGUF files
                    _check_template(settings, info)
                license_text = modelfile.read_license(checkpoint.adapter or checkpoint.path) or \
                    modelfile.read_license(checkpoint.path)
            projector = _extra_path(settings, "mmproj-f16") if task == "vision" else None
            if checkpoint.plan.kind == "gguf":
                with github.group("3. Take the repo's GGUF files (no conversion)"):
                    ggufs = _take_ggufs(settings, checkpoint, seal)
            else:
                with github.group("3. Convert to GGUF and quantize"):
                    ggufs = _build_ggufs(settings, checkpoint, scratch, projector, seal)
            with github.group("4. Render the Modelfile"):
                formats = [] if task == "embedding" else modelfile.candidate_formats(
                    settings.template, info, settings.workspace, convert.adds_bos(ggufs[settings.quantizations[0]]))
                spec, embedding_size = _describe(settings, task, info, ggufs, projector, license_text,
                                                 embedding_context, formats[0] if formats else None, sampling)
                modelfile_path = _write_modelfile(settings, spec, ggufs, projector)
            with github.group("5. Create the models and prove they work"):
                digests = {q: client.upload_blob(path) for q, path in ggufs.items()}
                projector_file = (projector.name, client.upload_blob(projector)) if projector else None
                results = _create(client, settings, spec, ggufs, digests, projector_file)
                rendering, chat_template, caveat = "", "", ""
                offered: tuple[str, ...] = ()
                if task != "embedding":
                    caps = chat_jinja.capabilities(info.chat_template, bos_token=info.bos_token,
                                                   eos_token=(info.eos_tokens or ("",))[0]) \
                        if info.chat_template else chat_jinja.NO_CAPABILITIES
                    github.log(f"the checkpoint's chat template supports: {checks.describe_capabilities(caps.names())}")
                    # A candidate that differs only by the reasoning Ollama drops (checks.ParityFailure) is
                    # published when no later one passes outright: it is tried again at the end.
                    candidates, fallback = list(formats), None
                    for attempt, chat_format in enumerate(candidates):  # which may grow by that one
                        if attempt:  # the previous template failed its proof: the next one, from scratch
                            for result in results:  # with llama-servers of its own (client.unload says why)
                                client.unload(result.name)
                            spec = _describe_model(settings, info, license_text, chat_format, sampling)
                            modelfile_path = _write_modelfile(settings, spec, ggufs, projector)
                            results = _create(client, settings, spec, ggufs, digests, projector_file)
                        spec, results, rendering, failures = _prove_template(
                            client, settings, spec, chat_format, info, caps, ggufs, digests, results, projector_file)
                        chat_template = chat_format.name
                        if not failures:  # passed, or nothing checked (None)
                            break
                        dropped_only = checks.only_reasoning_dropped(failures)
                        if dropped_only and fallback is None:
                            fallback = chat_format
                        if attempt + 1 < len(candidates):
                            github.log(f"{chat_format.name}: {_failure_headline(failures)}; trying "
                                       f"{candidates[attempt + 1].name} instead.\n" + checks.explain(failures))
                            continue
                        if dropped_only and chat_format is fallback:  # the last candidate, or the fallback again
                            caveat = _reasoning_dropped(client, results[0].name, failures)
                            break
                        if fallback is not None and attempt + 1 == len(formats):
                            github.log(f"{chat_format.name}: {_failure_headline(failures)}.\n"
                                       + checks.explain(failures) + "\nNo candidate passes outright: publishing "
                                       f"{fallback.name} again, whose prompts lack only the reasoning Ollama drops.")
                            candidates.append(fallback)
                            continue
                        _parity_failed(settings, results[0].name, failures)
                    modelfile_path = _write_modelfile(settings, spec, ggufs, projector)
                    offered = checks.offered_capabilities(client.show(results[0].name))
                    github.log(f"Ollama renders the prompts with "
                               f"{checks.describe_rendering(rendering, bool(spec.template))}; the models offer: "
                               f"{checks.describe_capabilities(offered)}")
                smoke: Callable[[OllamaClient, str], str] = (
                    (lambda server, name: checks.embedding_smoke_test(server, name, embedding_size))
                    if task == "embedding" else
                    (lambda server, name: _chat_smoke_test(server, settings, name, task, "tools" in offered)))
                _smoke_test(client, settings, results, lambda name: smoke(client, name))
            if settings.push:
                with _push_key(settings, scratch):  # on disk only now, for the push and the pull-back
                    with github.group("6. Push"):
                        _push(client, settings, results)
                    with github.group("7. Pull back with an empty Ollama"):
                        _pull_back(settings, scratch, results, smoke)
            return Report(results=results, modelfile=modelfile_path, commit=checkpoint.commit,
                          ollama_version=client.version(), path_taken=checkpoint.plan.why + TASK_NOTES[task],
                          extra_ggufs=(projector,) if projector else (),
                          rendering=checks.describe_rendering(rendering, bool(spec.template)) if rendering else "",
                          capabilities=offered, sampling=sampling, chat_template=chat_template, caveat=caveat)
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


@contextlib.contextmanager
def _push_key(settings: Settings, scratch: Path) -> Iterator[None]:
    """The push key where our Ollama server reads it at each signature, for the block only: nothing that
    reads the repository (the converter, the tools) ever runs while it is on disk."""
    if settings.ollama_host or not settings.ollama_key:  # a server of the user's signs with its own key
        yield
        return
    with signing_key(_server_home(scratch), settings.ollama_key):
        yield


def _fetch_checkpoint(settings: Settings, scratch: Path, client: OllamaClient) -> hub.Checkpoint:
    """Decide how to publish the repo; download its other files first and check them (_check_descriptions),
    check that the whole run fits on disk and in memory, then download the weights."""
    destination = scratch / "checkpoint"
    if settings.model_path:
        github.log(f"Using the local checkpoint in {settings.model_path}")
        checkpoint, sizes = hub.local(settings.model_path, settings.repo_kind, settings.quantizations,
                                      settings.allow_pickle)
        remote = None
    else:
        remote = hub.inspect(settings.hf_repo, settings.hf_revision, settings.hf_token, settings.repo_kind,
                             settings.quantizations, settings.allow_pickle)
        sizes = remote.sizes
        checkpoint = hub.download(remote, settings.hf_token, destination, remote.descriptions())
    github.log(f"Path: {checkpoint.plan.why}")
    if any(f.endswith(".bin") for f in checkpoint.plan.files):
        github.warning("Converting pickle weights because allow-pickle is true: the converter loads them with "
                       "torch.load(weights_only=True). Publish safetensors to avoid this.")
    if checkpoint.plan.kind == "lora":
        return _fetch_base(settings, scratch, client, remote, checkpoint.path, sizes)
    if checkpoint.plan.kind == "transformers":
        _check_descriptions(settings, checkpoint, _source_input(settings))
    if settings.resource_check:
        _check_resources(settings, client, scratch, checkpoint.plan, sizes)
    if remote is not None:
        hub.download(remote, settings.hf_token, destination, remote.weights())
    return checkpoint


@contextlib.contextmanager
def _blaming(input_name: str) -> Iterator[None]:
    """A refusal of the repository's files that names no input names `input_name`, which gave the repository."""
    try:
        yield
    except RepoRefused as exc:
        exc.input_name = exc.input_name or input_name
        raise


def _check_descriptions(settings: Settings, checkpoint: hub.Checkpoint, input_name: str) -> None:
    """Before any weights are downloaded or read: the checkpoint (and a LoRA adapter) declares no code of its
    own, the converter supports it, and its chat template renders within its limits and makes a Modelfile."""
    with _blaming(input_name):
        _check_description_files(settings, checkpoint, input_name)


def _check_description_files(settings: Settings, checkpoint: hub.Checkpoint, input_name: str) -> None:
    convert.check_no_custom_code([checkpoint.path], input_name)
    architectures = convert.supported_architectures()
    config = hub.read_json(checkpoint.path / "config.json")
    with hub.reading("config.json"):
        convert.check_architecture(config, architectures, input_name=input_name)
        convert.check_encoder_has_pooling(config, architectures, "modules.json" in checkpoint.plan.files,
                                          input_name=input_name)
    if "modules.json" not in checkpoint.plan.files:  # not an embedding model: it chats
        _check_template(settings, _tokenizer_info(checkpoint))


def _check_template(settings: Settings, info: modelfile.TokenizerInfo) -> None:
    """The chat template renders the plain conversations (at least one) within its limits, a Modelfile can
    be made of it, and it places the system input. A template past a limit is refused naming its file."""
    try:
        formats = modelfile.candidate_formats(settings.template, info, settings.workspace)
        failures = checks.plain_rendering_failures(info) if settings.prompt_parity != "off" else []
        if failures:
            message = (f"The checkpoint's own chat template ({info.template_file}) renders none of the plain "
                       f"conversations the parity check compares ({'; '.join(failures)}), so nothing could prove "
                       "Ollama's prompts. Set the template input, or prompt-parity: warn to publish anyway.")
            if settings.prompt_parity == "fail":
                raise CheckFailed(message, input_name="template", title="Prompt parity failed")
            github.warning(message)
    except LimitExceeded as exc:
        exc.message = f"{info.template_file}: {exc.message}"
        raise
    _check_system_support(settings, formats)


def _fetch_base(settings: Settings, scratch: Path, client: OllamaClient, remote: hub.RemoteCheckpoint | None,
                adapter: Path, adapter_sizes: dict[str, int]) -> hub.Checkpoint:
    """A LoRA adapter's base model, from base-model or the adapter's own config: the other files of both are
    checked before the base's weights are downloaded."""
    adapter_config = hub.read_json(adapter / "adapter_config.json")
    with hub.reading("adapter_config.json"):
        convert.check_adapter(adapter_config, _source_input(settings))
    convert.check_no_custom_code([adapter], _source_input(settings))
    base_id = settings.base_model or str(adapter_config.get("base_model_name_or_path") or "")
    if not hub.is_repo_id(base_id):
        raise InputError(f"The adapter names its base model as '{base_id}', which is not a Hugging Face repo id. Set "
                         "base-model to the model it was trained on.", input_name="base-model")
    base = hub.inspect(base_id, settings.base_revision, settings.hf_token, "transformers", settings.quantizations,
                       settings.allow_pickle, inputs=("base-model", "base-revision"))
    base_dir = scratch / "base"
    hub.download(base, settings.hf_token, base_dir, base.descriptions())
    base_label = f"{base_id}@{base.commit[:12]}"
    why = f"merge the LoRA adapter into its base model {base_label}, then convert and quantize"
    repo_plan = dataclasses.replace(base.plan, kind="lora", why=why)
    checkpoint = hub.Checkpoint(path=base_dir, commit=remote.commit if remote else "", plan=repo_plan,
                                adapter=adapter)
    _check_descriptions(settings, checkpoint, "base-model")
    if settings.resource_check:
        _check_resources(settings, client, scratch, repo_plan, {**base.sizes, **adapter_sizes})
    if remote:
        hub.download(remote, settings.hf_token, adapter, remote.weights())
    hub.download(base, settings.hf_token, base_dir, base.weights())
    return checkpoint


def _check_resources(settings: Settings, client: OllamaClient, scratch: Path, repo_plan: hub.Plan,
                     sizes: dict[str, int]) -> None:
    folders = {"work": scratch, "outputs": settings.output_dir}
    if client.models_dir is not None:
        folders["ollama"] = client.models_dir
    # Our own server gets the GGUFs as hard links (OllamaClient.upload_blob) when it can.
    linked = client.models_dir is not None and preflight.same_filesystem(client.models_dir, settings.output_dir)
    downloaded = not settings.model_path or repo_plan.kind == "lora"  # a LoRA's base always comes from the Hub
    if repo_plan.kind == "gguf":
        gguf_sizes = {q: sum(sizes[f] for f in parts) for q, parts in repo_plan.ggufs.items()}
        split = sum(size for q, size in gguf_sizes.items() if len(repo_plan.ggufs[q]) > 1)
        largest = max(gguf_sizes, key=gguf_sizes.__getitem__)
        model_bytes = gguf_sizes[largest]
        phases = preflight.estimate_gguf(sum(gguf_sizes.values()), downloaded, ollama_copies=not linked,
                                         split_bytes=split, pulled_bytes=model_bytes if settings.push else 0)
    else:
        size = sum(sizes.values())
        merging = repo_plan.kind == "lora"
        phases = preflight.estimate(size, settings.quantizations, _intermediate_type(settings, merging),
                                    downloaded=downloaded, ollama_copies=not linked, merging=merging,
                                    pull_back=settings.push)
        largest, model_bytes = preflight.largest_quantized(size, settings.quantizations)
    preflight.check_disk(phases, folders)
    preflight.check_memory(model_bytes, largest)


TASK_NOTES = {"chat": "", "embedding": "; an embedding model", "vision": "; a vision model, with its projector"}


def _task(checkpoint: hub.Checkpoint) -> str:
    """'embedding': a sentence-transformers checkpoint (its modules.json gives the converter the pooling) or
    a GGUF with a pooling type; 'vision': a checkpoint with an image encoder the converter writes as a
    projector; else 'chat'."""
    if checkpoint.plan.kind == "gguf":
        metadata = gguf_header.read_metadata(checkpoint.path / next(iter(checkpoint.plan.ggufs.values()))[0])
        return "embedding" if f"{metadata.get('general.architecture')}.pooling_type" in metadata else "chat"
    if "modules.json" in checkpoint.plan.files:
        return "embedding"
    config = hub.read_json(checkpoint.path / "config.json")
    with hub.reading("config.json"):
        return "vision" if convert.is_vision_model(config) else "chat"


def _embedding_context(checkpoint: hub.Checkpoint) -> int | None:
    """sentence-transformers' max_seq_length: its pipeline cuts longer inputs there, so Ollama must too."""
    config = checkpoint.path / "sentence_bert_config.json"
    length = hub.read_json(config).get("max_seq_length") if config.is_file() else None
    return length if isinstance(length, int) and length > 0 else None


def _describe(settings: Settings, task: str, info: modelfile.TokenizerInfo, ggufs: dict[str, Path],
              projector: Path | None, license_text: str, embedding_context: int | None,
              chat_format: modelfile.ChatFormat | None,
              sampling: tuple[tuple[str, Any, str], ...]) -> tuple[modelfile.ModelSpec, int]:
    """The model's spec, and for an embedding model its embedding size (else 0)."""
    default_gguf = ggufs[settings.quantizations[0]]
    if task == "embedding" or chat_format is None:
        size = convert.check_embedding_model(gguf_header.read_metadata(default_gguf), _source_input(settings))
        parameters = settings.parameters
        if embedding_context and "num_ctx" not in dict(parameters):
            parameters = (*parameters, ("num_ctx", embedding_context))
            github.log(f"num_ctx {embedding_context}: inputs are cut where sentence-transformers cuts them "
                       "(its max_seq_length)")
        github.log(f"embedding model ({size} dimensions): no chat template, no stop tokens")
        return modelfile.ModelSpec(template="", system="", parameters=parameters, license=license_text,
                                   source=settings.source_label), size
    return _describe_model(settings, info, license_text, chat_format, sampling), 0


def _check_system_support(settings: Settings, formats: list[modelfile.ChatFormat]) -> None:
    if settings.system and not all(chat_format.supports_system for chat_format in formats):
        raise InputError("The checkpoint's chat template has no system turn (it refuses or drops system messages), "
                         "so the system prompt would never reach the model as it was trained. Remove the system "
                         "input, or set the template input to a catalog template that places it.",
                         input_name="system")


def _sampling(settings: Settings, checkpoint: hub.Checkpoint) -> tuple[tuple[str, Any, str], ...]:
    """Sampling parameters and where each comes from: the parameters input wins over the checkpoint's
    generation_config.json."""
    own = {name: value for name, value in settings.parameters}
    folder = checkpoint.adapter or checkpoint.path
    found = modelfile.sampling_defaults(folder, base=checkpoint.path) if checkpoint.plan.kind != "gguf" else ()
    chosen = [(name, own.get(name, value), "parameters input" if name in own else "generation_config.json")
              for name, value in found]
    chosen += [(name, own[name], "parameters input") for name in modelfile.SAMPLING_FIELDS.values()
               if name in own and name not in dict(found)]
    for name, value, source in chosen:
        github.log(f"sampling: {name} {value} ({source})")
    return tuple(chosen)


def _chat_smoke_test(client: OllamaClient, settings: Settings, name: str, task: str, tools: bool) -> str:
    answer = checks.smoke_test(client, name, settings.smoke_test_prompt, settings.parameters, tools)
    return f"{answer} ({checks.vision_smoke_test(client, name)})" if task == "vision" else answer


def _source_input(settings: Settings) -> str:
    return "model-path" if settings.model_path else "hf-repo"


def _tokenizer_info(checkpoint: hub.Checkpoint) -> modelfile.TokenizerInfo:
    if checkpoint.plan.kind == "gguf":  # a GGUF carries its chat template and special tokens in its metadata
        first = checkpoint.path / next(iter(checkpoint.plan.ggufs.values()))[0]  # split files: the first part
        return modelfile.tokenizer_info_from_gguf(gguf_header.read_metadata(first))
    return modelfile.read_tokenizer_info(_tokenizer_folder(checkpoint), base=checkpoint.path)


def _tokenizer_folder(checkpoint: hub.Checkpoint) -> Path:
    """A fine-tune's adapter repo usually carries its own tokenizer and chat template: they win over the base's."""
    if checkpoint.adapter and (checkpoint.adapter / "tokenizer_config.json").is_file():
        return checkpoint.adapter
    return checkpoint.path


def _describe_model(settings: Settings, info: modelfile.TokenizerInfo, license_text: str,
                    chat_format: modelfile.ChatFormat, sampling: tuple[tuple[str, Any, str], ...]
                    ) -> modelfile.ModelSpec:
    """Template, stop tokens, system prompt, parameters and license of every tag."""
    stops = modelfile.stop_tokens(chat_format, info)
    system = chat_format.system_prompt(settings.system)
    github.log(f"chat template: {chat_format.name}; stop tokens: {', '.join(stops) or '(none)'}")
    if chat_format.default_system and not system:
        github.log(f"default system prompt, which the template writes in a chat without one: "
                   f"{chat_format.default_system}")
    user_stops = [v for n, v in settings.parameters if n == "stop"]
    defaults = tuple((name, value) for name, value, source in sampling if source == "generation_config.json")
    parameters = tuple(("stop", s) for s in stops if s not in user_stops) + defaults + settings.parameters
    return modelfile.ModelSpec(template=chat_format.template, system=system, parameters=parameters,
                               license=license_text, source=settings.source_label, renderer=chat_format.renderer,
                               parser=chat_format.parser)


def _gguf_path(settings: Settings, quantization: str) -> Path:
    return settings.output_dir / f"{settings.model_name.model}-{quantize.tag_suffix(quantization)}.gguf"


def _extra_path(settings: Settings, what: str) -> Path:
    return settings.output_dir / f"{settings.model_name.model}-{what}.gguf"


def _intermediate_type(settings: Settings, merging: bool) -> str:
    """Convert straight to the one type asked for when the converter writes it (and neither an adapter merge
    nor llama-quantize's options come between); else to a 16/32-bit intermediate every quantization reads."""
    quants = settings.quantizations
    if len(quants) == 1 and quants[0] in quantize.CONVERTER_TYPES and not (merging or _quantize_options_set(settings)):
        return quants[0]
    return next((t for t in ("F32", "BF16") if t in quants), "F16")


def _quantize_options_set(settings: Settings) -> bool:
    return bool(settings.imatrix or settings.imatrix_calibration or settings.output_tensor_type
                or settings.token_embedding_type)


def _build_ggufs(settings: Settings, checkpoint: hub.Checkpoint, scratch: Path, projector: Path | None,
                 seal: process.Seal) -> dict[str, Path]:
    """Convert once (and the vision projector to `projector`, when given), merge a LoRA adapter, quantize
    to each requested type, and delete what is consumed as soon as it is."""
    quants = settings.quantizations
    model_label = settings.hf_repo.split("/")[-1] if settings.hf_repo else Path(settings.model_path or "model").name
    merging = checkpoint.adapter is not None
    intermediate_type = _intermediate_type(settings, merging)
    intermediate = scratch / f"intermediate-{intermediate_type.lower()}.gguf"
    convert.convert(checkpoint.path, intermediate, quantize.CONVERTER_TYPES[intermediate_type], model_label, seal)
    if projector:
        with quantize.written_whole(projector) as partial:
            convert.convert_projector(checkpoint.path, partial, seal)
    adapter = scratch / "adapter-f16.gguf"
    if checkpoint.adapter is not None:
        convert.convert_adapter(checkpoint.adapter, checkpoint.path, adapter, seal)
    if not settings.model_path or merging:
        shutil.rmtree(checkpoint.path, ignore_errors=True)  # the downloaded weights are no longer needed
    if merging:
        merged = scratch / "merged.gguf"
        github.log("merging the adapter into the base model")
        convert.merge_adapter(intermediate, adapter, merged, seal)
        adapter.unlink()
        os.replace(merged, intermediate)
        github.log(f"{intermediate.name} now holds the base model with the adapter merged: it is what is quantized")
    to_quantize = [q for q in quants if q != intermediate_type]
    imatrix = settings.imatrix
    if settings.imatrix_calibration and to_quantize:
        imatrix = scratch / "imatrix.gguf"
        github.log(f"computing the importance matrix over {settings.imatrix_calibration.name}")
        quantize.compute_imatrix(intermediate, settings.imatrix_calibration, imatrix, seal)
    options = quantize.Options(imatrix=imatrix, output_tensor_type=settings.output_tensor_type,
                               token_embedding_type=settings.token_embedding_type)
    ggufs = {}
    for quant in to_quantize:
        github.log(f"quantizing to {quant}")
        quantize.quantize(intermediate, _gguf_path(settings, quant), quant, seal, options)
        ggufs[quant] = _gguf_path(settings, quant)
    if intermediate_type in quants:
        os.replace(intermediate, _gguf_path(settings, intermediate_type))  # same filesystem: a rename
        ggufs[intermediate_type] = _gguf_path(settings, intermediate_type)
    intermediate.unlink(missing_ok=True)
    for quant in quants:
        github.log(f"{ggufs[quant].name}: {ggufs[quant].stat().st_size / 1e6:.1f} MB")
    return {q: ggufs[q] for q in quants}


def _take_ggufs(settings: Settings, checkpoint: hub.Checkpoint, seal: process.Seal) -> dict[str, Path]:
    """The repo's own GGUF files under the names converted ones get: moved when downloaded, else linked
    (or copied, across filesystems) so that a local model-path folder is left as it was. Split files are
    merged into one: Ollama 0.34 creates split models but marks them as needing Ollama 0.35, and older
    versions load one file only."""
    if _quantize_options_set(settings):
        github.warning("imatrix, imatrix-calibration, output-tensor-type and token-embedding-type are ignored: the "
                       "repo's GGUF files are published as they are.")
    ggufs = {}
    for quant, parts in checkpoint.plan.ggufs.items():
        name, source, target = parts[0], checkpoint.path / parts[0], _gguf_path(settings, quant)
        target.unlink(missing_ok=True)
        if len(parts) > 1:
            quantize.merge_split(source, target, seal)
            if not settings.model_path:
                for part in parts:
                    (checkpoint.path / part).unlink()
        elif not settings.model_path:
            os.replace(source, target)
        else:
            try:
                os.link(source, target)
            except OSError:
                with quantize.written_whole(target) as partial:
                    shutil.copyfile(source, partial)
        github.log(f"{name} -> {target.name}: {target.stat().st_size / 1e6:.1f} MB")
        ggufs[quant] = target
    return ggufs


def _write_modelfile(settings: Settings, spec: modelfile.ModelSpec, ggufs: dict[str, Path],
                     projector: Path | None) -> Path:
    default_gguf = ggufs[settings.quantizations[0]]
    path = settings.output_dir / "Modelfile"
    text = modelfile.render_modelfile(spec, default_gguf.name, projector.name if projector else "")
    with quantize.written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")
    github.log(text)
    return path


def _create(client: OllamaClient, settings: Settings, spec: modelfile.ModelSpec, ggufs: dict[str, Path],
            digests: dict[str, str], projector: tuple[str, str] | None) -> list[TagResult]:
    results = []
    for quant, tag in settings.tags:
        name = settings.model_name.with_tag(tag)
        github.log(f"creating {name}")
        client.create(modelfile.create_request(spec, name, digests[quant], ggufs[quant].name, projector))
        digest, size = client.model_digest(name)
        results.append(TagResult(tag=tag, name=name, quantization=quant, gguf=ggufs[quant], digest=digest, size=size))
    return results


def _prove_template(client: OllamaClient, settings: Settings, spec: modelfile.ModelSpec,
                    chat_format: modelfile.ChatFormat, info: modelfile.TokenizerInfo,
                    caps: chat_jinja.Capabilities, ggufs: dict[str, Path],
                    digests: dict[str, str], results: list[TagResult], projector: tuple[str, str] | None
                    ) -> tuple[modelfile.ModelSpec, list[TagResult], str, list[checks.ParityFailure] | None]:
    """Prompt parity and capabilities of the created models: (spec, results and rendering, maybe pinned;
    the failures, None when nothing was checked).

    Parity runs once per release, on the smallest quantization (the quickest to load): every quantization
    has the same template and the same tokenizer (llama-quantize copies the metadata), so the same prompts.
    It is checked on every rendering users' Ollama may use (checks.renderings_to_check), with the tools and
    thinking conversations the checkpoint's template supports. When only the GGUF's Jinja, which Ollama
    prefers, fails (llama-server renders it other than transformers, or the GGUF's copy is stale) the
    TEMPLATE is pinned. Then the models must offer the checkpoint's tools (and should offer its thinking)."""
    rendering = checks.selected_rendering(client.show(results[0].name), spec.template)
    if settings.prompt_parity == "off":
        return spec, results, rendering, None
    if not info.chat_template:
        github.warning("prompt parity not checked: the checkpoint has no chat template to compare with")
        return spec, results, rendering, None
    quant = min(ggufs, key=lambda q: ggufs[q].stat().st_size)
    name = next(r.name for r in results if r.quantization == quant)
    renderings = checks.renderings_to_check(rendering, spec.template)
    github.log(f"prompt parity of {name} with the checkpoint's chat template (the same for every quantization), "
               f"as Ollama renders it [{', '.join(renderings)}]:")
    body = modelfile.create_request(spec, name, digests[quant], ggufs[quant].name)
    failures, compared = checks.prompt_parity(client, name, body, info, convert.adds_bos(ggufs[quant]), renderings,
                                              caps, chat_format.leading_bos)
    if not compared:
        message = ("Prompt parity compared nothing: the checkpoint's own chat template could render none of the "
                   "conversations (see the warnings). Nothing proves Ollama's prompts; set the template input, or "
                   "prompt-parity: warn to publish anyway.")
        if settings.prompt_parity == "fail":
            raise CheckFailed(message, input_name="template", title="Prompt parity failed")
        github.warning(message)
        return spec, results, rendering, None
    if checks.pins_template(failures, renderings):
        github.warning(f"Ollama would render the prompts of {name} with the GGUF's own Jinja chat template, in "
                       "llama-server (it supports more than the TEMPLATE: tools, thinking), and that builds other "
                       f"prompts than the checkpoint for {len(failures)} conversations; the TEMPLATE builds the same. "
                       f"The models pin the TEMPLATE (PARSER {checks.PIN_PARSER}), so Ollama renders that.\n"
                       + checks.explain(failures))
        spec = dataclasses.replace(spec, parser=checks.PIN_PARSER)
        results = _create(client, settings, spec, ggufs, digests, projector)
        rendering = checks.selected_rendering(client.show(results[0].name), spec.template)
        failures = []
    show = client.show(name)
    failures += checks.capability_failures(caps, show)
    if not failures and checks.missing_thinking(caps, show):
        github.warning(f"The checkpoint's chat template thinks, and {name} does not offer thinking: Ollama "
                       f"{client.version()} leaves the reasoning in the answer (it splits it off only between tags it "
                       "knows, such as <think>). The prompts are the checkpoint's.")
    return spec, results, rendering, failures


def _reasoning_dropped(client: OllamaClient, name: str, failures: list[checks.ParityFailure]) -> str:
    """Warn that the published prompts lack the conversation's reasoning; returns the summary's sentence."""
    caveat = (f"Ollama {client.version()} passes no assistant turn's thinking to llama-server, which renders these "
              "prompts with the checkpoint's Jinja: a conversation that sends the model's reasoning back (between "
              "tool calls, say) reaches the model without it, where the checkpoint's template writes it. Every "
              "other prompt compared is the checkpoint's; these lack the reasoning: "
              f"{', '.join(dict.fromkeys(f.conversation for f in failures))}.")
    github.warning(f"{name}: {caveat}\n" + checks.explain(failures))
    return caveat


def _failure_headline(failures: list[checks.ParityFailure]) -> str:
    return f"{len(failures)} failed checks ({', '.join(dict.fromkeys(f.conversation for f in failures))})"


def _parity_failed(settings: Settings, name: str, failures: list[checks.ParityFailure]) -> None:
    message = (f"Prompt parity failed for {name}: Ollama builds other prompts than the checkpoint's own chat "
               f"template, or offers other capabilities: {_failure_headline(failures)}. Set the template input to "
               "the right template (or prompt-parity: warn to publish anyway).\n" + checks.explain(failures))
    if settings.prompt_parity == "fail":
        raise CheckFailed(message, input_name="template", title="Prompt parity failed")
    github.warning(message)


def _smoke_test(client: OllamaClient, settings: Settings, results: list[TagResult],
                test: Callable[[str], str]) -> None:
    """Once per quantization (the tags of one quantization are the same model): `test(name)` raises or
    returns the account shown in the summary."""
    if not settings.smoke_test:
        github.warning("smoke test skipped (smoke-test: false): nothing proves the models work")
        return
    answers: dict[str, str] = {}
    for result in results:
        if result.digest not in answers:
            answers[result.digest] = test(result.name)
        result.answer = answers[result.digest]


def _layers(manifest: dict[str, Any]) -> list[str]:
    return sorted(layer["digest"] for layer in manifest.get("layers", []))


def _blobs(manifest: dict[str, Any]) -> tuple[str, ...]:
    """Every blob a manifest names: its config, then its layers."""
    return (manifest.get("config", {}).get("digest", ""), *_layers(manifest))


def _already_published(client: OllamaClient, settings: Settings, results: list[TagResult]) -> set[str]:
    """Check every tag in the registry before pushing any. Returns the tags that already hold exactly
    these layers (a re-run skips them). A version tag holding other content is refused: published
    versions are immutable unless overwrite is set; tags without the version (latest, ...) move."""
    name = settings.model_name
    identical = set()
    for result in results:
        try:
            found = _manifest(settings, result.tag)
        except RegistryError as exc:
            if name.is_ollama_com:  # private models cannot be read anonymously: push and let the registry decide
                github.warning(f"Could not check {result.name} in the registry before pushing: {exc}")
                continue
            raise
        if found is None:
            continue
        local = client.local_manifest(name.host, name.namespace, name.model, result.tag)
        if local is not None and _layers(json.loads(local)) == _layers(found[1]):
            identical.add(result.tag)
            result.registry_digest, result.layers = found[0], _blobs(found[1])
            github.log(f"{result.name} is already published with the same layers; not pushing it again")
        elif result.tag in settings.immutable_tags and not settings.overwrite:
            raise CheckFailed(f"{result.name} is already published with different content, and published versions "
                              "are immutable. Release a new version, or set overwrite: true to replace it.",
                              input_name="overwrite", title="Version already published")
    return identical


def _manifest(settings: Settings, tag: str) -> tuple[str, dict] | None:
    name = settings.model_name
    return retry.retrying(lambda: registry.fetch_manifest(name, tag, insecure=settings.insecure_registry),
                          f"reading {name.with_tag(tag)} in the registry")


def _progress_logger() -> Callable[[dict[str, Any]], None]:
    """Logs a push's or pull's status lines, each blob's progress in steps of 25%."""
    reported: dict[str, int] = {}

    def progress(line: dict[str, Any]) -> None:
        status, total = line.get("status", ""), line.get("total") or 0
        step = int(100 * (line.get("completed") or 0) / total) // 25 * 25 if total else -1
        if reported.get(status) != step:
            reported[status] = step
            github.log(f"  {status}" + (f" {step}%" if step >= 0 else ""))

    return progress


def _push(client: OllamaClient, settings: Settings, results: list[TagResult]) -> None:
    skip = _already_published(client, settings, results)
    for result in results:
        if result.tag in skip:
            result.pushed = True
            continue
        github.log(f"pushing {result.name}")
        # A re-push resumes: blobs the registry already has are skipped. Refusals are not retried, nor is
        # Ollama gone (OllamaUnreachable is never retriable).
        retry.retrying(functools.partial(client.push, result.name, settings.insecure_registry, _progress_logger()),
                       f"pushing {result.name}")
        _verify_pushed(client, settings, result)
        result.pushed = True


def _verify_pushed(client: OllamaClient, settings: Settings, result: TagResult) -> None:
    """Read the manifest back from the registry. With our own server's manifest file at hand, the registry
    must hold exactly that manifest (Ollama pushes the file without its final newline): the config and
    layers built and checked here. Without it (ollama-host), the manifest must at least have a model layer.
    """
    name = settings.model_name
    try:
        found = _manifest(settings, result.tag)
    except RegistryError as exc:
        if name.is_ollama_com:  # private models cannot be read back anonymously
            github.warning(f"Pushed {result.name}, but could not read it back to verify: {exc}")
            return
        raise
    if found is None:
        raise CheckFailed(f"After pushing {result.name} the registry has no such tag.", title="Push not verified")
    result.registry_digest, remote = found
    remote_layers = _layers(remote)
    result.layers = _blobs(remote)
    local = client.local_manifest(name.host, name.namespace, name.model, result.tag)
    if local is not None:
        expected = "sha256:" + hashlib.sha256(local.removesuffix(b"\n")).hexdigest()
        if result.registry_digest != expected:
            raise CheckFailed(f"After pushing {result.name} the registry holds manifest {result.registry_digest}, "
                              f"not {expected}, the one Ollama built (layers there: {remote_layers}).",
                              title="Push not verified")
    elif not any(layer.get("mediaType") == "application/vnd.ollama.image.model" for layer in remote.get("layers", [])):
        raise CheckFailed(f"The registry's manifest for {result.name} has no model layer.", title="Push not verified")
    github.log(f"  verified in the registry: manifest {result.registry_digest}, {len(remote_layers)} layers")


def _pull_back(settings: Settings, scratch: Path, results: list[TagResult],
               smoke: Callable[[OllamaClient, str], str]) -> None:
    """The proof a user's `ollama pull` works: a second Ollama with nothing of its own (models, blobs, HOME)
    pulls every pushed tag, must hold exactly the blobs the registry verified, and answers the smoke test
    once per quantization. One quantization at a time, deleted once checked, so the disk holds one copy."""
    root = scratch / "pull-back"
    name = settings.model_name
    try:
        with serve(root / "ollama.log", root / "models", root / "home", settings.ollama_key,
                   bind=free_loopback_address()) as empty:
            by_quantization: dict[str, list[TagResult]] = {}
            for result in results:
                by_quantization.setdefault(result.quantization, []).append(result)
            for tagged in by_quantization.values():
                for result in tagged:
                    retry.retrying(functools.partial(empty.pull, result.name, settings.insecure_registry,
                                                     _progress_logger()), f"pulling {result.name}")
                    pulled = empty.local_manifest(name.host, name.namespace, name.model, result.tag)
                    blobs = _blobs(json.loads(pulled)) if pulled is not None else ()
                    if blobs != result.layers:
                        raise CheckFailed(f"An empty Ollama pulled {result.name} with blobs {list(blobs)}, not "
                                          f"{list(result.layers)}, the ones pushed.", title="Pull check failed")
                account = smoke(empty, tagged[0].name) if settings.smoke_test else "pulled"
                github.log(f"{tagged[0].quantization}: pulled by an empty Ollama, same blobs; {account}")
                for result in tagged:
                    empty.delete(result.name)
                    result.pulled = True
    except (RegistryError, CheckFailed) as exc:
        message = (f"Pushed, but an empty Ollama could not use what it pulled from {name.host}: {exc.message}"
                   if isinstance(exc, CheckFailed) else
                   f"Pushed, but an empty Ollama could not pull it back from {name.host}, so users cannot "
                   f"either: {exc.message}")
        if settings.pull_check == "fail":
            raise CheckFailed(message + " (Set pull-check: warn to accept this.)", input_name="pull-check",
                              title="Pull check failed") from exc
        github.warning(message)
    finally:
        shutil.rmtree(root, ignore_errors=True)
