"""The checkpoint's weights from the Hub as the one-pass conversion reads them, so that they never sit on disk
whole: at 8B the checkpoint alone (16 GB) is more than a hosted runner's guaranteed disk.

Before the conversion, each weights file is made at its full size as a sparse file holding only its header
(headers()): the checks and the converter read the headers, the data is a hole. During the conversion a
thread (Feed) downloads each file front to back, in the order the converter reads them, in one request
(resumed with a range when the server takes ranges, restarted when it does not), into its hole, and writes
how far it has come. The converter's side (stream.FeedReader) waits for the bytes of each tensor it reads,
copies them out, and punches them out of the file once the tensor is written. The thread stays at most a
window ahead of what the converter has given back, unless the converter waits for bytes further on.

Files in the feed folder: NAME.arrived (bytes of NAME on disk from its start), waiting ("NAME END" while the
converter waits), failed (the download stopped; the action raises its error)."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers

from . import github, registry, retry, stream
from .errors import DiskFull, HubError, LocalWriteFailed, PublishError, RepoRefused

CHUNK_BYTES = 2**20
# How far the download may run ahead of what the conversion has given back: the largest tensor, which must
# be on disk whole to be read, plus this.
WINDOW_MARGIN_BYTES = 32 * 2**20
HEADER_MAX_BYTES = 100_000_000  # safetensors' own limit on a header
TIMEOUT_S = 60


def headers(endpoint: str, repo: str, commit: str, token: str, destination: Path, sizes: dict[str, int]) -> None:
    """Each weights file in `sizes` as a sparse file of its size holding its safetensors header only."""
    for name, size in sizes.items():
        def fetch(name: str = name, size: int = size) -> None:
            with _get(endpoint, repo, commit, token, name, 0) as (response, _):
                head = b""
                for chunk in response.iter_content(CHUNK_BYTES):  # read up to the header's end, then hang up
                    head += chunk
                    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
                    if length > HEADER_MAX_BYTES or 8 + length > size:
                        raise RepoRefused(f"{repo}'s {name} is not a safetensors file: its header claims "
                                          f"{length:,} bytes.", title="Malformed weights")
                    if len(head) >= 8 and len(head) >= 8 + length:
                        break
                else:
                    raise HubError(f"{repo}'s {name} ended within its header.", status=None, retriable=True)
            _write_sparse(destination / name, size, head[:8 + length])

        retry.retrying(fetch, f"reading the header of {repo}'s {name}")


def window_bytes(checkpoint: Path, sizes: dict[str, int]) -> int:
    """How far the download may run ahead of the conversion: the largest tensor, plus a margin."""
    return largest_tensor_bytes(checkpoint, sizes) + WINDOW_MARGIN_BYTES


def largest_tensor_bytes(checkpoint: Path, sizes: dict[str, int]) -> int:
    """The largest tensor of the weights files, in bytes, from their headers (whose every tensor must lie
    within its file: the download would never bring bytes past its end)."""
    largest = 0
    for name, size in sizes.items():
        with open(checkpoint / name, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        for key, tensor in header.items():
            offsets = tensor.get("data_offsets") if isinstance(tensor, dict) and key != "__metadata__" else [0, 0]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= size - 8 - length):
                raise RepoRefused(f"{name}: the tensor {key[:100]} lies outside the file ({str(offsets)[:100]}).",
                                  title="Bad checkpoint")
            largest = max(largest, offsets[1] - offsets[0])
    return largest


def _write_sparse(path: Path, size: int, head: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_errors(path):
        with open(path, "wb") as file:
            file.truncate(size)
            file.write(head)


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path.parent, free=shutil.disk_usage(path.parent).free, what="downloading the weights") \
                from exc
        raise


@contextlib.contextmanager
def _get(endpoint: str, repo: str, commit: str, token: str, name: str, start: int
         ) -> Iterator[tuple[requests.Response, int]]:
    """A streamed GET of `name` from byte `start` (a range), or from 0 when the server ignores ranges: the
    response and where it starts."""
    url = hf_hub_url(repo, name, revision=commit, endpoint=endpoint)
    request_headers = build_hf_headers(token=token or False)
    if start:
        request_headers["Range"] = f"bytes={start}-"
    try:
        response = requests.get(url, headers=request_headers, stream=True, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise HubError(f"Could not download {repo}'s {name} from {endpoint}: {exc}", status=None,
                       retriable=True, title="Hub unreachable") from exc
    with response:
        if response.status_code >= 400:
            raise HubError(f"The Hub answered {response.status_code} for {repo}'s {name}.",
                           status=response.status_code, retriable=registry.retriable_status(response.status_code),
                           input_name="hf-token" if response.status_code in (401, 403) else "hf-repo")
        yield response, start if response.status_code == 206 else 0


class Feed:
    """The thread that downloads the weights into their sparse files while the conversion reads them."""

    def __init__(self, endpoint: str, repo: str, commit: str, token: str, checkpoint: Path, folder: Path,
                 sizes: dict[str, int], window: int):
        self.endpoint, self.repo, self.commit, self.token = endpoint, repo, commit, token
        self.checkpoint, self.folder, self.sizes, self.window = checkpoint, folder, sizes, window
        self.error: PublishError | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="weights feed", daemon=True)
        self.total, self.start = sum(sizes.values()), time.monotonic()
        self.done, self.last_log = 0, self.start

    def __enter__(self) -> Feed:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        try:
            for name in sorted(self.sizes):  # the converter reads model-00001-of-..., then -00002-, ...
                retry.retrying(functools.partial(self._download, name), f"downloading {self.repo}'s {name}")
        except Stopped:
            return
        except PublishError as exc:
            self.error = exc
        except OSError as exc:  # writing the weights (a full disk is a PublishError already)
            self.error = LocalWriteFailed(f"Could not write the weights into {self.checkpoint}: {exc}",
                                          path=self.checkpoint, title="Download failed")
        except Exception as exc:  # any end of this thread must say so, or the conversion waits for ever
            self.error = HubError(f"The download of {self.repo}'s weights stopped: {exc!r}", status=None,
                                  retriable=False)
        (self.folder / "failed").write_text(self.error.message if self.error else "", encoding="utf-8")

    def _download(self, name: str) -> None:
        path, size = self.checkpoint / name, self.sizes[name]
        position = stream.arrived(self.folder, name)
        if position == size:  # an earlier attempt brought it all, then failed
            return
        with _get(self.endpoint, self.repo, self.commit, self.token, name, position) as (response, start):
            skip = position - start  # a server that ignores ranges sends the file from its start again
            fd = os.open(path, os.O_WRONLY)
            pending = bytearray()  # servers send small chunks: write, and say so, a megabyte at a time
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    pending += chunk
                    if position + len(pending) > size:
                        raise RepoRefused(f"{self.repo}'s {name} is longer than the {size:,} bytes the Hub listed.",
                                          title="Malformed weights")
                    if len(pending) >= CHUNK_BYTES:
                        position = self._write(fd, path, name, position, pending)
                if pending:
                    position = self._write(fd, path, name, position, pending)
            except requests.RequestException as exc:
                raise HubError(f"The download of {self.repo}'s {name} broke off at byte {position:,}: {exc}",
                               status=None, retriable=True, title="Hub unreachable") from exc
            finally:
                os.close(fd)
        if position != size:
            raise HubError(f"{self.repo}'s {name} ended at byte {position:,} of {size:,}.", status=None,
                           retriable=True)

    def _write(self, fd: int, path: Path, name: str, position: int, data: bytearray) -> int:
        """Write `data` at `position` once there is room, say how far the file has come, and empty `data`."""
        self._wait_for_room(name, position)
        with _disk_errors(path):
            stream.write_all(fd, memoryview(data), position)
        position += len(data)
        self._report(name, position, len(data))
        data.clear()
        return position

    def _report(self, name: str, position: int, added: int) -> None:
        partial = self.folder / f"{name}.arrived.partial"
        partial.write_text(str(position))
        os.replace(partial, self.folder / f"{name}.arrived")
        self.done += added
        now = time.monotonic()
        if now - self.last_log >= github.PROGRESS_EVERY_S:
            self.last_log = now
            rate = self.done / (now - self.start)
            github.log(f"weights downloaded: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB, "
                       f"{rate / 1e6:.0f} MB/s, about {(self.total - self.done) / rate / 60:.0f} min left, "
                       f"{self._resident() / 1e9:.2f} GB on disk")

    def _resident(self) -> int:
        return sum(os.stat(self.checkpoint / name).st_blocks * 512 for name in self.sizes)

    def _wait_for_room(self, name: str, position: int) -> None:
        """Pause while the bytes on disk not yet given back exceed the window, unless the converter waits
        for bytes this download has not reached (it would wait forever)."""
        while self._resident() > self.window and not self._converter_waits(name, position):
            if self.stopping.wait(0.05):
                raise Stopped
        if self.stopping.is_set():
            raise Stopped

    def _converter_waits(self, name: str, position: int) -> bool:
        try:
            waited_name, end = (self.folder / "waiting").read_text().split()
        except (FileNotFoundError, ValueError):
            return False
        return (waited_name, int(end)) > (name, position)


class Stopped(Exception):
    """The conversion is over (finished or failed): the rest of the weights is not needed."""
