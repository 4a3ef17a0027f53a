"""The action's inputs: read once (from INPUT_* variables or CLI flags), validated up front."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm

from . import hub, modelfile, quantize, registry
from .errors import InputError
from .registry import ModelName

# Input name -> default. action.yml declares the same inputs with the same defaults (a test checks).
INPUTS: dict[str, str] = {
    "hf-repo": "",
    "hf-revision": "main",
    "hf-token": "",
    "model-path": "",
    "repo-kind": "auto",
    "allow-pickle": "false",
    "base-model": "",
    "base-revision": "main",
    "ollama-model": "",
    "quantizations": "Q4_K_M",
    "imatrix-calibration": "",
    "imatrix": "",
    "output-tensor-type": "",
    "token-embedding-type": "",
    "tags": "",
    "version": "",
    "template": "auto",
    "system": "",
    "parameters": "",
    "smoke-test": "fail",
    "smoke-test-prompt": "What is the capital of France?",
    "prompt-parity": "fail",
    "push": "true",
    "overwrite": "false",
    "pull-check": "fail",
    "ollama-key": "",
    "insecure-registry": "false",
    "ollama-host": "",
    "output-dir": "ollama-publish-out",
    "resource-check": "fail",
}
SECRET_INPUTS = ("hf-token", "ollama-key")

# Modelfile PARAMETER names Ollama 0.34 accepts (api.Options; typical_p is refused since 0.30).
PARAMETER_TYPES: dict[str, type] = {
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": str, "num_ctx": int, "num_batch": int,
    "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
}
_OLLAMA_HOST = re.compile(r"^(https?://)?[A-Za-z0-9.-]+(:\d{1,5})?/?$")
_KEY_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_KEY_END = "-----END OPENSSH PRIVATE KEY-----"
DEFAULT_TAG_PATTERNS = ("{version}-{quant}", "{version}", "latest")
UNVERSIONED_TAG_PATTERNS = ("{quant}", "latest")  # when not run for a release tag


@dataclasses.dataclass(frozen=True)
class Settings:
    hf_repo: str
    hf_revision: str
    hf_token: str
    model_path: Path | None
    repo_kind: str  # auto, transformers or gguf (hub.plan)
    allow_pickle: bool
    base_model: str  # a LoRA adapter's base on the Hub; '' takes adapter_config.json's
    base_revision: str
    model_name: ModelName
    quantizations: tuple[str, ...]
    imatrix_calibration: Path | None  # a text file: the action computes the importance matrix from it
    imatrix: Path | None  # a ready importance matrix
    output_tensor_type: str  # '' or a quantize.TENSOR_TYPES entry
    token_embedding_type: str
    tags: tuple[tuple[str, str], ...]  # (quantization, tag), in push order
    template: str
    system: str
    parameters: tuple[tuple[str, str | int | float | bool], ...]
    smoke_test: str  # fail (default), warn or off: CHECK_MODES
    smoke_test_prompt: str
    prompt_parity: str  # fail (default), warn or off
    push: bool
    overwrite: bool  # replace immutable tags that already exist with other content
    pull_check: str  # after the push an empty Ollama pulls every tag: failing that fails, warns, or no pull (off)
    immutable_tags: frozenset[str]  # tags made from a {version} pattern: a published version never changes
    ollama_key: str
    insecure_registry: bool
    ollama_host: str  # empty: start our own server
    output_dir: Path
    resource_check: str
    workspace: Path  # $GITHUB_WORKSPACE (in the container, /github/workspace), else the current directory
    deprecations: tuple[str, ...] = ()  # old input values accepted, each with what to write instead

    @property
    def source_label(self) -> str:
        return str(self.model_path) if self.model_path else f"{self.hf_repo}@{self.hf_revision}"


def read_inputs(environ: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Collect raw input strings: CLI overrides, else INPUT_<NAME> (hyphens kept, or as '_'), else default."""
    values = {}
    for name, default in INPUTS.items():
        upper = name.upper()
        value = None
        if overrides and overrides.get(name) is not None:
            value = overrides[name]
        else:
            for key in (f"INPUT_{upper}", f"INPUT_{upper.replace('-', '_')}"):
                if environ.get(key, "") != "":
                    value = environ[key]
                    break
        values[name] = default if value is None or value == "" else value
    return values


