"""Stage 3 in one pass: llama.cpp's converter reads the checkpoint once, and every tensor it makes is quantized
at once into each requested GGUF, so no 16-bit GGUF is ever written (at 8B that file alone is 16 GB).

Exact by construction rather than by imitation:
- the converter is llama.cpp's own (its model classes, tensor transforms and metadata); this module takes the
  place of its last step only, GGUFWriter.write_tensors_to_file;
- each output tensor gets the type llama-quantize plans for it, read from `llama-quantize --dry-run` run on the
  converter's own header followed by a hole where the data would be (a sparse file: no disk);
- the bytes come from ggml_quantize_chunk, the kernel llama-quantize calls, in the library it links, on the
  float32 rows it would read back from the 16-bit file.

Runs sealed, as a module (convert.convert_streamed starts it):
    python -m entrypoint.stream --converter convert_hf_to_gguf.py --llama-quantize PATH --ggml-library PATH
        --plan PATH --output Q4_K_M=PATH [--output ...] [--imatrix F] [--quantize-flag=...] [--feed DIR]
        -- CONVERTER_ARGUMENTS
With --feed, the weights files hold their headers only, and their bytes arrive while they are read
(feed.py; FeedReader waits for them, and gives them back to the disk once used).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import mmap
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROGRESS_EVERY_S = 30
SLAB_BYTES = 64 * 2**20  # float32 rows converted and quantized at a time: memory stays flat at any size
# One line of `llama-quantize --dry-run` per tensor: its name, its type, and the new type when it changes.
PLAN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[[^\]]*\], type =\s*(?P<type>\w+), size = [^(]*"
                       r"(?:\((?P<new>\w+)\))?\s*$")


class Ggml:
    """The few functions of libggml-base this needs, typed."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        self.lib = lib

    def requires_imatrix(self, type_: int) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(type_))

    def row_size(self, type_: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(type_, n_per_row))

    def quantize(self, type_: int, rows: np.ndarray, out: np.ndarray, n_per_row: int,
                 imatrix: np.ndarray | None) -> int:
        """Quantize float32 `rows` into `out` (ctypes lets go of the GIL: threads run in parallel)."""
        size = self.lib.ggml_quantize_chunk(type_, rows.ctypes.data, out.ctypes.data, 0, rows.size // n_per_row,
                                            n_per_row, None if imatrix is None else imatrix.ctypes.data)
        if not self.lib.ggml_validate_row_data(type_, out.ctypes.data, size):
            raise ValueError(f"ggml rejected the quantized rows ({type_})")
        return int(size)


def parse_plan(dry_run_output: str) -> dict[str, str]:
    """{tensor name: ggml type name} from `llama-quantize --dry-run`'s per-tensor lines."""
    plan = {}
    for line in dry_run_output.splitlines():
        match = PLAN_LINE.match(line.strip())
        if match:
            plan[match["name"]] = match["new"] or match["type"]
    return plan


