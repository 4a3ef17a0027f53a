"""Stage 3: a GGUF file of every requested quantization in output-dir, built from the checkpoint (in one pass
when the weights can stream; else convert once, merge a LoRA adapter, compute an importance matrix, quantize
to each type) or taken from a repo of ready GGUF files. Every tool runs sealed (process.run_sealed); what is
consumed is deleted at once."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from . import convert, feed, github, hub, process, quantize
from .errors import PublishError
from .settings import Settings


def path(settings: Settings, quantization: str) -> Path:
    return settings.output_dir / f"{settings.model_name.model}-{quantize.tag_suffix(quantization)}.gguf"


def extra_path(settings: Settings, what: str) -> Path:
    return settings.output_dir / f"{settings.model_name.model}-{what}.gguf"


def source_type(settings: Settings) -> str:
    """The 16/32-bit type the converter writes and every quantization reads: F32 or BF16 when one of them is
    asked for (it is then published as the converter wrote it), else F16."""
    return next((t for t in ("F32", "BF16") if t in settings.quantizations), "F16")


def why_not_streamed(settings: Settings, merging: bool) -> str:
    """Why the converter must write a GGUF file before quantizing ('' when the weights can stream through one
    pass, entrypoint/stream.py): the steps that read a whole GGUF file need one."""
    if merging:
        return "llama-export-lora merges the adapter into a GGUF file"
    if settings.imatrix_calibration:
        return "llama-imatrix computes the importance matrix by running a GGUF file"
    if settings.imatrix and not _is_gguf(settings.imatrix):
        return f"{settings.imatrix.name} is an importance matrix in llama-imatrix's legacy format"
    return ""


def _is_gguf(file: Path) -> bool:
    with open(file, "rb") as opened:
        return opened.read(4) == b"GGUF"


def intermediate_type(settings: Settings, merging: bool) -> str:
    """For the path through a file: convert straight to the one type asked for when the converter writes it
    (and neither an adapter merge nor llama-quantize's options come between); else to source_type."""
    quants = settings.quantizations
    if len(quants) == 1 and quants[0] in quantize.CONVERTER_TYPES and not (merging or quantize_options_set(settings)):
        return quants[0]
    return source_type(settings)


def quantize_options_set(settings: Settings) -> bool:
    return bool(settings.imatrix or settings.imatrix_calibration or settings.output_tensor_type
                or settings.token_embedding_type)


def build(settings: Settings, checkpoint: hub.Checkpoint, scratch: Path, projector: Path | None,
          seal: process.Seal) -> dict[str, Path]:
    """A GGUF of every requested quantization (and the vision projector at `projector`, when given), the
    checkpoint deleted as soon as it is read. The weights stream through one pass when they can; else they
    are converted to a file, which an adapter is merged into and which every quantization reads."""
    model_label = settings.hf_repo.split("/")[-1] if settings.hf_repo else Path(settings.model_path or "model").name
    merging = checkpoint.adapter is not None
    if projector:
        with quantize.written_whole(projector) as partial:
            convert.convert_projector(checkpoint.path, partial, seal)
    reason = why_not_streamed(settings, merging)
    if reason:
        github.log(f"converting to a GGUF file first, then quantizing it: {reason}")
        ggufs = _through_a_file(settings, checkpoint, scratch, model_label, seal)
    else:
        github.log("converting and quantizing in one pass: each tensor is quantized into every output as the "
                   "converter makes it, and no 16-bit GGUF is written")
        ggufs = {q: path(settings, q) for q in settings.quantizations}
        with _weights_arriving(settings, checkpoint, scratch) as feed_folder:
            convert.convert_streamed(checkpoint.path, ggufs, quantize.CONVERTER_TYPES[source_type(settings)],
                                     model_label, seal, _options(settings, settings.imatrix), feed_folder)
        _delete_download(settings, checkpoint)
    for quant in settings.quantizations:
        github.log(f"{ggufs[quant].name}: {ggufs[quant].stat().st_size / 1e6:.1f} MB")
    return ggufs


@contextlib.contextmanager
def _weights_arriving(settings: Settings, checkpoint: hub.Checkpoint, scratch: Path) -> Iterator[Path | None]:
    """The folder of the download that feeds the conversion when the weights stream from the Hub (feed.py),
    else None. When the download fails, its error is the run's (the conversion only saw it stop)."""
    remote = checkpoint.streamed_from
    if remote is None:
        yield None
        return
    sizes = {name: remote.sizes[name] for name in remote.weights()}
    window = feed.window_bytes(checkpoint.path, sizes)
    with feed.Feed(hub.endpoint(), remote.repo, remote.commit, settings.hf_token, checkpoint.path,
                   scratch / "feed", sizes, window) as download:
        try:
            yield download.folder
        except PublishError as exc:
            if download.error is not None:
                raise download.error from exc
            raise


def _options(settings: Settings, imatrix: Path | None) -> quantize.Options:
    return quantize.Options(imatrix=imatrix, output_tensor_type=settings.output_tensor_type,
                            token_embedding_type=settings.token_embedding_type)


def _delete_download(settings: Settings, checkpoint: hub.Checkpoint) -> None:
    if not settings.model_path or checkpoint.adapter is not None:
        shutil.rmtree(checkpoint.path, ignore_errors=True)  # the downloaded weights are no longer needed


def _through_a_file(settings: Settings, checkpoint: hub.Checkpoint, scratch: Path, model_label: str,
                    seal: process.Seal) -> dict[str, Path]:
    """Convert once, merge a LoRA adapter, quantize to each requested type, and delete what is consumed as
    soon as it is."""
    quants = settings.quantizations
    merging = checkpoint.adapter is not None
    first_type = intermediate_type(settings, merging)
    intermediate = scratch / f"intermediate-{first_type.lower()}.gguf"
    convert.convert(checkpoint.path, intermediate, quantize.CONVERTER_TYPES[first_type], model_label, seal)
    adapter = scratch / "adapter-f16.gguf"
    if checkpoint.adapter is not None:
        convert.convert_adapter(checkpoint.adapter, checkpoint.path, adapter, seal)
    _delete_download(settings, checkpoint)
    if merging:
        merged = scratch / "merged.gguf"
        github.log("merging the adapter into the base model")
        convert.merge_adapter(intermediate, adapter, merged, seal)
        adapter.unlink()
        os.replace(merged, intermediate)
        github.log(f"{intermediate.name} now holds the base model with the adapter merged: it is what is quantized")
    to_quantize = [q for q in quants if q != first_type]
    imatrix = settings.imatrix
    if settings.imatrix_calibration and to_quantize:
        imatrix = scratch / "imatrix.gguf"
        github.log(f"computing the importance matrix over {settings.imatrix_calibration.name}")
        quantize.compute_imatrix(intermediate, settings.imatrix_calibration, imatrix, seal)
    ggufs = {}
    for quant in to_quantize:
        github.log(f"quantizing to {quant}")
        quantize.quantize(intermediate, path(settings, quant), quant, seal, _options(settings, imatrix))
        ggufs[quant] = path(settings, quant)
    if first_type in quants:
        os.replace(intermediate, path(settings, first_type))  # same filesystem: a rename
        ggufs[first_type] = path(settings, first_type)
    intermediate.unlink(missing_ok=True)
    return {q: ggufs[q] for q in quants}


def take(settings: Settings, checkpoint: hub.Checkpoint, seal: process.Seal) -> dict[str, Path]:
    """The repo's own GGUF files under the names converted ones get: moved when downloaded, else linked
    (or copied, across filesystems) so that a local model-path folder is left as it was. Split files are
    merged into one: Ollama 0.34 creates split models but marks them as needing Ollama 0.35, and older
    versions load one file only."""
    if quantize_options_set(settings):
        github.warning("imatrix, imatrix-calibration, output-tensor-type and token-embedding-type are ignored: the "
                       "repo's GGUF files are published as they are.")
    ggufs = {}
    for quant, parts in checkpoint.plan.ggufs.items():
        name, source, target = parts[0], checkpoint.path / parts[0], path(settings, quant)
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
