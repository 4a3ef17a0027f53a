"""Unit tests: input reading and validation (pure, no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from entrypoint import settings as s
from entrypoint.errors import InputError, PublishError
from entrypoint.registry import OLLAMA_COM, parse_model_name


def _openssh(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


MATERIAL = Path(__file__).resolve().parent / "material"
KEY = _openssh(ed25519.Ed25519PrivateKey.generate())  # as Ollama makes them: ed25519, no passphrase


def build(tmp_path, environ=None, **inputs):
    values = s.read_inputs({f"INPUT_{k.upper()}": v for k, v in inputs.items()})
    return s.build_settings(values, {"GITHUB_WORKSPACE": str(tmp_path), **(environ or {})})


def test_inputs_read_with_hyphen_or_underscore_and_cli_overrides():
    env = {"INPUT_HF-REPO": "a/b", "INPUT_OLLAMA_MODEL": "me/m", "INPUT_QUANTIZATIONS": ""}
    values = s.read_inputs(env, overrides={"ollama-model": "you/m"})
    assert values["hf-repo"] == "a/b"
    assert values["ollama-model"] == "you/m"
    assert values["quantizations"] == "Q4_K_M"  # empty means default, as GitHub passes unset inputs


def test_release_tags_by_default(tmp_path):
    settings = build(tmp_path, {"GITHUB_REF_NAME": "v1.2.0", "GITHUB_REF_TYPE": "tag"},
                     **{"hf-repo": "a/b", "ollama-model": "me/m", "quantizations": "q4_k_m,Q8_0", "push": "false"})
    assert settings.quantizations == ("Q4_K_M", "Q8_0")
    assert settings.tags == (("Q4_K_M", "1.2.0-q4_K_M"), ("Q8_0", "1.2.0-q8_0"), ("Q4_K_M", "1.2.0"),
                             ("Q4_K_M", "latest"))
    assert settings.immutable_tags == {"1.2.0-q4_K_M", "1.2.0-q8_0", "1.2.0"}


def test_branch_runs_get_unversioned_tags(tmp_path):
    settings = build(tmp_path, {"GITHUB_REF_NAME": "main", "GITHUB_REF_TYPE": "branch"},
                     **{"hf-repo": "a/b", "ollama-model": "me/m", "quantizations": "Q8_0, F16", "push": "false"})
    assert settings.tags == (("Q8_0", "q8_0"), ("F16", "f16"), ("Q8_0", "latest"))


def test_custom_tag_patterns(tmp_path):
    settings = build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "version": "2.0",
                                  "quantizations": "Q5_K_M", "tags": "stable\n{version}-instruct-{quant}"})
    # Aliases are pushed last, whatever the order the patterns were given in.
    assert settings.tags == (("Q5_K_M", "2.0-instruct-q5_K_M"), ("Q5_K_M", "stable"))


@pytest.mark.parametrize("inputs, input_name, phrase", [
    ({"ollama-model": "me/m"}, "hf-repo", "hf-repo is required"),
    ({"hf-repo": "not a repo", "ollama-model": "me/m"}, "hf-repo", "owner/name"),
    ({"hf-repo": "a/b"}, "ollama-model", "ollama-model is required"),
    ({"hf-repo": "a/b", "ollama-model": "Me/Model"}, "ollama-model", "Try 'me'"),
    ({"hf-repo": "a/b", "ollama-model": "me/model:v1"}, "ollama-model", "tag"),
    ({"hf-repo": "a/b", "ollama-model": "model"}, "ollama-model", "namespace/model"),
    ({"hf-repo": "a/b", "ollama-model": "h:1/my.team/m"}, "ollama-model", "namespace"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "quantizations": "Q4_K_X"}, "quantizations", "Unknown quantization"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "quantizations": "IQ2_XS"}, "imatrix-calibration",
     "IQ2_XS need an importance matrix"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "imatrix-calibration": "missing.txt"}, "imatrix-calibration",
     "'missing.txt' is not a file"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "output-tensor-type": "Q8"}, "output-tensor-type",
     "Unknown tensor type 'Q8'"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "token-embedding-type": "q4_k_m"}, "token-embedding-type",
     "Unknown tensor type"),
    ({"hf-repo": "a/b", "ollama-model": "me/m"}, "ollama-key", "ollama.com needs ollama-key"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "ollama-key": "ssh-ed25519 AAAA"}, "ollama-key", "OpenSSH private key"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "maybe"}, "push", "boolean"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "template": "llama9"}, "template", "catalog template"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "parameters": "temprature 0.1"}, "parameters",
     "Unknown parameter"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "parameters": "num_ctx big"}, "parameters", "int"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "tags": "{version}"}, "tags", "no version"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "tags": "latest", "quantizations": "Q4_0,Q8_0"},
     "tags", "add a pattern with {quant}"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "tags": "{quant}!"}, "tags", "not a valid tag"),
    ({"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "output-dir": "../out"}, "output-dir", "outside"),
    ({"hf-repo": "a/b", "model-path": "x", "ollama-model": "me/m"}, "hf-repo", "not both"),
])
def test_bad_inputs_name_the_input(tmp_path, inputs, input_name, phrase):
    with pytest.raises(PublishError) as caught:
        build(tmp_path, **inputs)
    assert caught.value.input_name == input_name
    assert phrase in caught.value.message


def test_key_is_normalized_from_a_pasted_secret():
    pasted = KEY.replace("\n", "\r\n").replace("b3Bl", "  b3Bl")
    assert s.normalize_key(pasted) == KEY
    assert s.normalize_key(KEY.replace("\n", "\\n")) == KEY


@pytest.mark.parametrize("key, phrase", [
    ((MATERIAL / "ed25519-with-passphrase.key").read_text(), "cannot be read"),  # made by ssh-keygen -N secret
    (_openssh(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "not an ed25519 key"),
    (KEY.replace(KEY.splitlines()[2], KEY.splitlines()[2][:-8]), "cannot be read"),  # cut short when pasted
])
def test_a_key_that_cannot_sign_as_ollama_does_is_refused_up_front(key, phrase):
    with pytest.raises(InputError) as caught:
        s.normalize_key(key)
    assert caught.value.input_name == "ollama-key" and phrase in caught.value.message


def test_parameters_are_typed():
    assert s.parse_parameters('temperature 0.5\n# comment\nstop "<|end|>"\nnum_ctx 4096\nuse_mmap false') == (
        ("temperature", 0.5), ("stop", "<|end|>"), ("num_ctx", 4096), ("use_mmap", False))


def test_model_names():
    assert parse_model_name("me/my-model").host == OLLAMA_COM
    assert parse_model_name("ollama.com/me/m").with_tag("1.0") == "me/m:1.0"
    name = parse_model_name("http://127.0.0.1:5000/team/smol.v2")
    assert (name.host, name.namespace, name.model, name.scheme) == ("127.0.0.1:5000", "team", "smol.v2", "http")
    assert name.with_tag("latest") == "127.0.0.1:5000/team/smol.v2:latest"


def test_importance_matrix_inputs(tmp_path):
    (tmp_path / "calibration.txt").write_text("Some text.\n")
    (tmp_path / "imatrix.gguf").write_bytes(b"GGUF")
    settings = build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "me/m", "push": "false",
                                  "quantizations": "iq2_xxs, Q4_K_M", "imatrix-calibration": "calibration.txt",
                                  "output-tensor-type": "Q8_0", "token-embedding-type": "Q6_k"})
    assert settings.quantizations == ("IQ2_XXS", "Q4_K_M")
    assert settings.imatrix_calibration == tmp_path / "calibration.txt"
    assert (settings.output_tensor_type, settings.token_embedding_type) == ("q8_0", "q6_K")
    with pytest.raises(PublishError) as caught:
        build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "me/m", "push": "false",
                           "imatrix-calibration": "calibration.txt", "imatrix": "imatrix.gguf"})
    assert caught.value.input_name == "imatrix" and "not both" in caught.value.message
    # A repo of ready GGUF files brings its own IQ files: no importance matrix needed.
    assert build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "me/m", "push": "false", "repo-kind": "gguf",
                              "quantizations": "IQ2_XS"}).quantizations == ("IQ2_XS",)


@pytest.mark.parametrize("name", list(s.CHECKS))
def test_every_check_input_takes_fail_warn_or_off(tmp_path, name):
    field = name.replace("-", "_")
    assert getattr(build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "h:1/me/m"}), field) == "fail"
    for mode in s.CHECK_MODES:
        built = build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "h:1/me/m", name: f" {mode.upper()} "})
        assert getattr(built, field) == mode and built.deprecations == ()
    with pytest.raises(InputError) as caught:
        build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "h:1/me/m", name: "sometimes"})
    assert caught.value.input_name == name and "Use fail (the default: the run stops), warn" in caught.value.message


@pytest.mark.parametrize("name, old, new", [("smoke-test", "true", "fail"), ("smoke-test", "false", "off"),
                                            ("resource-check", "true", "fail"), ("resource-check", "false", "off")])
def test_the_old_booleans_still_work_and_name_their_replacement(tmp_path, name, old, new):
    built = build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "h:1/me/m", name: old})
    assert getattr(built, name.replace("-", "_")) == new
    assert len(built.deprecations) == 1 and f"{name}: {old} is deprecated" in built.deprecations[0]
    assert f"write {name}: {new}" in built.deprecations[0]


def test_only_the_checks_that_were_booleans_take_booleans(tmp_path):
    with pytest.raises(InputError) as caught:
        build(tmp_path, **{"hf-repo": "a/b", "ollama-model": "h:1/me/m", "pull-check": "false"})
    assert caught.value.input_name == "pull-check"