# Every check input takes one vocabulary: fail (the run stops), warn (a warning, and the run goes on) or off.
CHECK_MODES = ("fail", "warn", "off")
CHECKS = {  # input -> what its check does, for the error message
    "smoke-test": "each model answers smoke-test-prompt and stops by itself",
    "prompt-parity": "Ollama's prompts equal those of the checkpoint's own chat template",
    "pull-check": "an empty Ollama pulls every pushed tag back and gets the same blobs",
    "resource-check": "the disk and memory the run needs are there, before any download",
}
_LEGACY_CHECK_VALUES = {"true": "fail", "false": "off"}  # smoke-test and resource-check were booleans


def parse_check(name: str, text: str, deprecations: list[str]) -> str:
    """A check input's mode. The booleans smoke-test and resource-check took before are accepted, each
    noted in `deprecations` with the value that replaces it."""
    mode = text.strip().lower()
    if mode in _LEGACY_CHECK_VALUES and name in ("smoke-test", "resource-check"):
        new = _LEGACY_CHECK_VALUES[mode]
        deprecations.append(f"{name}: {mode} is deprecated and will stop working in the next major version; "
                            f"write {name}: {new} (the same check, in the vocabulary every check input uses: "
                            f"{' | '.join(CHECK_MODES)}).")
        return new
    if mode not in CHECK_MODES:
        raise InputError(f"'{text}' is not a mode of {name}, the check that {CHECKS[name]}. Use fail (the default: "
                         "the run stops), warn (a warning, and the run goes on) or off.", input_name=name)
    return mode


def parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise InputError(f"'{text}' is not a boolean. Use true or false.", input_name=name)


def _workspace_file(values: Mapping[str, str], name: str, workspace: Path) -> Path | None:
    """The file an input names, relative to the workspace; None when the input is empty."""
    text = values[name].strip()
    if not text:
        return None
    path = (workspace / text).resolve()
    if not path.is_file():
        raise InputError(f"{name} '{text}' is not a file (relative paths start at the workspace).",
                         input_name=name)
    return path