def load_imatrix(path: Path, gguf: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An importance matrix in llama-imatrix's GGUF format as llama-quantize uses it: per tensor, each sum of
    squares divided by its count (1 where the count is 0); and the file's metadata llama-quantize records."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    weights = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors[base + ".counts"]
        per_expert = sums.reshape(len(counts), -1)
        divided = np.ones_like(per_expert)
        counted = counts > 0
        divided[counted] = per_expert[counted] / counts[counted, None]
        weights[base] = np.ascontiguousarray(divided.reshape(-1), dtype=np.float32)

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    return weights, {"datasets": field("imatrix.datasets") or [], "chunks": field("imatrix.chunk_count") or 0}


class Output:
    """One GGUF being written: its header first (every size is known from type and shape), then each tensor's
    bytes at its offset as the tensor arrives."""

    def __init__(self, quantization: str, path: Path, plan: dict[str, str], source: Any, gguf: Any, ggml: Ggml,
                 imatrix: dict[str, np.ndarray] | None, imatrix_kv: dict[str, tuple[Any, Any]]):
        self.quantization, self.path, self.ggml, self.imatrix = quantization, path, ggml, imatrix
        types = gguf.GGMLQuantizationType
        infos = source.tensors[0]
        missing = sorted(set(infos) - set(plan))
        if missing:
            raise RuntimeError(f"llama-quantize --dry-run planned no type for {', '.join(missing[:5])}")
        self.types = {name: int(types[plan[name].upper()]) for name in infos}
        writer = gguf.GGUFWriter(path, source.arch)
        writer.data_alignment = source.data_alignment
        kv = dict(source.kv_data[0])
        file_type = gguf.LlamaFileType.ALL_F32 if quantization == "F32" else \
            gguf.LlamaFileType[f"MOSTLY_{quantization}"]
        kv["general.file_type"] = gguf.GGUFValue(int(file_type), gguf.GGUFValueType.UINT32)
        kv["general.quantization_version"] = gguf.GGUFValue(gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
        for key, (value, value_type) in imatrix_kv.items():
            kv[key] = gguf.GGUFValue(value, value_type)
        writer.kv_data = [kv]
        self.offsets, offset = {}, 0
        for name, info in infos.items():
            nbytes = self._nbytes(info.shape, self.types[name])
            writer.add_tensor_info(name, info.shape, np.dtype(np.float32), nbytes, raw_dtype=types(self.types[name]))
            self.offsets[name] = offset
            offset += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        out = writer.fout[0]
        writer.write_padding(out, out.tell())
        out.flush()
        self.data_start = out.tell()
        writer.close()
        self.size = self.data_start + offset
        self.fd = os.open(path, os.O_WRONLY)
        os.truncate(self.fd, self.size)  # the padding between tensors: zeros, as llama-quantize writes it

    def _nbytes(self, shape: tuple[int, ...], type_: int) -> int:
        n_per_row = int(shape[-1])
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows * self.ggml.row_size(type_, n_per_row)

    def copies(self, name: str, source_type: int) -> bool:
        """Whether `name` keeps the type the converter gave it here (its bytes are copied as they are)."""
        return self.types[name] == source_type

    def copy(self, name: str, data: memoryview) -> None:
        write_all(self.fd, data, self.data_start + self.offsets[name])

    def weights_for(self, name: str, n_per_row: int, experts: int) -> np.ndarray | None:
        """The importance matrix's weights for `name` (None without), refusing as llama-quantize does a type
        that cannot be made without them."""
        weights = self._imatrix_for(name, n_per_row, experts)
        if weights is None and self.ggml.requires_imatrix(self.types[name]):
            raise RuntimeError(f"{name} is to be {self.quantization}'s type {self.types[name]}, which needs an "
                               "importance matrix, and there is none for it (llama-quantize refuses this too)")
        return weights

    def quantize_rows(self, name: str, rows: np.ndarray, first_row: int, weights: np.ndarray | None,
                      pool: concurrent.futures.Executor, workers: int) -> None:
        """Quantize float32 `rows` (rows first_row... of `name`, of one expert: `weights` are its) and write
        them at their place, in one job per worker (rows are independent: any split gives the same bytes)."""
        target, n_per_row = self.types[name], rows.shape[1]
        row_bytes = self.ggml.row_size(target, n_per_row)
        out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
        step = max(1, -(-rows.shape[0] // workers))
        jobs = [pool.submit(self.ggml.quantize, target, rows[at:at + step], out[at:at + step], n_per_row, weights)
                for at in range(0, rows.shape[0], step)]
        written = sum(job.result() for job in jobs)
        assert written == out.nbytes, (name, written, out.nbytes)
        write_all(self.fd, memoryview(out.data).cast("B"),
                   self.data_start + self.offsets[name] + first_row * row_bytes)

    def _imatrix_for(self, name: str, n_per_row: int, experts: int) -> np.ndarray | None:
        """llama-quantize's choice: the tensor's weights when their size fits; a mismatch fails, but for the
        token embedding (which an importance matrix never fits)."""
        if self.imatrix is None or name not in self.imatrix:
            return None
        weights = self.imatrix[name]
        if weights.size == n_per_row * experts:
            return weights
        if name == "token_embd.weight":
            return None
        raise RuntimeError(f"imatrix size {weights.size} is different from tensor size {n_per_row * experts} "
                           f"for {name}")

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` into `fd` at `offset` (pwrite may write less than it is given)."""
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def arrived(folder: Path, name: str) -> int:
    """How many bytes of the weights file `name` a feed.Feed writing into `folder` has brought (0: none yet)."""
    try:
        return int((folder / f"{name}.arrived").read_text() or 0)
    except FileNotFoundError:
        return 0


def _f16(raw: memoryview) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float16).astype(np.float32)


def _bf16(raw: memoryview) -> np.ndarray:
    return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f32(raw: memoryview) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32)


FLOAT32_FROM = {0: _f32, 1: _f16, 30: _bf16}  # ggml types F32, F16, BF16


def tensor_bytes(tensor: Any, nbytes: int) -> memoryview:
    """What the converter would have written for one tensor (eager, lazy or written in chunks alike): its
    own tofile() into a file in memory."""
    fd = os.memfd_create("tensor")
    with open(fd, "w+b", closefd=True) as buffer:
        tensor.tofile(buffer)
        buffer.flush()
        if buffer.tell() != nbytes:
            raise RuntimeError(f"the converter wrote {buffer.tell()} bytes of a {nbytes}-byte tensor")
        if nbytes == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(buffer.fileno(), nbytes, prot=mmap.PROT_READ))


class FeedReader:
    """The converter's side of feed.Feed, in place of gguf's LocalTensor.mmap_bytes: waits until a tensor's
    bytes have arrived, copies them out, and punches them out of the file once the tensor that read them is
    written (give_back). A range read again after that would be zeros: that fails loudly instead."""

    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

    def __init__(self, folder: Path):
        self.folder = folder
        self.read_since: list[tuple[str, int, int]] = []
        self.given_back: dict[str, list[tuple[int, int]]] = {}
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def read(self, tensor: Any) -> np.ndarray:
        path, offset, size = str(tensor.data_range.filename), tensor.data_range.offset, tensor.data_range.size
        name = Path(path).name
        if any(offset < end and start < offset + size for start, end in self.given_back.get(path, [])):
            raise RuntimeError(f"the converter read bytes {offset:,}-{offset + size:,} of {name} a second time, "
                               "after they were given back to the disk; publish this model from model-path")
        if offset + size > os.path.getsize(path):
            raise RuntimeError(f"{name} is shorter than its header says (a tensor ends past its end)")
        waiting = self.folder / "waiting"
        while arrived(self.folder, name) < offset + size:
            if (self.folder / "failed").exists():
                raise RuntimeError("the download of the weights failed (the action's log says why)")
            waiting.write_text(f"{name} {offset + size}")
            time.sleep(0.02)
        waiting.unlink(missing_ok=True)
        self.read_since.append((path, offset, size))
        return np.fromfile(path, dtype=np.uint8, count=size, offset=offset)

    def give_back(self) -> None:
        for path, offset, size in self.read_since:
            fd = os.open(path, os.O_WRONLY)
            try:
                if self.libc.fallocate(fd, self.FALLOC_FL_PUNCH_HOLE | self.FALLOC_FL_KEEP_SIZE, offset, size):
                    raise OSError(ctypes.get_errno(), f"could not give back the bytes of {path}")
            finally:
                os.close(fd)
            self.given_back.setdefault(path, []).append((offset, offset + size))
        self.read_since.clear()


class Progress:
    """A line at most every PROGRESS_EVERY_S seconds: bytes done, rate and time left."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.last = self.start

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else 0
            print(f"stream: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB of weights converted and quantized, "
                  f"{rate / 1e6:.0f} MB/s, about {left / 60:.0f} min left", flush=True)


def stream(source: Any, args: argparse.Namespace, gguf: Any, ggml: Ggml, feed: FeedReader | None) -> None:
    """In place of the converter's GGUFWriter.write_tensors_to_file: the plan, then every output at once."""
    if len(source.fout) != 1:
        raise RuntimeError("the streamed conversion writes one file per quantization; the converter was asked to split")
    source.write_ti_data_to_file()
    plan_file = source.fout[0]
    source.write_padding(plan_file, plan_file.tell())
    infos = source.tensors[0]
    plan_file.truncate(plan_file.tell() + sum(gguf.GGUFWriter.ggml_pad(i.nbytes, source.data_alignment)
                                              for i in infos.values()))
    plan_file.flush()

    imatrix, imatrix_kv = None, {}
    if args.imatrix:
        imatrix, meta = load_imatrix(Path(args.imatrix), gguf)
        string, uint32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
        imatrix_kv = {"quantize.imatrix.file": (args.imatrix[:127], string),
                      "quantize.imatrix.entries_count": (len(imatrix), uint32)}
        if meta["datasets"]:
            imatrix_kv["quantize.imatrix.dataset"] = (str(meta["datasets"][0])[:127], string)
        if meta["chunks"]:
            imatrix_kv["quantize.imatrix.chunks_count"] = (int(meta["chunks"]), uint32)
    outputs = []
    for quantization, path in args.output:
        plan = parse_plan(dry_run(args, quantization))
        outputs.append(Output(quantization, Path(path), plan, source, gguf, ggml, imatrix, imatrix_kv))
    print(f"stream: converting each tensor once and quantizing it into {', '.join(q for q, _ in args.output)} "
          f"({len(infos)} tensors)", flush=True)
    progress = Progress(sum(i.nbytes for i in infos.values()))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for name, info in infos.items():
            data = tensor_bytes(info.tensor, info.nbytes)
            write_tensor(outputs, name, tuple(info.shape), int(info.dtype), data, pool)
            info.tensor = None  # the converter's lazy tensor, and what it holds, can go
            if feed is not None:
                feed.give_back()
            progress.add(info.nbytes)
    for output in outputs:
        output.close()
    source.state = gguf.gguf_writer.WriterState.WEIGHTS


def write_tensor(outputs: list[Output], name: str, shape: tuple[int, ...], source_type: int, data: memoryview,
                 pool: concurrent.futures.Executor) -> None:
    """One tensor into every output: copied where its type stays, else converted to float32 once, a slab of
    rows at a time, and quantized into each output from the same slab."""
    quantizing = []
    for output in outputs:
        if output.copies(name, source_type):
            output.copy(name, data)
        else:
            quantizing.append(output)
    if not quantizing:
        return
    to_float32 = FLOAT32_FROM.get(source_type)
    if to_float32 is None:
        raise RuntimeError(f"{name} is already quantized (type {source_type}); llama-quantize would refuse to "
                           "quantize it again")
    n_per_row = int(shape[-1])
    rows_per_expert = int(shape[-2]) if len(shape) > 1 else 1
    experts = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
    weights = {output: output.weights_for(name, n_per_row, experts) for output in quantizing}
    row_bytes = len(data) // (rows_per_expert * experts)
    slab_rows = max(1, min(rows_per_expert, SLAB_BYTES // (4 * n_per_row)))
    workers = os.cpu_count() or 1
    for expert in range(experts):
        for first in range(0, rows_per_expert, slab_rows):
            row = expert * rows_per_expert + first
            count = min(slab_rows, rows_per_expert - first)
            rows = to_float32(data[row * row_bytes:(row + count) * row_bytes]).reshape(count, n_per_row)
            for output in quantizing:
                expert_weights = weights[output]
                if expert_weights is not None:
                    expert_weights = expert_weights[expert * n_per_row:(expert + 1) * n_per_row]
                output.quantize_rows(name, rows, row, expert_weights, pool, workers)


def dry_run(args: argparse.Namespace, quantization: str) -> str:
    done = subprocess.run([args.llama_quantize, "--dry-run", *args.quantize_flag, args.plan, quantization],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize --dry-run {quantization} failed: {done.stdout[-2000:]}")
    return done.stdout


def _output(text: str) -> tuple[str, str]:
    quantization, _, path = text.partition("=")
    return quantization, path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m entrypoint.stream")
    parser.add_argument("--converter", required=True)
    parser.add_argument("--llama-quantize", required=True)
    parser.add_argument("--ggml-library", required=True)
    parser.add_argument("--plan", required=True, help="the converter's header, data left as a hole")
    parser.add_argument("--output", action="append", type=_output, required=True, help="TYPE=PATH")
    parser.add_argument("--imatrix", default="", help="the importance matrix to load (given to the dry run as a flag)")
    parser.add_argument("--quantize-flag", action="append", default=[], help="a llama-quantize flag, for the dry run")
    parser.add_argument("--feed", default="", help="the folder of a feed.Feed that downloads the weights")
    parser.add_argument("converter_arguments", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    converter_arguments = args.converter_arguments[1:] if args.converter_arguments[:1] == ["--"] else \
        args.converter_arguments
    # The converter's own gguf package (it puts it first on sys.path itself): one module, patched once.
    sys.path.insert(0, str(Path(args.converter).parent / "gguf-py"))
    import gguf

    ggml = Ggml(Path(args.ggml_library))
    feed = FeedReader(Path(args.feed)) if args.feed else None
    if feed is not None:
        import gguf.utility

        gguf.utility.LocalTensor.mmap_bytes = lambda tensor: feed.read(tensor)  # type: ignore[method-assign,assignment]
    write_to_file = gguf.GGUFWriter.write_tensors_to_file

    def write_tensors_to_file(writer: Any, *, progress: bool = False) -> None:
        """The model's GGUF streams; any other file the converter writes (an embedding model's task
        adapters) is written as the converter writes it."""
        if writer.path is not None and Path(writer.path).resolve() == Path(args.plan).resolve():
            stream(writer, args, gguf, ggml, feed)
        else:
            write_to_file(writer, progress=progress)

    gguf.GGUFWriter.write_tensors_to_file = write_tensors_to_file  # type: ignore[method-assign,assignment]
    sys.argv = [args.converter, *converter_arguments, "--outfile", args.plan]
    runpy.run_path(args.converter, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
