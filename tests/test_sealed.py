"""The seal around every process that reads a repository's files (entrypoint/sealed.py, process.run_sealed),
proven on real processes: no network whatever a library does, no code from outside the Python
installation, only the allow-listed environment, and memory limits kept by the kernel, each ending in a
typed refusal. (The converter itself behind the seal: tests/test_remote_code.py.)"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from entrypoint import process, sealed
from entrypoint.errors import LimitExceeded, RemoteCodeRefused, ToolFailed, ToolRaised
from tests import fault_report

SEAL = process.Seal(memory_bytes=512 * 2**20, input_name="hf-repo")


def _script(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tool.py"
    path.write_text(text)
    return path


def test_a_sealed_program_cannot_open_any_socket(tmp_path):
    probe = ("import socket\n"
             "for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):\n"
             "    try:\n"
             "        socket.socket(family)\n"
             "        print('opened', family)\n"
             "    except OSError as e:\n"
             "        print('refused', family, e.errno)\n")
    out = tmp_path / "out.txt"
    # Exec'd, as a native tool is: the filter is the kernel's, so it holds for any program.
    command = [sys.executable, "-I", "-c", f"import sys; sys.stdout = open({str(out)!r}, 'w')\n{probe}"]
    process.run_sealed(command, what="probe", writes_to=tmp_path, seal=SEAL)
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("refused") and line.endswith(" 13") for line in lines), lines


def test_the_network_is_refused_even_to_a_library_that_ignores_offline(tmp_path):
    """A Python tool that connects to a listening server by itself (no HF_* variable asks it to): stopped at
    the attempt, and the server never sees a connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[object] = []
    listener.settimeout(10)
    threading.Thread(target=lambda: accepted.append(_accept(listener)), daemon=True).start()
    port = listener.getsockname()[1]
    script = _script(tmp_path / "tool", f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n")
    with pytest.raises(RemoteCodeRefused) as refused:
        process.run_sealed([str(script)], what="the tool", writes_to=tmp_path, seal=SEAL, python=True)
    assert refused.value.attempt == "network" and "127.0.0.1" in refused.value.message
    assert refused.value.input_name == "hf-repo"
    listener.close()
    assert accepted in ([], [None])  # nothing connected before the listener closed
    fault_report.remote_code_refused()


def _accept(listener: socket.socket):
    try:
        return listener.accept()
    except OSError:
        return None


def test_code_from_outside_the_installation_is_never_run(tmp_path):
    """A tool that imports a module from a folder of the repository's: stopped before the module's first line
    (it would write a file)."""
    tripped = tmp_path / "tripped"
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "tokenization_trip.py").write_text(f"open({str(tripped)!r}, 'w').write('ran')\n")
    script = _script(tmp_path / "tool", f"import sys\nsys.path.insert(0, {str(tmp_path / 'repo')!r})\n"
                                        "try:\n    import tokenization_trip\nexcept Exception:\n    pass\n")
    with pytest.raises(RemoteCodeRefused) as refused:
        process.run_sealed([str(script)], what="the tool", writes_to=tmp_path, seal=SEAL, python=True)
    assert refused.value.attempt == "code" and "tokenization_trip.py" in refused.value.message
    assert not tripped.exists()
    fault_report.remote_code_refused()


def test_transformers_dynamic_modules_are_refused_by_name(tmp_path):
    script = _script(tmp_path / "tool", "try:\n    __import__('transformers_modules.x')\n"
                                        "except Exception:\n    pass\n")
    with pytest.raises(RemoteCodeRefused, match=r"transformers' dynamic module transformers_modules\.x"):
        process.run_sealed([str(script)], what="the tool", writes_to=tmp_path, seal=SEAL, python=True)