def split_list(text: str) -> list[str]:
    """Split a comma- and/or newline-separated list, dropping blanks."""
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def parse_parameters(text: str) -> tuple[tuple[str, str | int | float | bool], ...]:
    """Parse `name value` lines, as in a Modelfile's PARAMETER lines, into typed pairs."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, raw = line.partition(" ")
        name, raw = name.strip().lower(), raw.strip()
        if name not in PARAMETER_TYPES:
            raise InputError(
                f"Unknown parameter '{name}'. Ollama accepts: {', '.join(PARAMETER_TYPES)}. "
                "Write one 'name value' pair per line.", input_name="parameters")
        if not raw:
            raise InputError(f"Parameter '{name}' has no value. Write 'name value' per line.", input_name="parameters")
        kind = PARAMETER_TYPES[name]
        if kind is str:
            value: str | int | float | bool = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
        elif kind is bool:
            value = parse_bool("parameters", raw)
        else:
            try:
                value = kind(raw)
            except ValueError:
                raise InputError(f"Parameter '{name}' needs a {kind.__name__}, got '{raw}'.",
                                 input_name="parameters") from None
        pairs.append((name, value))
    return tuple(pairs)


def normalize_key(text: str) -> str:
    """Accept the private key as pasted into a secret (CRLF, escaped newlines, stray indentation)."""
    text = text.replace("\r\n", "\n").replace("\\n", "\n").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 3 or lines[0] != _KEY_BEGIN or lines[-1] != _KEY_END:
        raise InputError(
            "ollama-key is not an OpenSSH private key. Store the whole content of ~/.ollama/id_ed25519 "
            f"(from '{_KEY_BEGIN}' to '{_KEY_END}') as a repository secret.", input_name="ollama-key")
    key = "\n".join(lines) + "\n"
    try:
        registry.sign(key, b"")  # the key signs registry requests: it must be a whole, unencrypted ed25519 key
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"ollama-key cannot be read as an OpenSSH private key ({exc}). Store the whole, "
                         "unchanged content of ~/.ollama/id_ed25519 (Ollama's keys have no passphrase).",
                         input_name="ollama-key") from None
    return key


def release_version(environ: Mapping[str, str]) -> str:
    """The release a workflow runs for: the pushed tag without a leading 'v' (v1.2.0 -> 1.2.0)."""
    if environ.get("GITHUB_REF_TYPE", "tag") != "tag":
        return ""
    ref = environ.get("GITHUB_REF_NAME", "").strip()
    return ref[1:] if re.match(r"^v\d", ref) else ref


def expand_tags(patterns: list[str], quantizations: tuple[str, ...], version: str) -> tuple[tuple[str, str], ...]:
    """(quantization, tag) pairs in push order. A pattern with {quant} applies to every quantization,
    one without it to the first quantization only (the release's default). Tags naming a quantization
    come first and aliases (bare version, latest) last, so an alias never points at a tag not yet pushed."""
    result: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pattern in sorted(patterns, key=lambda p: "{quant}" not in p):
        if "{version}" in pattern and not version:
            raise InputError(
                f"Tag pattern '{pattern}' uses {{version}} but there is no version: set the 'version' input "
                "or run the workflow on a tag push.", input_name="tags")
        targets = quantizations if "{quant}" in pattern else quantizations[:1]
        for quant in targets:
            try:
                tag = pattern.format(version=version, quant=quantize.tag_suffix(quant))
            except (KeyError, IndexError, ValueError):
                raise InputError(f"Tag pattern '{pattern}' may only use {{version}} and {{quant}}.",
                                 input_name="tags") from None
            registry.validate_tag(tag)
            if tag in seen:
                raise InputError(f"Tag '{tag}' would be written twice; give each pattern a distinct result.",
                                 input_name="tags")
            seen.add(tag)
            result.append((quant, tag))
    return tuple(result)


def build_settings(values: Mapping[str, str], environ: Mapping[str, str]) -> Settings:
    """Validate every input before any work starts; the first problem raises InputError."""
    hf_repo = values["hf-repo"].strip()
    model_path_text = values["model-path"].strip()
    workspace = Path(environ.get("GITHUB_WORKSPACE") or os.getcwd())
    if hf_repo and model_path_text:
        raise InputError("Set either hf-repo or model-path, not both.", input_name="hf-repo")
    model_path = None
    if model_path_text:
        model_path = (workspace / model_path_text).resolve()
        if not model_path.is_dir():
            raise InputError(f"model-path '{model_path_text}' is not a directory "
                             "(relative paths start at the workspace).", input_name="model-path")
    elif not hf_repo:
        raise InputError("hf-repo is required: the Hugging Face model to publish, as 'owner/name' "
                         "(or set model-path to a local checkpoint directory).", input_name="hf-repo")
    elif not hub.is_repo_id(hf_repo):
        raise InputError(f"'{hf_repo}' is not a Hugging Face repo id. Use 'owner/name', e.g. "
                         "'HuggingFaceTB/SmolLM2-135M-Instruct'.", input_name="hf-repo")
    revision = values["hf-revision"].strip()
    if not revision or any(c.isspace() for c in revision):
        raise InputError(f"'{revision}' is not a revision. Use a branch, tag or commit sha.", input_name="hf-revision")

    repo_kind = values["repo-kind"].strip().lower() or "auto"
    if repo_kind not in hub.REPO_KINDS:
        raise InputError(f"'{repo_kind}' is not a repo kind. Use auto (decide from the files), transformers "
                         "(convert a transformers checkpoint), gguf (publish the repo's GGUF files) or lora "
                         "(merge a LoRA adapter into its base).", input_name="repo-kind")

    base_model = values["base-model"].strip()
    if base_model and not hub.is_repo_id(base_model):
        raise InputError(f"base-model '{base_model}' is not a Hugging Face repo id. Use 'owner/name', the model "
                         "the LoRA adapter was trained on.", input_name="base-model")
    base_revision = values["base-revision"].strip() or "main"

    if not values["ollama-model"].strip():
        raise InputError("ollama-model is required: the name to publish, e.g. 'yourname/mymodel' on ollama.com "
                         "or 'host:port/team/mymodel' on another registry.", input_name="ollama-model")
    model_name = registry.parse_model_name(values["ollama-model"])

    quantizations: list[str] = []
    for item in split_list(values["quantizations"]):
        canonical = quantize.normalize(item)
        if canonical not in quantizations:
            quantizations.append(canonical)
    if not quantizations:
        raise InputError("quantizations is empty. Give at least one, e.g. 'Q4_K_M, Q8_0'.", input_name="quantizations")

    output_tensor_type = quantize.normalize_tensor_type(values["output-tensor-type"], "output-tensor-type")
    token_embedding_type = quantize.normalize_tensor_type(values["token-embedding-type"], "token-embedding-type")
    calibration = _workspace_file(values, "imatrix-calibration", workspace)
    imatrix = _workspace_file(values, "imatrix", workspace)
    if calibration and imatrix:
        raise InputError("Set either imatrix-calibration (a text to compute the importance matrix from) or imatrix "
                         "(a ready one), not both.", input_name="imatrix")
    needs_imatrix = [q for q in quantizations if q in quantize.NEEDS_IMATRIX]
    if needs_imatrix and not (calibration or imatrix) and repo_kind != "gguf":
        raise InputError(
            f"{', '.join(needs_imatrix)} need an importance matrix: set imatrix-calibration to a text file in the "
            "workspace (the action runs llama-imatrix over it) or imatrix to a ready one, or choose a K-quant such "
            "as Q4_K_M. (To publish a repo's ready IQ files, set repo-kind: gguf.)", input_name="imatrix-calibration")

    version = values["version"].strip() or release_version(environ)
    patterns = split_list(values["tags"]) or list(DEFAULT_TAG_PATTERNS if version else UNVERSIONED_TAG_PATTERNS)
    tags = expand_tags(patterns, tuple(quantizations), version)
    missing = [q for q in quantizations if q not in {quant for quant, _ in tags}]
    if missing:
        raise InputError(f"No tag would be created for {', '.join(missing)}; add a pattern with {{quant}}.",
                         input_name="tags")

    deprecations: list[str] = []
    checks = {name: parse_check(name, values[name], deprecations) for name in CHECKS}
    push = parse_bool("push", values["push"])
    insecure = parse_bool("insecure-registry", values["insecure-registry"])
    ollama_host = values["ollama-host"].strip()
    if ollama_host and not _OLLAMA_HOST.match(ollama_host):
        raise InputError(f"'{ollama_host}' is not a server address. Use 'http://host:port'.", input_name="ollama-host")
    if ollama_host and not ollama_host.startswith(("http://", "https://")):
        ollama_host = "http://" + ollama_host
    key = normalize_key(values["ollama-key"]) if values["ollama-key"].strip() else ""
    if key and ollama_host:
        raise InputError("ollama-key only works with the server this action starts; with ollama-host, install "
                         "the key on that server instead (or drop ollama-host).", input_name="ollama-key")
    if push and model_name.is_ollama_com and not key and not ollama_host:
        raise InputError(
            "Pushing to ollama.com needs ollama-key: the private key whose public key is registered on your "
            "ollama.com account (see README, 'Ollama key'). Or set push: false to only build and test.",
            input_name="ollama-key")

    template = values["template"].strip() or "auto"
    if template != "auto" and template not in modelfile.FAMILIES and not (workspace / template).is_file():
        raise InputError(f"template '{template}' is neither 'auto', a catalog template "
                         f"({', '.join(modelfile.FAMILIES)}), nor a file in the workspace holding an Ollama Go "
                         "template.", input_name="template")

    output_dir = (workspace / values["output-dir"].strip()).resolve()
    if not output_dir.is_relative_to(workspace.resolve()):
        # Outside the workspace the paths in the outputs would not exist for later steps on the runner.
        raise InputError(f"output-dir '{values['output-dir']}' is outside the workspace; use a relative path "
                         "such as 'ollama-publish-out'.", input_name="output-dir")
    return Settings(
        hf_repo=hf_repo, hf_revision=revision, hf_token=values["hf-token"].strip(), model_path=model_path,
        repo_kind=repo_kind, allow_pickle=parse_bool("allow-pickle", values["allow-pickle"]),
        base_model=base_model, base_revision=base_revision,
        model_name=model_name, quantizations=tuple(quantizations), imatrix_calibration=calibration, imatrix=imatrix,
        output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type, tags=tags,
        template=template, system=values["system"], parameters=parse_parameters(values["parameters"]),
        smoke_test=checks["smoke-test"], smoke_test_prompt=values["smoke-test-prompt"].strip(),
        prompt_parity=checks["prompt-parity"], push=push, overwrite=parse_bool("overwrite", values["overwrite"]),
        pull_check=checks["pull-check"],
        immutable_tags=frozenset(tag for _, tag in expand_tags([p for p in patterns if "{version}" in p],
                                                               tuple(quantizations), version)),
        ollama_key=key, insecure_registry=insecure, ollama_host=ollama_host.rstrip("/"), output_dir=output_dir,
        resource_check=checks["resource-check"], workspace=workspace.resolve(), deprecations=tuple(deprecations),
    )
