"""The workflow snippets of the README and docs/ are what they claim: each lints with actionlint as a
workflow (a bare list of steps inside a job), and names only the action's own inputs."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from entrypoint.settings import INPUTS

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _snippets() -> list[tuple[str, str]]:
    """(where, a workflow's text) for every ```yaml block: whole workflows as they are, steps in a job."""
    found = []
    for document in DOCUMENTS:
        for number, block in enumerate(re.findall(r"```yaml\n(.*?)```", document.read_text(), re.DOTALL), 1):
            text = textwrap.dedent(block)
            if "jobs:" not in text:
                text = ("on: push\npermissions: {}\njobs:\n  example:\n    runs-on: ubuntu-latest\n    steps:\n"
                        + textwrap.indent(text, "      "))
            found.append((f"{document.relative_to(ROOT)} #{number}", text))
    return found


SNIPPETS = _snippets()


def test_the_readme_and_docs_have_workflow_snippets():
    assert any(where.startswith("README.md") for where, _ in SNIPPETS)
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("where, text", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_a_snippet_names_only_the_actions_inputs(where, text):
    steps = [step for job in yaml.safe_load(text)["jobs"].values() for step in job["steps"]]
    ours = [step for step in steps if "ollama-publish@" in step.get("uses", "")]
    assert ours, f"{where} does not use the action"
    for step in ours:
        assert set(step.get("with", {})) <= set(INPUTS), set(step["with"]) - set(INPUTS)


@pytest.mark.tools
@pytest.mark.parametrize("where, text", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_a_snippet_lints(tmp_path, where, text):
    assert shutil.which("actionlint"), "actionlint comes with scripts/bootstrap"
    workflow = tmp_path / "snippet.yml"
    workflow.write_text(text)
    result = subprocess.run(["actionlint", "-no-color", str(workflow)], capture_output=True, text=True)
    assert result.returncode == 0, f"{where}:\n{result.stdout}{result.stderr}"
