"""Workflow-command injection: a repository whose LICENSE, README, chat template, config and file names
carry workflow commands is published like any other, and GitHub's runner, reading the action's output
with its own rules (tests/runner_commands), obeys none of them: no mask, error, output, or
stop-commands that would silence the action's own commands after it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import fault_report, runner_commands, servers
from tests.conftest import registry_tags

pytestmark = pytest.mark.servers
REPO = "injection-org/SmolLM2"
MARK = "pwned-by-the-repo"
COMMANDS = [f"::error::{MARK}", f"::add-mask::{MARK}", f"::set-output name=models::{MARK}",
            f"::stop-commands::{MARK}", f"::warning file=README.md,line=1::{MARK}", f"  ::notice::{MARK}",
            f"text ##[error]{MARK}", f"::{MARK}::"]


def _hostile_checkpoint(folder: Path) -> Path:
    shutil.copytree(Path(os.environ["SMOLLM2_CHECKPOINT"]), folder)
    lines = "\n".join(COMMANDS)
    (folder / "LICENSE").write_text((folder / "LICENSE").read_text() + "\n" + lines + "\n")
    (folder / "README.md").write_text(f"# A model\n{lines}\n")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text("{#\n" + lines + "\n#}" + template)  # a comment: renders the same
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": f"::error::{MARK}"}, indent=1))
    (folder / f"LICENSE-##[error]{MARK}").write_text(lines)  # a license file: downloaded and named in the log
    (folder / f"::warning::{MARK}.txt").write_text(lines)
    return folder


def test_no_command_from_the_repository_is_obeyed(stack, run_action, tmp_path):
    servers.add_model_repo(stack.mirrors, REPO, _hostile_checkpoint(tmp_path / "checkpoint"))
    run = run_action({"hf-repo": REPO, "ollama-model": f"{stack.registry}/injection/smollm2",
                      "insecure-registry": "true", "quantizations": "Q8_0"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 0, run.stdout[-3000:]
    assert MARK in run.stdout  # the repository's text was shown ...
    for stream in (run.stdout, run.stderr):  # ... and the runner reads commands on both streams
        obeyed = runner_commands.obeyed(stream)
        assert not [c for c in obeyed if MARK in c.name + c.properties + c.data], obeyed
        assert not [c for c in obeyed if c.name in ("stop-commands", "set-output", "save-state")], obeyed
    names = {c.name for c in runner_commands.obeyed(run.stdout)}
    assert {"group", "endgroup"} <= names  # the action's own commands were obeyed to the end
    assert runner_commands.obeyed(run.stdout)[-1].name == "endgroup"
    assert MARK not in run.outputs_text and MARK not in run.summary
    assert sorted(registry_tags(stack.registry, "injection/smollm2")) == ["1.0.0", "1.0.0-q8_0", "latest"]
    fault_report.injection_not_obeyed()
