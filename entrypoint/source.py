"""Stage 2: what is published, fetched in two steps and read once.

The repository's other files first (config, tokenizer, chat template, license): no declared code, an
architecture the converter supports, a chat template that renders within its limits and makes a Modelfile
(for a repo of GGUF files the template is in them, so it is checked once they are here); then the preflight,
then the weights, whose headers must agree with config.json. The facts the later stages need are read here,
once: the task, the tokenizer and chat template facts, the sampling defaults, the license, and the memory
limit of the tools that will read the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import chat_jinja, checks, convert, feed, ggufs, github, gguf_header, hub, modelfile, preflight, process
from .errors import InputError, LimitExceeded, NotEnoughResources, ParityFailed, RepoRefused
from .ollama import OllamaClient
from .settings import Settings

TASK_NOTES = {"chat": "", "embedding": "; an embedding model", "vision": "; a vision model, with its projector"}


@dataclasses.dataclass(frozen=True)
class Chat:
    """A chat model's template facts: its tokenizer, what its chat template writes, and the candidate Ollama
    templates read off it (for a GGUF whose tokenizer adds no BOS: candidates_for makes them again if it does)."""

    info: modelfile.TokenizerInfo
    capabilities: chat_jinja.Capabilities
    formats: list[modelfile.ChatFormat]


@dataclasses.dataclass(frozen=True)
class Source:
    checkpoint: hub.Checkpoint
    task: str  # "chat", "vision" or "embedding"
    chat: Chat | None  # None for an embedding model
    sampling: tuple[tuple[str, Any, str], ...]  # (parameter, value, where it came from)
    embedding_context: int | None  # an embedding model's longest input (sentence-transformers' max_seq_length)
    license_text: str
    seal: process.Seal  # how the tools that read its weights run

    @property
    def path_taken(self) -> str:
        return self.checkpoint.plan.why + TASK_NOTES[self.task]


def fetch(settings: Settings, scratch: Path, client: OllamaClient) -> Source:
    """The checkpoint, checked before and after its weights are downloaded, and its facts."""
    with _blaming(input_name(settings)):
        checkpoint, chat = _fetch_checkpoint(settings, scratch, client)
        seal = process.Seal(memory_bytes=preflight.tool_memory(0), input_name=input_name(settings))
        if checkpoint.plan.kind != "gguf":  # the converter trusts config.json: it must match the weights
            shapes = convert.safetensors_shapes(checkpoint.path)
            convert.check_config_matches_weights(hub.read_json(checkpoint.path / "config.json"), shapes,
                                                 input_name(settings))
            seal = dataclasses.replace(seal, memory_bytes=preflight.tool_memory(convert.largest_tensor(shapes)))
            task = _task(checkpoint)
        else:  # a repo of GGUF files: what it is and its template are in them (the first, or first part)
            metadata = gguf_header.read_metadata(checkpoint.path / next(iter(checkpoint.plan.ggufs.values()))[0])
            task = "embedding" if f"{metadata.get('general.architecture')}.pooling_type" in metadata else "chat"
            chat = _chat(settings, modelfile.tokenizer_info_from_gguf(metadata)) if task == "chat" else None
        license_text = modelfile.read_license(checkpoint.adapter or checkpoint.path) or \
            modelfile.read_license(checkpoint.path)
        return Source(checkpoint=checkpoint, task=task, chat=chat if task != "embedding" else None,
                      sampling=_sampling(settings, checkpoint) if task != "embedding" else (),
                      embedding_context=_embedding_context(checkpoint) if task == "embedding" else None,
                      license_text=license_text, seal=seal)


def candidates_for(settings: Settings, chat: Chat, adds_bos: bool) -> list[modelfile.ChatFormat]:
    """The candidate templates for the GGUF: those read before it existed, unless its tokenizer adds BOS
    itself (then a derived template must not write it: they are read off again)."""
    if not adds_bos:
        return chat.formats
    return modelfile.candidate_formats(settings.template, chat.info, settings.workspace, bos_added=True,
                                       caps=chat.capabilities)


def _fetch_checkpoint(settings: Settings, scratch: Path, client: OllamaClient
                      ) -> tuple[hub.Checkpoint, Chat | None]:
    """Decide how to publish the repo; download its other files first and check them (_check_descriptions:
    its chat facts, None for a repo of GGUF files or an embedding model), check that the whole run fits on
    disk and in memory, then download the weights."""
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
    chat = _check_descriptions(settings, checkpoint, input_name(settings)) \
        if checkpoint.plan.kind == "transformers" else None
    streaming = remote is not None and streams_weights(settings, checkpoint)
    window = 0
    if remote is not None and streaming:  # the headers (kilobytes) tell the largest tensor: the download's window
        weights = {name: remote.sizes[name] for name in remote.weights()}
        feed.headers(hub.endpoint(), remote.repo, remote.commit, settings.hf_token, destination, weights)
        window = feed.window_bytes(destination, weights)
    if settings.resource_check != "off":
        _check_resources(settings, client, scratch, checkpoint.plan, sizes, weights_streamed=streaming,
                         window=window)
    if remote is not None and streaming:
        github.log(f"the weights ({sum(weights.values()) / 1e9:.2f} GB) stream from the Hub while they are "
                   "converted: only their headers are on disk now")
        checkpoint = dataclasses.replace(checkpoint, streamed_from=remote)
    elif remote is not None:
        hub.download(remote, settings.hf_token, destination, remote.weights())
    return checkpoint, chat


def streams_weights(settings: Settings, checkpoint: hub.Checkpoint) -> bool:
    """Whether the weights can stream from the Hub while they are converted (feed.py): a chat model's
    safetensors going through the one pass. (A vision model's projector and an embedding model's extra
    modules are converted from whole files.)"""
    return checkpoint.plan.kind == "transformers" and not ggufs.why_not_streamed(settings, merging=False) and \
        _task(checkpoint) == "chat" and all(f.endswith(".safetensors") for f in checkpoint.plan.files
                                            if f.endswith(hub.WEIGHT_SUFFIXES))


@contextlib.contextmanager
def _blaming(input_name: str) -> Iterator[None]:
    """A refusal of the repository's files that names no input names `input_name`, which gave the repository."""
    try:
        yield
    except RepoRefused as exc:
        exc.input_name = exc.input_name or input_name
        raise


