"""The README's first command: publish the bundled SmolLM2-135M-Instruct with the action's image, run
the way GitHub's runner runs a container action, then show the published model answering.

A local Hub (olah) serves the checkpoint as `demo/SmolLM2-135M-Instruct` at tag v1.0.0, a local
registry receives the push (redirecting blob downloads to a second host, as ollama.com does to its
CDN: Ollama 0.30 and later pull only that way), and the image runs in a container started as the runner
starts one (tests/container.py: its mounts, the release tag v1.0.0, the inputs as INPUT_* variables).
Then an Ollama of this machine with no models of its own pulls the release from the registry and answers,
as a user's would. Q8_0 comes first, so it is the release's default tag (1.0.0 and latest).

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
from tests.container import IMAGE, Runner

QUESTION = "What is the capital of Germany?"


def main() -> int:
    os.environ.setdefault("LLAMA_ARG_THREADS", "1")  # read by the llama-server of the Ollama below
    root = Path(tempfile.mkdtemp(prefix="ollama-publish-demo-"))
    print(f"demo: working in {root}")
    runner = Runner(root / "runner", workspace_owner=(os.getuid(), os.getgid()))
    with servers.hub(root / "hub") as (endpoint, mirrors), servers.registry(root / "registry") as registry:
        servers.add_model_repo(mirrors, "demo/SmolLM2-135M-Instruct", Path(os.environ["SMOLLM2_CHECKPOINT"]),
                               tags=("v1.0.0",))
        print(f"demo: Hub at {endpoint}, registry at {registry}\n")
        model = f"{registry}/demo/smollm2"
        inputs = {"hf-repo": "demo/SmolLM2-135M-Instruct", "hf-revision": "v1.0.0", "ollama-model": model,
                  "quantizations": "Q8_0, Q4_K_M", "insecure-registry": "true", "smoke-test-prompt": QUESTION,
                  # SmolLM2's model card recommends these sampling settings; they become the model's defaults.
                  "parameters": "temperature 0.2\ntop_p 0.9"}
        print(f"demo: running {IMAGE} as GitHub's runner runs a container action, with:")
        for name, value in inputs.items():
            print(f"demo:   {name}: {value!r}")
        print()
        run = runner.run(inputs, env={"HF_ENDPOINT": endpoint}, on_line=lambda line, _: print(line, flush=True))
        if run.exit_code != 0:
            print(f"demo: the action failed (exit code {run.exit_code}; see above)\n{run.stderr[-2000:]}")
            return 1
        print("\ndemo: job summary\n" + run.summary)
        tags = requests.get(f"http://{registry}/v2/demo/smollm2/tags/list", timeout=10).json()["tags"]
        print(f"demo: the registry now holds demo/smollm2 with tags {sorted(tags)}\n")
        with servers.ollama(root / "user") as url:  # a user's Ollama: nothing of the action's
            env = {**os.environ, "OLLAMA_HOST": url.removeprefix("http://")}
            for command in (["pull", "--insecure", f"{model}:latest"], ["run", f"{model}:latest", QUESTION]):
                print(f"demo: $ ollama {' '.join(command[:-1])} {command[-1]!r}")
                done = subprocess.run([os.environ["OLLAMA_BIN"], *command], env=env, capture_output=True, text=True,
                                      timeout=300)
                if done.returncode != 0:
                    print(done.stderr.strip()[-2000:])
                    return done.returncode
                print(done.stdout.strip() or "demo: done")
        return 0


if __name__ == "__main__":
    sys.exit(main())
