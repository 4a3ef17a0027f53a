"""The README's first command: publish the bundled SmolLM2-135M-Instruct checkpoint end to end on
this machine, then show the published model answering.

A local Hub (olah) serves the checkpoint as `demo/SmolLM2-135M-Instruct` at tag v1.0.0, a local
registry receives the push, and the action runs exactly as in a workflow (same entrypoint, its own
Ollama server). Ollama 0.34 cannot pull back from a plain OCI registry (it expects blob downloads to be
redirected), so the answer comes from the copy the action created, served by a fresh Ollama on the same
models folder. Q8_0 comes first, so it is the release's default tag (1.0.0 and latest).

The question is one this 135M model answers and ends at both quantizations (it loops on some others,
such as the action's default smoke-test question, at temperature 0). On this machine kind llama-server
runs with one thread (LLAMA_ARG_THREADS=1): with more, its threads spin-wait on each other on a busy
2-core machine, many times slower.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from tests import servers

QUESTION = "What is the capital of Germany?"
REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    os.environ.setdefault("LLAMA_ARG_THREADS", "1")  # read by every llama-server the Ollama servers start
    root = Path(tempfile.mkdtemp(prefix="ollama-publish-demo-"))
    workspace, home = root / "workspace", root / "home"
    workspace.mkdir()
    print(f"demo: working in {root}")
    with servers.hub(root / "hub") as (endpoint, mirrors), servers.registry(root / "registry") as registry:
        servers.add_model_repo(mirrors, "demo/SmolLM2-135M-Instruct", Path(os.environ["SMOLLM2_CHECKPOINT"]),
                               tags=("v1.0.0",))
        print(f"demo: Hub at {endpoint}, registry at {registry}\n")
        model = f"{registry}/demo/smollm2"
        env = {**os.environ, "HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HOME": str(root / "hf"),
               "GITHUB_REF_NAME": "v1.0.0", "GITHUB_REF_TYPE": "tag", "GITHUB_WORKSPACE": str(workspace),
               "GITHUB_STEP_SUMMARY": str(root / "summary.md"), "GITHUB_OUTPUT": str(root / "outputs"),
               "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}", "PYTHONPATH": str(REPO_ROOT),
               "OLLAMA_MODELS": str(home / ".ollama" / "models")}
        command = [sys.executable, "-m", "entrypoint", "--hf-repo", "demo/SmolLM2-135M-Instruct",
                   "--hf-revision", "v1.0.0", "--ollama-model", model, "--quantizations", "Q8_0, Q4_K_M",
                   "--insecure-registry", "true", "--smoke-test-prompt", QUESTION,
                   # SmolLM2's model card recommends these sampling settings; they become the model's defaults.
                   "--parameters", "temperature 0.2\ntop_p 0.9"]
        print("demo: $ python " + " ".join(command[1:]) + "\n")
        if subprocess.run(command, cwd=workspace, env=env).returncode != 0:
            print("demo: the action failed (see above)")
            return 1
        print("\ndemo: job summary\n" + (root / "summary.md").read_text())
        tags = requests.get(f"http://{registry}/v2/demo/smollm2/tags/list", timeout=10).json()["tags"]
        print(f"demo: the registry now holds demo/smollm2 with tags {sorted(tags)}\n")
    # Pulling back from a plain registry is broken in Ollama 0.34 (it expects a redirect for blobs), so the
    # demo asks the models the action built and verified, kept in HOME/.ollama/models via OLLAMA_MODELS.
    with servers.ollama(home) as url:
        print(f"demo: $ ollama run {model}:latest {QUESTION!r}")
        answer = subprocess.run([os.environ["OLLAMA_BIN"], "run", f"{model}:latest", QUESTION],
                                env={**os.environ, "OLLAMA_HOST": url.removeprefix("http://"), "HOME": str(home)},
                                capture_output=True, text=True, timeout=300)
        print(answer.stdout.strip() or answer.stderr.strip())
        return answer.returncode


if __name__ == "__main__":
    sys.exit(main())
