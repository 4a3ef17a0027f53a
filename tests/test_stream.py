"""The one-pass conversion (entrypoint/stream.py) writes, tensor by tensor, the bytes llama-quantize writes from
the converter's 16-bit GGUF: on SmolLM2-135M-Instruct (Llama, real weights) and a Gemma 3 checkpoint (another
tensor layout: tied output, four norms a layer, q/k norms, norms the converter shifts by one), for a K-quant
mixture, Q8_0 and an i-quant, with an importance matrix and a token-embedding type. The real converter,
llama-imatrix and llama-quantize, sealed as the action runs them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from entrypoint import convert, process, quantize, stream
from tests.material import scripted

CALIBRATION = Path(__file__).resolve().parent / "material" / "calibration.txt"
SEAL = process.Seal(memory_bytes=8 * 2**30, input_name="model-path")
QUANTS = ("Q4_K_M", "Q8_0", "IQ4_NL")  # a K-quant mixture, Q8_0 and an i-quant, with an importance matrix


def test_the_plan_is_read_from_llama_quantizes_dry_run():
    output = "\n".join((
        "llama_model_quantize_impl: model size  =   256.00 MiB",
        "[   1/ 272] output_norm.weight                   - [   576,      1,      1,      1], type =    f32, "
        "size =    0.002 MiB",
        "[   2/ 272] token_embd.weight                    - [   576,  49152,      1,      1], type =    f16, "
        "size =    54.00 MiB ->    28.69 MiB (q8_0)",
        "[  15/ 272] blk.0.ffn_down.weight                - [  1536,    576,      1,      1], type =    f16, "
        "size =     1.69 MiB ->     0.69 MiB (q6_K)",
        "[ 200/ 272] blk.3.ffn_down_exps.weight           - [   256,    512,      8,      1], type =   bf16, "
        "size =     2.00 MiB ->     0.28 MiB (iq2_xxs)",
        "llama_model_quantize_impl: quant size  =   101.00 MiB"))
    assert stream.parse_plan(output) == {"output_norm.weight": "f32", "token_embd.weight": "q8_0",
                                         "blk.0.ffn_down.weight": "q6_K", "blk.3.ffn_down_exps.weight": "iq2_xxs"}


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def checkpoint(request, tmp_path_factory) -> Path:
    if request.param == "smollm2":
        return Path(os.environ["SMOLLM2_CHECKPOINT"])
    return scripted.build("gemma", tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def by_llama_quantize(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Today's path: the converter's F16 file, an importance matrix computed on it, llama-quantize per type."""
    folder = tmp_path_factory.mktemp("by-llama-quantize")
    f16 = folder / "f16.gguf"
    convert.convert(checkpoint, f16, "f16", "model", SEAL)
    imatrix = folder / "imatrix.gguf"
    quantize.compute_imatrix(f16, CALIBRATION, imatrix, SEAL)
    made = {"imatrix": imatrix}
    for quant in QUANTS:
        made[quant] = folder / f"{quant}.gguf"
        quantize.quantize(f16, made[quant], quant, SEAL, _options(imatrix))
    f16.unlink()
    return made


def _options(imatrix: Path) -> quantize.Options:
    return quantize.Options(imatrix=imatrix, token_embedding_type="q8_0")


@pytest.mark.tools
def test_streamed_tensors_are_llama_quantizes_byte_for_byte(checkpoint, by_llama_quantize, tmp_path):
    streamed = {quant: tmp_path / f"{quant}.gguf" for quant in QUANTS}
    convert.convert_streamed(checkpoint, streamed, "f16", "model", SEAL, _options(by_llama_quantize["imatrix"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in streamed.values())  # no plan left
    for quant in QUANTS:
        expected, got = GGUFReader(by_llama_quantize[quant]), GGUFReader(streamed[quant])
        expected_tensors = {t.name: t for t in expected.tensors}
        got_tensors = {t.name: t for t in got.tensors}
        assert sorted(got_tensors) == sorted(expected_tensors)
        for name, tensor in expected_tensors.items():
            assert got_tensors[name].tensor_type == tensor.tensor_type, (quant, name)
            assert np.array_equal(np.asarray(got_tensors[name].data).view(np.uint8),
                                  np.asarray(tensor.data).view(np.uint8)), (quant, name)
        # The same metadata too, but the importance matrix's path (each run names its own file).
        assert _metadata(got) == _metadata(expected)
        assert got.get_field("quantize.imatrix.entries_count").contents() > 0


def _metadata(reader: GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.") and key != "quantize.imatrix.file"}
