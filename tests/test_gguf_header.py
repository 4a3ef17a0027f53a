"""The GGUF header reader against files written by the gguf package (llama.cpp's own writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from entrypoint.convert import adds_bos
from entrypoint.errors import RepoRefused
from entrypoint.gguf_header import read_metadata


def _write(path: Path, **extra) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.context_length", 2048)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list(["<s>", "</s>", "héllo"])
    writer.add_token_types([3, 3, 1])
    writer.add_chat_template("{{ messages[0]['content'] }}")
    for key, value in extra.items():
        writer.add_bool(key, value)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_what_the_gguf_package_wrote(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path, **{"tokenizer.ggml.add_bos_token": True})
    metadata = read_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.name"] == "tiny"
    assert metadata["llama.context_length"] == 2048
    assert metadata["llama.rope.freq_base"] == 10000.0
    assert metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "héllo"]
    assert metadata["tokenizer.ggml.token_type"] == [3, 3, 1]
    assert metadata["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert set(metadata) == {k for k in GGUFReader(path).fields if not k.startswith("GGUF.")}  # all, none invented
    assert adds_bos(path) is True


def test_bos_flag_absent_means_no_bos(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    assert adds_bos(path) is False


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RepoRefused, match=r"model\.safetensors is not a valid GGUF file"):
        read_metadata(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(RepoRefused, match=r"tiny\.gguf is not a valid GGUF file: the GGUF header ends early"):
        read_metadata(path)


def test_a_string_longer_than_the_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.gguf"
    # version 3, no tensors, one key whose name claims 2**62 bytes: reading it would allocate them
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                     + (2**62).to_bytes(8, "little") + b"key")
    with pytest.raises(RepoRefused, match="ends early"):
        read_metadata(path)


def test_a_link_named_like_a_gguf_is_refused(tmp_path):
    _write(tmp_path / "real.gguf")
    (tmp_path / "model-Q4_K_M.gguf").symlink_to(tmp_path / "real.gguf")
    with pytest.raises(RepoRefused, match=r"model-Q4_K_M\.gguf is not a regular file"):
        read_metadata(tmp_path / "model-Q4_K_M.gguf")
