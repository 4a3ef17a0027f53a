"""Run the action's image the way GitHub's runner runs a container action (actions/runner,
ContainerActionHandler and DockerCommandManager.DockerRun): `docker run --rm --workdir /github/workspace`,
each input as INPUT_<NAME> (upper case, hyphens kept) and the context as GITHUB_* variables, with
GITHUB_ACTIONS=true and CI=true, as root, and these mounts:

    the Docker socket                    /var/run/docker.sock
    $RUNNER_TEMP/_github_home            /github/home            (HOME)
    $RUNNER_TEMP/_github_workflow        /github/workflow        (the event payload)
    $RUNNER_TEMP/_runner_file_commands   /github/file_commands   (GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, ...)
    $RUNNER_TEMP                         /github/runner_temp     (RUNNER_TEMP)
    the checkout                         /github/workspace

Host networking stands in for the job's network: the test Hub, registry and the action's own Ollama
(on a free port, through OLLAMA_HOST) are on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import docker

from tests import servers

RUN_TIMEOUT_S = 1200
IMAGE = os.environ.get("OLLAMA_PUBLISH_IMAGE", "ollama-publish:local")


@dataclasses.dataclass
class ContainerRun:
    exit_code: int
    stdout: str
    stderr: str
    outputs_text: str
    summary: str
    home: Path  # the host folders mounted into the container
    workspace: Path
    workflow: Path
    file_commands: Path
    runner_temp: Path

    def errors(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("::error")]

    @property
    def mounted(self) -> tuple[Path, ...]:
        return self.home, self.workspace, self.workflow, self.file_commands, self.runner_temp


class Runner:
    """Runs the image as the runner does, in folders under `root`; `workspace_owner` (uid, gid) owns the
    checkout as the runner's user does on a hosted runner (its files are the runner user's)."""

    def __init__(self, root: Path, workspace_owner: tuple[int, int] = (1001, 1001), image: str = IMAGE,
                 docker_host: str | None = None, memory_limit: int | None = None):
        self.root, self.image = root, image
        self.memory_limit = memory_limit  # bytes, as a hosted runner's RAM bounds the job (no swap)
        self.workspace = root / "work" / "repo" / "repo"
        self.runner_temp = root / "work" / "_temp"
        self.home = self.runner_temp / "_github_home"
        self.workflow = self.runner_temp / "_github_workflow"
        self.file_commands = self.runner_temp / "_runner_file_commands"
        for folder in (self.workspace, self.home, self.workflow, self.file_commands):
            folder.mkdir(parents=True, exist_ok=True)
        os.chown(self.workspace, *workspace_owner)
        for parent in self.workspace.parents:  # the runner's user can reach its checkout (pytest's folders are 0700)
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
        (self.workflow / "event.json").write_text(json.dumps({"ref": "refs/tags/v1.0.0"}))
        self.docker_host = docker_host or os.environ["DOCKER_HOST"]  # unix://PATH: the engine's socket
        self.client = docker.DockerClient(base_url=self.docker_host, timeout=RUN_TIMEOUT_S)

    @property
    def mounted(self) -> tuple[Path, ...]:
        return self.home, self.workspace, self.workflow, self.file_commands, self.runner_temp

    def run(self, inputs: dict[str, str], env: dict[str, str] | None = None,
            on_line: Callable[[str, docker.models.containers.Container], None] | None = None) -> ContainerRun:
        """Run the action's container to its end; on_line(line, container) sees each stdout line as it comes."""
        step = uuid.uuid4().hex
        output, summary = self.file_commands / f"set_output_{step}", self.file_commands / f"step_summary_{step}"
        for path in (output, summary):
            path.touch()
        environment = {
            "HOME": "/github/home", "GITHUB_ACTIONS": "true", "CI": "true",
            "GITHUB_WORKSPACE": "/github/workspace", "GITHUB_EVENT_PATH": "/github/workflow/event.json",
            "GITHUB_OUTPUT": f"/github/file_commands/{output.name}",
            "GITHUB_STEP_SUMMARY": f"/github/file_commands/{summary.name}",
            "RUNNER_TEMP": "/github/runner_temp", "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
            "GITHUB_REF": "refs/tags/v1.0.0", "GITHUB_REF_NAME": "v1.0.0", "GITHUB_REF_TYPE": "tag",
            "GITHUB_REPOSITORY": "test-org/model-releases", "GITHUB_SHA": "0" * 40, "GITHUB_RUN_ID": "1",
            "GITHUB_ACTION": "publish", "GITHUB_EVENT_NAME": "push",
            # The action's own Ollama: on a free port of the shared loopback. One llama-server thread on
            # these busy 2-core machines (tests only: Ollama passes none itself unless num_thread is set).
            "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}", "LLAMA_ARG_THREADS": "1",
            **{f"INPUT_{name.upper()}": value for name, value in inputs.items()},
            **(env or {}),
        }
        volumes = {
            self.docker_host.removeprefix("unix://"): {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(self.home): {"bind": "/github/home", "mode": "rw"},
            str(self.workflow): {"bind": "/github/workflow", "mode": "rw"},
            str(self.file_commands): {"bind": "/github/file_commands", "mode": "rw"},
            str(self.runner_temp): {"bind": "/github/runner_temp", "mode": "rw"},
            str(self.workspace): {"bind": "/github/workspace", "mode": "rw"},
        }
        container = self.client.containers.run(
            self.image, detach=True, name=f"ollama-publish-test-{step[:12]}", labels={"ollama-publish-test": step},
            working_dir="/github/workspace", environment=environment, volumes=volumes, network_mode="host",
            **({"mem_limit": self.memory_limit, "memswap_limit": self.memory_limit} if self.memory_limit else {}))
        stderr: list[bytes] = []
        reader = threading.Thread(target=lambda: stderr.extend(container.logs(stream=True, follow=True, stdout=False,
                                                                              stderr=True)), daemon=True)
        reader.start()
        lines, pending = [], b""
        try:
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", errors="replace")
                    lines.append(line)
                    if on_line is not None:
                        on_line(line, container)
            exit_code = container.wait(timeout=RUN_TIMEOUT_S)["StatusCode"]
            reader.join(timeout=30)
        finally:
            container.remove(force=True)
        if pending:
            lines.append(pending.decode("utf-8", errors="replace"))
        return ContainerRun(exit_code=exit_code, stdout="\n".join(lines) + "\n",
                            stderr=b"".join(stderr).decode("utf-8", errors="replace"),
                            outputs_text=output.read_text(), summary=summary.read_text(), home=self.home,
                            workspace=self.workspace, workflow=self.workflow, file_commands=self.file_commands,
                            runner_temp=self.runner_temp)


def secrets_left(run: ContainerRun, secrets: list[str]) -> list[str]:
    """Where any secret shows: stdout (the ::add-mask:: lines GitHub swallows aside), stderr, and every
    file the container left in the runner's folders it mounted."""
    places = {"stdout": "\n".join(line for line in run.stdout.splitlines() if not line.startswith("::add-mask::")),
              "stderr": run.stderr}
    for folder in run.mounted:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                places[str(path)] = path.read_bytes().decode("latin-1")
    return [f"{secret[:8]}... in {where}" for secret in secrets for where, text in places.items() if secret in text]