def _check_descriptions(settings: Settings, checkpoint: hub.Checkpoint, input_name: str) -> Chat | None:
    """Before any weights are downloaded or read: the checkpoint (and a LoRA adapter) declares no code of its
    own, the converter supports it, and its chat template renders within its limits and makes a Modelfile.
    Returns its chat facts (None for an embedding model)."""
    with _blaming(input_name):
        convert.check_no_custom_code([checkpoint.path], input_name)
        architectures = convert.supported_architectures()
        config = hub.read_json(checkpoint.path / "config.json")
        with hub.reading("config.json"):
            convert.check_architecture(config, architectures, input_name=input_name)
            convert.check_encoder_has_pooling(config, architectures, "modules.json" in checkpoint.plan.files,
                                              input_name=input_name)
        if "modules.json" in checkpoint.plan.files:  # an embedding model: no chat
            return None
        return _chat(settings, _tokenizer_info(checkpoint))


def _chat(settings: Settings, info: modelfile.TokenizerInfo) -> Chat:
    """The chat facts, checked: the template renders the plain conversations (at least one) within its
    limits, a Modelfile can be made of it, and it places the system input. A template past a limit is
    refused naming its file."""
    try:
        caps = chat_jinja.capabilities(info.chat_template, bos_token=info.bos_token,
                                       eos_token=(info.eos_tokens or ("",))[0]) \
            if info.chat_template else chat_jinja.NO_CAPABILITIES
        formats = modelfile.candidate_formats(settings.template, info, settings.workspace, caps=caps)
        failures = checks.plain_rendering_failures(info) if settings.prompt_parity != "off" else []
        if failures:
            message = (f"The checkpoint's own chat template ({info.template_file}) renders none of the plain "
                       f"conversations the parity check compares ({'; '.join(failures)}), so nothing could prove "
                       "Ollama's prompts. Set the template input, or prompt-parity: warn to publish anyway.")
            if settings.prompt_parity == "fail":
                raise ParityFailed(message)
            github.warning(message)
    except LimitExceeded as exc:
        exc.message = f"{info.template_file}: {exc.message}"
        raise
    _check_system_support(settings, formats)
    return Chat(info=info, capabilities=caps, formats=formats)


