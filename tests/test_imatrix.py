"""Quantizing with an importance matrix computed from the user's calibration text, and llama-quantize's
tensor-type options, through the real entrypoint, converter, llama-imatrix, llama-quantize and Ollama."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gguf import GGUFReader

from entrypoint.gguf_header import read_metadata
from tests.conftest import HF_REPO, registry_tags

pytestmark = pytest.mark.servers


def test_iq2_with_an_importance_matrix_from_calibration_text(stack, run_action):
    # Real English text, long enough for llama-imatrix's 2 x 512-token minimum (an early copy of this project's
    # README, fixed: with another text SmolLM2 at IQ2_XXS may answer without stopping).
    shutil.copy(Path(__file__).resolve().parent / "material" / "calibration.txt", run_action.workspace)
    repository = "imatrix-team/smollm2"
    run = run_action({"hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/{repository}",
                      "quantizations": "Q4_K_M, IQ2_XXS", "imatrix-calibration": "calibration.txt",
                      "token-embedding-type": "q8_0", "insecure-registry": "true"},
                     env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 0, run.stdout[-3000:]
    assert "computing the importance matrix over calibration.txt" in run.stdout
    for quant, suffix in (("Q4_K_M", "q4_K_M"), ("IQ2_XXS", "iq2_XXS")):
        gguf = run.workspace / "ollama-publish-out" / f"smollm2-{suffix}.gguf"
        metadata = read_metadata(gguf)
        # llama-quantize records the importance matrix it used.
        assert metadata["quantize.imatrix.dataset"].endswith("calibration.txt"), quant
        assert metadata["quantize.imatrix.entries_count"] > 0 and metadata["quantize.imatrix.chunks_count"] >= 2
        types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
        assert types["token_embd.weight"] == "Q8_0", quant
    assert "1.0.0-iq2_XXS" in registry_tags(stack.registry, repository)
