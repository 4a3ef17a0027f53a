"""Unit tests: the disk and memory preflight follows the pipeline's plan."""

from __future__ import annotations

import pytest

from entrypoint import preflight
from entrypoint.errors import PublishError

GB = 10**9


def test_peak_phases_for_a_16_bit_8b_checkpoint():
    phases = preflight.estimate(16 * GB, ("Q4_K_M", "Q8_0"), "F16", downloaded=True, ollama_copies=True)
    work, quantizing, creating = phases
    assert work["work"] == 16 * GB + int(8e9 * 2 * 1.25)  # checkpoint + f16 intermediate
    assert quantizing["outputs"] == int(8e9 * 4.9 / 8 * 1.25) + int(8e9 * 8.5 / 8 * 1.25)
    assert creating["ollama"] == creating["outputs"] == quantizing["outputs"]


def test_streamed_the_checkpoint_and_the_outputs_are_all_the_disk_holds():
    phases = preflight.estimate(16 * GB, ("Q4_K_M", "Q8_0"), None, downloaded=True, ollama_copies=False,
                                pull_back=True)
    writing, creating, pulling = phases
    q4, q8 = int(8e9 * 4.9 / 8 * 1.25), int(8e9 * 8.5 / 8 * 1.25)
    assert writing == {"work": 16 * GB, "outputs": q4 + q8}  # no 16-bit GGUF at any point
    assert creating == {"outputs": q4 + q8, "ollama": 0}
    assert pulling["work"] == q8  # the largest, pulled back once (when it cannot be linked)
    # The download's window (the largest tensor and a margin) is on disk beside the outputs.
    with_window = preflight.estimate(16 * GB, ("Q4_K_M", "Q8_0"), None, downloaded=False, ollama_copies=False,
                                     window=GB)
    assert with_window[0] == {"work": GB, "outputs": q4 + q8}


def test_a_local_checkpoint_is_not_counted_and_a_direct_conversion_keeps_its_output():
    phases = preflight.estimate(2 * GB, ("Q8_0",), "Q8_0", downloaded=False, ollama_copies=False)
    converting, quantizing, creating = phases
    assert converting["work"] == int(1e9 * 8.5 / 8 * 1.25)
    assert quantizing["outputs"] == 0 and creating["outputs"] == int(1e9 * 8.5 / 8 * 1.25)
    assert creating["ollama"] == 0  # handed to Ollama as hard links


def test_check_names_the_need_and_the_free_space(tmp_path):
    phases = [{"work": 10**18}]
    with pytest.raises(PublishError) as caught:
        preflight.check_disk(phases, {"work": tmp_path / "not-yet", "outputs": tmp_path})
    assert caught.value.input_name == "resource-check"
    assert "GB free" in caught.value.message and "the work directory, output-dir" in caught.value.message
    preflight.check_disk([{"work": 1}], {"work": tmp_path})


def test_available_memory_is_capped_by_a_container_limit():
    meminfo = "MemTotal: 16000000 kB\nMemFree: 1000 kB\nMemAvailable: 8000000 kB\n"
    assert preflight.available_memory(meminfo) == 8000000 * 1024
    assert preflight.available_memory(meminfo, "4000000000\n", "1000000000\n") == 3 * GB


def test_no_meminfo_and_no_limit_leaves_memory_unknown():
    assert preflight.available_memory("") is None
    assert preflight.available_memory("", "4000000000\n", "1000000000\n") == 3 * GB


def test_memory_check_names_the_largest_quantization(monkeypatch):
    # 10**15 bytes of checkpoint: no machine has the memory to load its Q8_0.
    quantization, size = preflight.largest_quantized(10**15, ("Q4_K_M", "Q8_0"))
    assert (quantization, size) == ("Q8_0", preflight.quantized_bytes(10**15, "Q8_0"))
    with pytest.raises(PublishError) as caught:
        preflight.check_memory(size, quantization)
    assert caught.value.input_name == "resource-check"
    assert "checking the Q8_0 model needs about" in caught.value.message and "GB is available" in caught.value.message
    preflight.check_memory(10**6, "Q4_K_M")  # a tiny model fits anywhere


def test_every_quantization_has_a_size_estimate():
    from entrypoint.quantize import QUANTIZATION_TYPES

    assert set(QUANTIZATION_TYPES) <= set(preflight.BITS_PER_WEIGHT)
