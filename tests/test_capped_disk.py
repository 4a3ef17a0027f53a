"""Disk, the resource that decides what CI can publish: on a filesystem too small for the by-hand
recipe (bench.recipes.baseline: whole-repo snapshot, f16 GGUF, every quantization and Ollama's copy
of each, all kept), the action publishes the same release. Every directory either run writes (HOME
with Ollama's models, the Hub cache, the work dir, the workspace) lives in one size-capped tmpfs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from bench import recipes
from entrypoint.quantize import tag_suffix
from tests import fault_report, servers
from tests.conftest import HF_REPO, action_runner

pytestmark = pytest.mark.servers
QUANTIZATIONS = ("Q4_K_M", "Q8_0")
CAP_MB = 700  # SmolLM2's checkpoint S is 269 MB: 2.6 x S. The recipe needs about 3.9 x S.


def checkpoint_mb() -> float:
    checkpoint = Path(os.environ["SMOLLM2_CHECKPOINT"])
    return sum(p.stat().st_size for p in checkpoint.iterdir()) / 1e6


def test_the_recipe_runs_out_of_space_where_the_action_publishes(stack, tmp_path):
    release = {f"1.0.0-{tag_suffix(q)}" for q in QUANTIZATIONS} | {"1.0.0", "latest"}
    with servers.tmpfs(tmp_path / "recipe", CAP_MB) as disk:
        setup = recipes.Setup(hub_endpoint=stack.hub_endpoint, registry=stack.registry, quantizations=QUANTIZATIONS,
                              interval=1.0, exclude=frozenset())
        with pytest.raises(RuntimeError) as failure:
            recipes.baseline(setup, HF_REPO, "capped/recipe", disk / "run", tmp_path / "recipe.log", 0, "SmolLM2")
        # Tools word it differently (llama-quantize: "iostream error"); the filesystem being full is the proof.
        free_mb = shutil.disk_usage(disk).free / 1e6
        assert free_mb < 16, f"the recipe failed with {free_mb:.0f} MB still free: {failure.value}"
    assert fault_report.assert_all_or_nothing(stack.registry, "capped/recipe", release) == set()

    with servers.tmpfs(tmp_path / "action", CAP_MB) as disk:
        run = action_runner(disk)({
            "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/capped/action", "insecure-registry": "true",
            "quantizations": ", ".join(QUANTIZATIONS)}, env={"HF_ENDPOINT": stack.hub_endpoint})
        assert run.returncode == 0, run.stdout[-3000:]
    assert fault_report.assert_all_or_nothing(stack.registry, "capped/action", release) == release
    print(f"capped filesystem: {CAP_MB} MB = {CAP_MB / checkpoint_mb():.1f} x the checkpoint; the recipe ran out of "
          "space, the action published")


def test_a_checkpoint_larger_than_the_free_disk_is_published_streaming_from_the_hub(stack, tmp_path):
    """The weights stream from the Hub while they are converted (entrypoint/feed.py): on a filesystem smaller
    than the checkpoint, the release is published, pulled back and answers. The test Hub (olah) ignores
    ranges, so the file comes in one front-to-back stream; what the conversion has read is given back."""
    cap_mb = 240
    assert cap_mb < checkpoint_mb()
    release = {"1.0.0-q4_K_M", "1.0.0", "latest"}
    with servers.tmpfs(tmp_path / "smaller-than-the-checkpoint", cap_mb) as disk:
        run = action_runner(disk)({
            "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/capped/streamed", "insecure-registry": "true",
            "quantizations": "Q4_K_M"}, env={"HF_ENDPOINT": stack.hub_endpoint})
        assert run.returncode == 0, run.stdout[-3000:]
    assert "stream from the Hub while they are converted" in run.stdout
    assert fault_report.assert_all_or_nothing(stack.registry, "capped/streamed", release) == release
    print(f"capped filesystem: {cap_mb} MB = {cap_mb / checkpoint_mb():.2f} x the checkpoint; the action published")


def test_a_disk_that_fills_during_the_download_is_named_and_not_retried(stack, tmp_path):
    """With the preflight off (resource-check: false), the disk fills while the weights stream from the Hub
    into the conversion (the download or the conversion's output finds it full, whichever writes first): the
    run says so, with the path and the space left, does not retry, and pushes nothing."""
    with servers.tmpfs(tmp_path / "small", 100) as disk:  # the Q8_0 output alone is 145 MB
        run = action_runner(disk)({
            "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/capped/full", "insecure-registry": "true",
            "quantizations": "Q8_0", "resource-check": "false"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1 and "title=Disk full" in errors[0], errors
    assert ("downloading" in errors[0] or "streamed into Q8_0" in errors[0]) and str(disk) in errors[0]
    free = re.search(r"has ([0-9.]+) GB free", errors[0])
    assert free and float(free.group(1)) < 0.02, errors[0]  # full indeed, when it said so
    assert "retrying" not in run.stdout
    assert fault_report.assert_all_or_nothing(stack.registry, "capped/full", {"1.0.0-q8_0", "1.0.0", "latest"}) \
        == set()
    fault_report.disk_full_named()