def test_only_the_allow_listed_environment_reaches_a_tool(tmp_path, monkeypatch):
    for name, value in {"ACTIONS_RUNTIME_TOKEN": "runtime-secret", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-secret",
                        "HF_TOKEN": "hf_secret", "HF_ENDPOINT": "http://127.0.0.1:9", "INPUT_HF-TOKEN": "hf_secret",
                        "INPUT_OLLAMA-KEY": "key-secret", "GITHUB_TOKEN": "gh-secret",
                        "LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp/evil"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "environ.json"
    command = [sys.executable, "-I", "-c", f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"]
    process.run_sealed(command, what="probe", writes_to=tmp_path, seal=SEAL)
    environ = json.loads(out.read_text())
    assert set(environ) <= {*process.SEALED_PASSES, "HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE",
                            "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"}, environ
    assert "secret" not in json.dumps(environ)
    assert environ["HF_HUB_OFFLINE"] == environ["TRANSFORMERS_OFFLINE"] == "1"
    assert Path(environ["HOME"]).parent == tmp_path  # its own folder in the work dir, removed after
    assert not Path(environ["HOME"]).exists()


def test_a_python_tool_past_its_memory_is_refused_naming_the_limit(tmp_path):
    script = _script(tmp_path / "tool", "tokens = [f'[PAD{i}]' for i in range(4_000_000_000)]\n")
    with pytest.raises(LimitExceeded) as refused:
        process.run_sealed([str(script)], what="convert_hf_to_gguf.py", writes_to=tmp_path, seal=SEAL, python=True)
    assert refused.value.resource == "memory" and refused.value.limit == SEAL.memory_bytes
    assert "memory limit of 0.5 GiB" in refused.value.message and refused.value.input_name == "hf-repo"
    fault_report.limit_enforced()


def test_a_native_tool_past_its_memory_fails_with_the_limit_said(tmp_path):
    """A program that is not Python cannot say why it failed: the error gives its limit."""
    command = [sys.executable, "-I", "-c", "import sys; x = bytearray(2 * 2**30)"]  # exec'd: as a native tool
    with pytest.raises(ToolFailed, match=r"exited with code 1 \(it may use 0.5 GiB of memory\)"):
        process.run_sealed(command, what="llama-quantize", writes_to=tmp_path, seal=SEAL)


def test_a_python_tool_that_raises_is_refused_with_its_exception(tmp_path):
    script = _script(tmp_path / "tool", "def set_vocab():\n    assert False, 'vocab_size mismatch'\nset_vocab()\n")
    with pytest.raises(ToolRaised) as refused:
        process.run_sealed([str(script)], what="convert_hf_to_gguf.py", writes_to=tmp_path, seal=SEAL, python=True)
    assert refused.value.exception == "AssertionError: vocab_size mismatch (tool.py:2)"
    assert "could not read the repository's files: AssertionError: vocab_size mismatch" in refused.value.message


@pytest.mark.parametrize("machine", sorted(sealed._REFUSED_SYSCALLS))
def test_the_filter_refuses_the_listed_syscalls_and_other_abis(machine):
    """The BPF program, instruction by instruction, run by a tiny interpreter of the opcodes it uses."""
    program = sealed.seccomp_program(machine)
    arch = sealed._AUDIT_ARCH[machine]

    def verdict(nr: int, syscall_arch: int = arch) -> int:
        data = {0: nr, 4: syscall_arch}
        pc, accumulator = 0, 0
        while True:
            code, jt, jf, k = struct.unpack_from("HBBI", program, pc * 8)
            if code == sealed._LD_ABS:
                accumulator = data[k]
            elif code in (sealed._JEQ, sealed._JGE):
                taken = accumulator == k if code == sealed._JEQ else accumulator >= k
                pc += jt if taken else jf
            elif code == sealed._RET:
                return k
            pc += 1

    refused = sealed._SECCOMP_RET_ERRNO | sealed._EACCES
    for nr in sealed._REFUSED_SYSCALLS[machine]:
        assert verdict(nr) == refused
    assert verdict(0) == verdict(1) == verdict(60) == sealed._SECCOMP_RET_ALLOW
    assert verdict(sealed._X32_SYSCALL_BIT + 1) == refused
    assert verdict(0, syscall_arch=0x40000003) == refused  # i386 on x86_64, say


def test_the_action_process_hides_its_environment_from_its_children():
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/environ (the runner's INPUT_* secrets) then needs CAP_SYS_PTRACE,
    which a container action lacks. Here, as root with every capability, only the flag is checked; the image
    test reads it from a sealed child (tests/test_remote_code.py)."""
    code = ("from entrypoint import process; import ctypes\n"
            "process.keep_secrets_from_children()\n"
            "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(process.APP_ROOT)}, check=True)
    assert result.stdout.strip() == "0"


def test_a_tool_writes_only_beneath_its_folder(tmp_path):
    """Where the kernel offers Landlock (every machine this project runs on): the runner's file commands,
    the checkout and the action's own files are out of a tool's reach; its own folder is not."""
    work, outside = tmp_path / "work", tmp_path / "file_commands"
    work.mkdir()
    outside.mkdir()
    (outside / "set_env").write_text("")
    probe = (f"import os\nopen({str(work / 'out.gguf')!r}, 'w').write('ok')\nopen('/dev/null', 'w').write('x')\n"
             f"for path in ({str(outside / 'set_env')!r}, {str(outside / 'new')!r}):\n"
             "    try:\n        open(path, 'a').write('LD_PRELOAD=/tmp/evil.so')\n"
             "    except PermissionError:\n        print('refused', path)\n")
    out = work / "probe.txt"
    command = [sys.executable, "-I", "-c", f"import sys; sys.stdout = open({str(out)!r}, 'w')\n{probe}"]
    process.run_sealed(command, what="probe", writes_to=work, seal=SEAL)
    assert (work / "out.gguf").read_text() == "ok"
    assert out.read_text().splitlines() == [f"refused {outside / 'set_env'}", f"refused {outside / 'new'}"]
    assert (outside / "set_env").read_text() == "" and not (outside / "new").exists()