def _fetch_base(settings: Settings, scratch: Path, client: OllamaClient, remote: hub.RemoteCheckpoint | None,
                adapter: Path, adapter_sizes: dict[str, int]) -> tuple[hub.Checkpoint, Chat | None]:
    """A LoRA adapter's base model, from base-model or the adapter's own config: the other files of both are
    checked before the base's weights are downloaded."""
    adapter_config = hub.read_json(adapter / "adapter_config.json")
    with hub.reading("adapter_config.json"):
        convert.check_adapter(adapter_config, input_name(settings))
    convert.check_no_custom_code([adapter], input_name(settings))
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
    chat = _check_descriptions(settings, checkpoint, "base-model")
    if settings.resource_check != "off":
        _check_resources(settings, client, scratch, repo_plan, {**base.sizes, **adapter_sizes})
    if remote:
        hub.download(remote, settings.hf_token, adapter, remote.weights())
    hub.download(base, settings.hf_token, base_dir, base.weights())
    return checkpoint, chat


def _check_resources(settings: Settings, client: OllamaClient, scratch: Path, repo_plan: hub.Plan,
                     sizes: dict[str, int], weights_streamed: bool = False, window: int = 0) -> None:
    try:
        _estimate_resources(settings, client, scratch, repo_plan, sizes, weights_streamed, window)
    except NotEnoughResources as exc:
        if settings.resource_check != "warn":
            raise
        github.warning(f"{exc.message} (resource-check: warn, so the run goes on)")


def _estimate_resources(settings: Settings, client: OllamaClient, scratch: Path, repo_plan: hub.Plan,
                        sizes: dict[str, int], weights_streamed: bool, window: int) -> None:
    folders = {"work": scratch, "outputs": settings.output_dir}
    if client.models_dir is not None:
        folders["ollama"] = client.models_dir
    # Our own server gets the GGUFs as hard links (OllamaClient.upload_blob) when it can.
    linked = client.models_dir is not None and preflight.same_filesystem(client.models_dir, settings.output_dir)
    # The pull-back downloads the weights again only when it cannot link them (publish._take_weights).
    pulls_weights = settings.push and not linked
    # A LoRA's base always comes from the Hub; weights streamed from it are never on disk whole.
    downloaded = (not settings.model_path or repo_plan.kind == "lora") and not weights_streamed
    if repo_plan.kind == "gguf":
        gguf_sizes = {q: sum(sizes[f] for f in parts) for q, parts in repo_plan.ggufs.items()}
        split = sum(size for q, size in gguf_sizes.items() if len(repo_plan.ggufs[q]) > 1)
        largest = max(gguf_sizes, key=gguf_sizes.__getitem__)
        model_bytes = gguf_sizes[largest]
        phases = preflight.estimate_gguf(sum(gguf_sizes.values()), downloaded, ollama_copies=not linked,
                                         split_bytes=split, pulled_bytes=model_bytes if pulls_weights else 0)
    else:
        size = sum(sizes.values())
        merging = repo_plan.kind == "lora"
        streamed = not ggufs.why_not_streamed(settings, merging)
        phases = preflight.estimate(size, settings.quantizations,
                                    None if streamed else ggufs.intermediate_type(settings, merging),
                                    downloaded=downloaded, ollama_copies=not linked, merging=merging,
                                    pull_back=pulls_weights, window=window)
        largest, model_bytes = preflight.largest_quantized(size, settings.quantizations)
    preflight.check_disk(phases, folders)
    preflight.check_memory(model_bytes, largest)


def _task(checkpoint: hub.Checkpoint) -> str:
    """A checkpoint's task: 'embedding' for a sentence-transformers checkpoint (its modules.json gives the
    converter the pooling), 'vision' for one with an image encoder the converter writes as a projector, else
    'chat'. (A repo of GGUF files tells by its pooling type: fetch.)"""
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


def input_name(settings: Settings) -> str:
    """The input that names the repository, which a refusal of its files names."""
    return "model-path" if settings.model_path else "hf-repo"


def _tokenizer_info(checkpoint: hub.Checkpoint) -> modelfile.TokenizerInfo:
    return modelfile.read_tokenizer_info(_tokenizer_folder(checkpoint), base=checkpoint.path)


def _tokenizer_folder(checkpoint: hub.Checkpoint) -> Path:
    """A fine-tune's adapter repo usually carries its own tokenizer and chat template: they win over the base's."""
    if checkpoint.adapter and (checkpoint.adapter / "tokenizer_config.json").is_file():
        return checkpoint.adapter
    return checkpoint.path
