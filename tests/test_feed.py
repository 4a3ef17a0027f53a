"""Unit tests: the two sides of the weights feed on local files (entrypoint/feed.py writes, stream.FeedReader
reads and gives back); the download itself runs against the test Hub in test_capped_disk.py and
test_faults.py."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

from entrypoint import feed
from entrypoint.errors import RepoRefused
from entrypoint.stream import FeedReader


def _safetensors(path: Path, tensors: dict[str, tuple[int, int]], size: int) -> bytes:
    header = json.dumps({name: {"dtype": "BF16", "shape": [(end - start) // 2], "data_offsets": [start, end]}
                         for name, (start, end) in tensors.items()}).encode()
    head = len(header).to_bytes(8, "little") + header
    path.write_bytes(head + os.urandom(size - len(head)))
    return head


def test_the_window_follows_the_largest_tensor_and_a_tensor_past_its_file_is_refused(tmp_path):
    _safetensors(tmp_path / "model.safetensors", {"a": (0, 4096), "b": (4096, 4096 + 65536)}, 100_000)
    assert feed.largest_tensor_bytes(tmp_path, {"model.safetensors": 100_000}) == 65536
    _safetensors(tmp_path / "model.safetensors", {"a": (0, 4096), "b": (4096, 200_000)}, 100_000)
    with pytest.raises(RepoRefused, match="lies outside the file"):
        feed.largest_tensor_bytes(tmp_path, {"model.safetensors": 100_000})


def _tensor(path: Path, offset: int, size: int):
    return types.SimpleNamespace(data_range=types.SimpleNamespace(filename=path, offset=offset, size=size))


def test_the_reader_takes_arrived_bytes_and_gives_them_back_once(tmp_path):
    weights, folder = tmp_path / "model.safetensors", tmp_path / "feed"
    folder.mkdir()
    head = _safetensors(weights, {"a": (0, 1 << 20)}, (1 << 20) + 4096)
    (folder / "model.safetensors.arrived").write_text(str(weights.stat().st_size))
    expected = weights.read_bytes()[len(head):len(head) + (1 << 20)]
    reader = FeedReader(folder)
    assert reader.read(_tensor(weights, len(head), 1 << 20)).tobytes() == expected
    blocks = weights.stat().st_blocks
    reader.give_back()
    assert weights.stat().st_blocks < blocks - 1500  # the megabyte is off the disk (512-byte blocks)
    assert weights.read_bytes()[:len(head)] == head  # and only that megabyte
    with pytest.raises(RuntimeError, match="a second time"):
        reader.read(_tensor(weights, len(head), 16))


def test_the_reader_stops_waiting_when_the_download_failed(tmp_path):
    weights, folder = tmp_path / "model.safetensors", tmp_path / "feed"
    folder.mkdir()
    _safetensors(weights, {"a": (0, 4096)}, 8192)
    (folder / "failed").write_text("the Hub answered 500")
    with pytest.raises(RuntimeError, match="download of the weights failed"):
        FeedReader(folder).read(_tensor(weights, 100, 4096))
